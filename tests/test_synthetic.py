"""Synthetic tasks (MQAR, fact recall): instance format, held-out splits, aligned windows,
exact-match scoring, and a trainer run on a task (no data directory needed)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import run_config
from research.config import ConfigError
from research.data import load_tokenized, make_train_iterator, make_valid_batches
from research.data import synthetic
from research.eval import exact_match as exact_match_eval
from research.train.trainer import Trainer


def data_config(corpus, seq_len=32, **fields):
  c = run_config.default_config()
  c.data.corpus, c.data.tokenizer, c.data.seq_len = corpus, "synthetic", seq_len
  c.data.synthetic.train_sequences, c.data.synthetic.valid_sequences = 200, 40
  for k, v in fields.items():
    config_lib.apply_overrides(c, {f"data.synthetic.{k}": v})
  return c


def test_mqar_instances():
  c = data_config("mqar", pairs=5)
  task = synthetic.make_task(c.data)
  lo = task.layout
  x = task.generate(50, synthetic.TRAIN_STREAM)
  assert x.shape == (50, 33)
  for row in x:
    keys, values = row[0:10:2], row[1:10:2]
    assert len(set(keys.tolist())) == 5 and row[10] == synthetic.SEP
    assert np.all((keys >= lo.key0) & (keys < lo.value0)) and lo.is_value(values).all()
    table = dict(zip(keys.tolist(), values.tolist()))
    q = row[11:11 + 2 * 11]  # (33 - 11) // 2 = 11 queries
    assert all(table[k] == v for k, v in zip(q[0::2].tolist(), q[1::2].tolist()))
  mask = task.answer_mask(x[:, :-1], x[:, 1:])
  assert mask.sum() == 50 * 11  # every query is answered once, no context value is scored
  valid = task.generate(50, synthetic.VALID_STREAM)
  assert not np.array_equal(valid, x)


def test_facts_instances_and_table():
  c = data_config("facts", seq_len=39, entities=50, attributes=3)
  task = synthetic.make_task(c.data)
  lo = task.layout
  assert lo.digits == 8  # ceil(sqrt(50))
  table = task.fact_table()
  x = task.generate(30, synthetic.TRAIN_STREAM)
  assert x.shape == (30, 40)
  for row in x:
    quads = row.reshape(10, 4)
    entity = (quads[:, 0] - lo.digit0) * lo.digits + quads[:, 1] - lo.digit0
    attribute = quads[:, 2] - lo.attribute0
    assert len(set(zip(entity.tolist(), attribute.tolist()))) == 10  # no fact repeats
    np.testing.assert_array_equal(quads[:, 3] - lo.value0, table[entity, attribute])
  assert task.answer_mask(x[:, :-1], x[:, 1:]).sum() == 30 * 10
  # held-out prompts are new arrangements of the same facts
  valid = task.generate(30, synthetic.VALID_STREAM).reshape(-1, 4)
  ent = (valid[:, 0] - lo.digit0) * lo.digits + valid[:, 1] - lo.digit0
  np.testing.assert_array_equal(valid[:, 3] - lo.value0, table[ent, valid[:, 2] - lo.attribute0])


def test_tokenizer_round_trip_and_config_errors():
  corpus = load_tokenized(data_config("mqar", pairs=3).data)
  text = corpus.tokenizer.decode(corpus.valid[:8])
  np.testing.assert_array_equal(corpus.tokenizer.encode(text), corpus.valid[:8])
  assert corpus.task is not None and corpus.valid_bytes_per_token == 1.0
  bad = data_config("mqar")
  bad.data.tokenizer = "char"
  with pytest.raises(ConfigError, match="tokenizer='synthetic'"):
    load_tokenized(bad.data)
  with pytest.raises(ConfigError, match="pairs=20"):
    synthetic.make_task(data_config("mqar", seq_len=32, pairs=20).data)


def test_windows_are_whole_instances():
  c = data_config("mqar", pairs=4)
  corpus = load_tokenized(c.data)
  task = corpus.task
  it = make_train_iterator(corpus.train, seq_len=32, batch_size=8, seed=3, aligned=True)
  for _ in range(30):  # several epochs of 200 instances
    batch = next(it)
    assert np.all(batch["inputs"][:, 8] == synthetic.SEP)
    assert np.all(task.answer_mask(batch["inputs"], batch["targets"]).sum(1) == 12)
  valid = make_valid_batches(corpus.valid, seq_len=32, batch_size=8, num_batches=5)
  assert all(np.all(b["inputs"][:, 8] == synthetic.SEP) for b in valid)


def test_exact_match_counts_answer_positions_only():
  task = synthetic.make_task(data_config("mqar", pairs=4).data)
  x = task.generate(4, synthetic.VALID_STREAM)
  inputs, targets = jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:])
  vocab = task.layout.vocab_size
  perfect = jnp.eye(vocab)[targets] * 10.0
  correct, total = exact_match_eval.count_correct(perfect, inputs, targets, task)
  assert float(correct) == float(total) == 4 * 12
  wrong = perfect.at[:, :9].set(0.0)  # context positions do not count
  assert float(exact_match_eval.count_correct(wrong, inputs, targets, task)[0]) == 48
  mask = np.asarray(task.answer_mask(inputs, targets))
  first = np.argmax(mask[0])
  half = perfect.at[0, first].set(0.0)
  assert float(exact_match_eval.count_correct(half, inputs, targets, task)[0]) == 47


def test_trainer_scores_exact_match_on_a_task(tmp_path):
  c = data_config("facts", seq_len=16, entities=16, attributes=2)
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.progress = 4, 8, 2, False
  c.train.warmup_steps = 1
  c.eval.every, c.eval.batches = 2, 2
  c.mesh.num_devices = 1
  summary = Trainer(c, tmp_path, log=lambda *_: None).run()
  assert 0.0 <= summary["valid_exact_match"] <= 1.0
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["exact_match"] for l in lines if l["split"] == "valid"][-1] == pytest.approx(
      summary["valid_exact_match"])
  assert summary["params_activated"] == summary["params"]


def test_group_word_problem_products_by_hand():
  """S3's elements in lexicographic order (0 = identity); each input element is followed by the
  running product p_i = x_i p_{i-1}, composed as functions ((a b)(j) = a[b[j]])."""
  from research.data import synthetic  # pylint: disable=import-outside-toplevel
  elements = synthetic.group_elements("S3")
  assert elements.tolist()[:3] == [[0, 1, 2], [0, 2, 1], [1, 0, 2]]
  assert [len(synthetic.group_elements(g)) for g in ("S4", "A4", "A5")] == [24, 12, 60]
  table = synthetic.multiplication_table(elements)
  assert table[4, 5] == 2  # (2,0,1) after (2,1,0) = (1,0,2)
  assert (table[0] == np.arange(6)).all() and (table[:, 0] == np.arange(6)).all()
  c = config_lib.core_config()
  c.data.corpus, c.data.tokenizer, c.data.seq_len = "group", "synthetic", 9
  task = synthetic.make_task(c.data)
  x = task.generate(4, 0)
  lo = task.layout
  assert x.shape == (4, 10)
  for row in x:
    p = 0
    for i in range(0, 10, 2):
      p = table[row[i] - lo.key0, p]
      assert row[i + 1] - lo.value0 == p
  answers = np.asarray(task.answer_mask(x[:, :-1], x[:, 1:]))
  assert answers[:, 0::2].all() and not answers[:, 1::2].any()
  c.data.synthetic.group = "S7"
  with pytest.raises(ConfigError, match="group='S7'"):
    synthetic.make_task(c.data)


def test_group_products_as_targets_never_appear_as_inputs():
  """products="targets": the sequence is the input elements alone and the target at input x_i
  is the running product p_i (by hand on S3: (2,0,1) = index 4 twice is (1,2,0) = index 3,
  three times the identity); the batches of the pipeline and of the validation split carry
  those targets, so no product is ever an input."""
  c = data_config("group", seq_len=5, products="targets")
  task = synthetic.make_task(c.data)
  lo = task.layout
  window = np.array([[4, 4, 4, 1, 0, 2]]) + lo.key0
  batch = task.split(window)
  assert (batch["inputs"] == window[:, :-1]).all()
  assert (batch["targets"] - lo.value0).tolist() == [[4, 3, 0, 1, 1]]
  x = task.generate(3, 0)
  assert x.shape == (3, 6) and not task.layout.is_value(x).any()
  table = synthetic.multiplication_table(synthetic.group_elements("S3"))
  corpus = load_tokenized(c.data)
  for b in (next(iter(make_train_iterator(corpus.train, seq_len=5, batch_size=4, seed=0,
                                          aligned=True, split=corpus.split))),
            make_valid_batches(corpus.valid, seq_len=5, batch_size=4, num_batches=1,
                               split=corpus.split)[0]):
    assert not lo.is_value(b["inputs"]).any()
    for inputs, targets in zip(b["inputs"], b["targets"]):
      p = 0
      for xi, ti in zip(inputs, targets):
        p = table[xi - lo.key0, p]
        assert ti - lo.value0 == p
    assert np.asarray(task.answer_mask(b["inputs"], b["targets"])).all()
  c.data.synthetic.products = "outputs"
  with pytest.raises(ConfigError, match="products='outputs'"):
    synthetic.make_task(c.data)


def test_trainer_and_extrapolation_on_products_as_targets(tmp_path):
  """A run on the state-tracking format trains on the products as targets (its loss starts
  near log |G| = log 6 on every position, not the interleaved format's mix) and its length
  extrapolation scores held-out instances of each length."""
  c = data_config("group", seq_len=16, products="targets")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.train.steps, c.train.batch_size, c.train.log_every, c.train.progress = 4, 8, 2, False
  c.train.warmup_steps = 1
  c.eval.every, c.eval.batches = 2, 2
  c.eval.evaluators = "exact_match,extrapolation"
  c.mesh.num_devices = 1
  summary = Trainer(c, tmp_path, log=lambda *_: None).run()
  assert 0.0 <= summary["valid_exact_match"] <= 1.0
  assert abs(summary["valid_loss"] - np.log(6)) < 1.0
  ext = summary["extrapolation"]
  assert sorted(ext, key=int) == ["16", "32", "64", "128"]
  assert all(0.0 <= e["exact_match"] <= 1.0 and np.isfinite(e["loss"]) for e in ext.values())
