"""Inference evals: the passkey / multi-key generators, exact match, an end-to-end retrieval and
long-perplexity eval on a smoke-size random model, and the FlexPrefill experiment's evaluate.py
on a smoke-trained checkpoint."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import optax
import pytest
from flax import nnx

from research import config as config_lib
from research import run_config
from research import data as data_lib
from research import experiments
from research.data import ByteTokenizer, CharTokenizer
from research.eval import lm_eval, long_ppl, retrieval
from research.infer import load_run, with_overrides
from research.model import create_model
from research.model.prefill import prefill_settings
from research.train.trainer import Trainer

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; "
        "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. ")


def char_tokenizer():
  # the corpus' characters and the templates' (no digits): keys fall back to letters
  return CharTokenizer(TEXT + retrieval.NEEDLE + retrieval.QUESTION)


def filler(tokenizer, n=4000):
  ids = tokenizer.encode(TEXT)
  return np.resize(ids, n).astype(np.int32)


@pytest.mark.parametrize("length,depth", [(200, 0.0), (257, 0.5), (300, 1.0)])
def test_passkey_prompt_holds_the_answer(length, depth):
  tok = ByteTokenizer()
  ex = retrieval.make_example(tok, filler(tok), length, np.random.default_rng(0), depth=depth)
  text = tok.decode(ex.tokens)
  assert len(ex.tokens) == length and ex.answer.isdigit() and len(ex.answer) == 5
  assert text.count(ex.answer) == 2 and text.endswith(retrieval.QUESTION)
  needle = text.index(" The pass key is")
  hay = length - len(retrieval.QUESTION) - len(retrieval.NEEDLE.format(key=ex.answer))
  assert needle == round(depth * hay)


def test_keys_fall_back_to_letters_without_digits():
  tok = char_tokenizer()
  alphabet = retrieval.key_alphabet(tok)
  assert len(alphabet) >= 10 and alphabet.isalpha() and alphabet.islower()
  ex = retrieval.make_example(tok, filler(tok), 300, np.random.default_rng(1))
  assert ex.answer.isalpha() and ex.answer in tok.decode(ex.tokens)


def test_multikey_prompt_holds_every_needle_and_asks_one():
  tok = ByteTokenizer()
  ex = retrieval.make_example(tok, filler(tok), 400, np.random.default_rng(2), num_keys=4)
  text = tok.decode(ex.tokens)
  assert len(ex.tokens) == 400 and len(ex.keys) == 4 and len(set(ex.keys.values())) == 4
  for name, key in ex.keys.items():
    assert f"The pass key of {name} is {key}." in text
  asked = [n for n, k in ex.keys.items() if k == ex.answer]
  assert text.endswith(retrieval.MULTI_QUESTION.format(name=asked[0]))


def test_generator_errors():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="too short"):
    retrieval.make_example(tok, filler(tok), 40, np.random.default_rng(0))
  with pytest.raises(ValueError, match="shorter than"):
    retrieval.make_example(tok, filler(tok, 100), 400, np.random.default_rng(0))


def test_exact_match():
  assert retrieval.exact_match(" 40172. Remember", "40172")
  assert not retrieval.exact_match(" 4017", "40172")
  assert not retrieval.exact_match(" 40127", "40172")


def test_key_char_accuracy_counts_matching_positions():
  assert retrieval.key_char_accuracy(" 40172. Remember", "40172") == 1.0
  assert retrieval.key_char_accuracy(" 40127", "40172") == pytest.approx(3 / 5)
  assert retrieval.key_char_accuracy(" 401", "40172") == pytest.approx(3 / 5)  # short: misses
  assert retrieval.key_char_accuracy("", "40172") == 0.0


@pytest.fixture(scope="module")
def byte_model():
  c = run_config.default_config()
  c.model.vocab_size = 256
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.num_kv_heads = 2, 32, 2, 1
  c.data.seq_len = 128
  return create_model(run_config.resolve(c).model)


SPARSE = {"model.attention.prefill": "flexprefill", "model.attention.flexprefill.gamma": 0.8,
          "model.attention.flexprefill.block_size": 16,
          "model.attention.flexprefill.min_budget": 16}


def test_retrieval_eval_end_to_end(byte_model):
  tok = ByteTokenizer()
  sparse = with_overrides(byte_model, SPARSE)
  for model, sparse_prefill in ((byte_model, False), (sparse, True)):
    res = retrieval.retrieval_eval(model, tok, filler(tok), lengths=[160], num_examples=2,
                                   num_keys=2, batch_size=2)
    assert res["task"] == "multikey2" and set(res["lengths"]) == {160}
    assert 0.0 <= res["accuracy"] <= res["char_accuracy"] <= 1.0
    assert res["chance"] == pytest.approx(1 / 10)  # bytes encode the digits
    for v in res["lengths"].values():
      assert v["examples"] == 2 and 0 <= v["correct"] <= 2
      assert (v["density"] is not None) == sparse_prefill
      if sparse_prefill:
        assert 0.0 < v["density"] <= 1.0 and 0.0 <= v["query_aware"] <= 1.0


def test_long_ppl_dense_equals_full_forward_and_sparse_reports_delta(byte_model):
  tok = ByteTokenizer()
  windows = long_ppl.long_windows(filler(tok), 96, 3)
  dense = long_ppl.continuation_nll(byte_model, windows, prefix_len=80, batch_size=3)
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(byte_model, windows[:, :-1]))[:, 79:]
  want = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 80:]).mean()
  assert dense["tokens"] == 3 * 16 and dense["density"] is None
  np.testing.assert_allclose(dense["nll"], float(want), rtol=1e-5)
  sparse = long_ppl.continuation_nll(with_overrides(byte_model, SPARSE), windows, prefix_len=80,
                                     batch_size=3)
  assert np.isfinite(sparse["ppl"]) and 0.0 < sparse["density"] <= 1.0
  delta = long_ppl.ppl_delta(sparse, dense)
  np.testing.assert_allclose(delta["delta_ppl"], sparse["ppl"] - dense["ppl"])
  with pytest.raises(ValueError, match="fewer than"):
    long_ppl.long_windows(filler(tok, 100), 96, 3)


def _evaluate_module():
  path = experiments.experiments_dir() / "flexprefill" / "evaluate.py"
  spec = importlib.util.spec_from_file_location("flexprefill_evaluate", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_eval_arms_are_valid_config_keys():
  sweep = importlib.util.spec_from_file_location(
      "flexprefill_sweep_test", experiments.experiments_dir() / "flexprefill" / "sweep.py")
  module = importlib.util.module_from_spec(sweep)
  sweep.loader.exec_module(module)
  arms = module.eval_arms()
  assert len(arms["grid"]) == 4 * 3 * 2 and arms["dense"][0].name == "dense"
  for group in arms.values():
    for arm in group:
      c = experiments.get_config("flexprefill:scale=tiny")
      config_lib.apply_overrides(c, arm.overrides)
      prefill_settings(c.model.attention)  # the model's own check


@pytest.mark.needs_data
def test_evaluate_script_on_a_smoke_checkpoint(tmp_path):
  config = experiments.get_config("flexprefill:scale=smoke", {
      "train.steps": 2, "train.log_every": 1, "train.progress": False, "mesh.num_devices": 1})
  Trainer(config, tmp_path / "run", experiment="flexprefill", arg="scale=smoke",
          log=lambda *_: None).run()
  run = load_run(tmp_path / "run")
  assert run.step == 2 and run.config.model.attention.prefill == "dense"
  out = _evaluate_module().main(["--workdir", str(tmp_path / "run"), "--arms", "g0.9_t0.1_b32",
                                 "--lengths", "128", "--examples", "2", "--keys", "2",
                                 "--ppl_windows", "2", "--batch_size", "2",
                                 "--out", str(tmp_path / "eval")])
  results = json.loads((out / "results.json").read_text())
  arms = results[0]["arms"]
  assert list(arms) == ["dense", "g0.9_t0.1_b32"]
  sparse = arms["g0.9_t0.1_b32"]
  assert 0.0 < sparse["ppl"]["density"] <= 1.0 and "delta_ppl" in sparse["ppl"]
  assert 0.0 <= sparse["passkey"]["lengths"]["128"]["accuracy"] <= 1.0
  table = (out / "results.md").read_text()
  assert "| g0.9_t0.1_b32 | grid |" in table and "passkey@128" in table
  # the restored parameters are the trained ones: the run's final validation loss again
  c = run.config
  corpus = data_lib.load_tokenized(c.data)
  batches = data_lib.make_valid_batches(corpus.valid, seq_len=c.data.seq_len,
                                        batch_size=c.eval.batch_size, num_batches=c.eval.batches)
  graphdef, params, other = nnx.split(run.model, nnx.Param, ...)
  loss = lm_eval.evaluate(lm_eval.make_eval_step(graphdef), params, other, batches)
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  np.testing.assert_allclose(loss, summary["valid_loss"], rtol=1e-5)
