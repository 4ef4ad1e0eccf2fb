"""Every experiment: its configs build at every scale, its sweep loads, and its smoke scale
trains a few steps."""

from __future__ import annotations

import json

import pytest

from research import config as config_lib
from research import run_config
from research import data
from research import experiments
from research.model import abstract_model, model_summary
from research.train.trainer import Trainer, make_data

NAMES = experiments.list_experiments()


def test_experiments_are_found():
  assert "baseline" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_scale_builds(name):
  claim, scales = experiments.describe(name)
  assert claim and "smoke" in scales and "tiny" in scales
  for scale in scales:
    c = run_config.resolve(experiments.get_config(f"{name}:scale={scale}"))
    c.model.vocab_size = c.model.vocab_size or 256
    s = model_summary(abstract_model(c.model), c.data.seq_len)  # shapes only, no memory
    assert s["params"] > 0 and s["flops_per_token_train"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_sweep_loads(name):
  sweep = experiments.get_sweep(name)
  assert sweep.groups and sweep.seeds >= 1
  for group, arms in sweep.groups.items():
    assert arms, group
    for arm in arms:  # every override names a real config key
      config_lib.apply_overrides(experiments.get_config(f"{name}:{sweep.arg}"), arm.overrides)


@pytest.mark.needs_data
@pytest.mark.parametrize("name", NAMES)
def test_smoke_trains(name, tmp_path):
  config = experiments.get_config(f"{name}:scale=smoke", {"train.steps": 4, "train.log_every": 2,
                                                         "train.progress": False,
                                                         "mesh.num_devices": 1})
  summary = Trainer(config, tmp_path, experiment=name, arg="scale=smoke", log=lambda *_: None).run()
  assert summary["step"] == 4
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in lines if l["split"] == "train"]
  assert len(losses) == 3 and all(l == l for l in losses)  # steps 1, 2, 4; finite


@pytest.mark.needs_data
@pytest.mark.parametrize("name", NAMES)
def test_smoke_data_never_fails_for_any_draw(name):
  """Every smoke scale is valid by construction: its training windows (passkey prompts mixed in
  included: flexprefill's used to fail at random when a draw's needles did not fit) build for
  several seeds and many batches."""
  c = run_config.resolve(experiments.get_config(f"{name}:scale=smoke"))
  corpus = data.load_tokenized(c.data)
  for seed in range(4):
    c.seed = seed
    train_iter, valid = make_data(c, corpus)
    assert valid
    for _ in range(40):
      batch = next(train_iter)
      assert batch["inputs"].shape == (c.train.batch_size, c.data.seq_len)


@pytest.mark.needs_data
@pytest.mark.parametrize("name", NAMES)
def test_small_and_paper_scales_size_their_data(name):
  """The accelerator scales' data fits its corpus (WikiText-2 with GPT-2 BPE): the validation
  batches are built and a training batch is drawn, as a run would at start."""
  for scale in ("small", "paper"):
    c = run_config.resolve(experiments.get_config(f"{name}:scale={scale}"))
    train_iter, valid = make_data(c, data.load_tokenized(c.data))
    assert len(valid) >= 1 and valid[0]["inputs"].shape == (c.eval.batch_size, c.data.seq_len)
    assert next(train_iter)["inputs"].shape == (c.train.batch_size, c.data.seq_len)


@pytest.mark.needs_data
def test_small_shape_trains_on_bpe_wikitext(tmp_path):
  """The `small` scale's data path end to end (WikiText-2, GPT-2 BPE, its validation sizing) at
  a width and length a CPU test can afford."""
  config = experiments.get_config("baseline:scale=small", {
      "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 2, "data.seq_len": 128,
      "train.batch_size": 4, "train.steps": 3, "train.warmup_steps": 1, "train.log_every": 1,
      "eval.every": 3, "eval.batches": 2, "train.progress": False, "mesh.num_devices": 1})
  summary = Trainer(config, tmp_path, experiment="baseline", arg="scale=small",
                    log=lambda *_: None).run()
  assert summary["step"] == 3 and summary["valid_loss"] < 11.5  # ln(50257) = 10.8 at init
  record = json.loads((tmp_path / "config.json").read_text())["config"]
  assert record["model"]["vocab_size"] == 50257 and record["data"]["tokenizer"] == "gpt2"
