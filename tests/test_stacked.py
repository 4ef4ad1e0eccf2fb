"""Seed-stacked training (research/train/loop.py): the seeds of one config trained as one vmapped
program equal their single runs, each in its own work directory, and resume like them."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from research import experiments
from research.infer import load_run
from research.train.trainer import Trainer, train_seeds

pytestmark = pytest.mark.needs_data

SPEC = "baseline:scale=smoke,corpus=tinyshakespeare"
# fp32: a seed's step inside the stack is the single run's step with batched matmuls, whose
# rounding may differ; measured over 60 steps of the smoke model on CPU: losses equal to 1.4e-7
# relative (most bit for bit).
RTOL = 1e-5


def _trainer(workdir: Path, seed: int, log=None, **overrides) -> Trainer:
  config = experiments.get_config(SPEC, {"seed": seed, "train.progress": False,
                                         "mesh.num_devices": 1, **overrides})
  return Trainer(config, workdir, experiment="baseline", arg="scale=smoke",
                 log=(log.append if log is not None else lambda *_: None))


def _rows(workdir: Path, split: str) -> list[tuple[int, float]]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def _assert_same_run(a: Path, b: Path):
  for split in ("train", "valid"):
    ra, rb = _rows(a, split), _rows(b, split)
    assert [s for s, _ in ra] == [s for s, _ in rb]  # the same steps logged, once each
    np.testing.assert_allclose([v for _, v in ra], [v for _, v in rb], rtol=RTOL)
  pa = jax.tree.leaves(nnx.state(load_run(a).model, nnx.Param))
  pb = jax.tree.leaves(nnx.state(load_run(b).model, nnx.Param))
  for x, y in zip(pa, pb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=1e-6)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """Each seed trained alone, 12 steps."""
  root = tmp_path_factory.mktemp("single")
  for seed in range(3):
    _trainer(root / f"seed{seed}", seed).run()
  return root


def test_stacked_seeds_equal_their_single_runs(single, tmp_path):
  log = []
  trainers = [_trainer(tmp_path / f"seed{s}", s, log if s == 0 else None) for s in range(3)]
  summaries = train_seeds(trainers)
  assert [s["step"] for s in summaries] == [12, 12, 12]
  assert not any("one after another" in l for l in log)
  losses = [s["valid_loss"] for s in summaries]
  assert len(set(losses)) == 3  # three different seeds, not one run three times
  for seed in range(3):
    _assert_same_run(single / f"seed{seed}", tmp_path / f"seed{seed}")
    assert json.loads((tmp_path / f"seed{seed}" / "config.json").read_text())["config"][
        "seed"] == seed


def test_stacked_seeds_resume_and_extend_like_single_runs(single, tmp_path):
  """Stacked to 6 steps, then extended to 12 in a stack: the same as single runs extended the
  same way; a seed that already finished alone is reported, not trained again."""
  trainers = [_trainer(tmp_path / f"s{s}", s, **{"train.steps": 6}) for s in range(3)]
  train_seeds(trainers)
  ext = tmp_path / "alone"
  for seed in (1, 2):
    _trainer(ext / f"s{seed}", seed, **{"train.steps": 6}).run()
    _trainer(ext / f"s{seed}", seed).run()  # extended alone to 12
  _trainer(tmp_path / "s0", 0).run()  # seed 0 extended alone first
  log = []
  summaries = train_seeds([_trainer(tmp_path / f"s{s}", s, log) for s in range(3)])
  assert [s["step"] for s in summaries] == [12, 12, 12]
  assert any("already finished" in l for l in log)
  for seed in (1, 2):
    _assert_same_run(ext / f"s{seed}", tmp_path / f"s{seed}")


def test_runs_at_different_steps_train_one_after_another(tmp_path):
  _trainer(tmp_path / "s0", 0, **{"train.steps": 6}).run()
  log = []
  trainers = [_trainer(tmp_path / f"s{s}", s, log if s == 0 else None, **{"train.steps": 12})
              for s in range(2)]
  # seed 0 extends from 6, seed 1 starts at 0: no common step
  assert [s["step"] for s in train_seeds(trainers)] == [12, 12]
  assert any("one after another: the runs are at different steps" in l for l in log)


def test_sweep_stacks_an_arms_seeds_by_default(single, tmp_path):
  from research.sweep import run_sweep  # pylint: disable=import-outside-toplevel
  log = []
  run_sweep("baseline", group="lr", arg="scale=smoke,corpus=tinyshakespeare", arms=["lr=1e-3"],
            seeds=2, runs_dir=tmp_path, log=log.append,
            overrides={"train.progress": False, "mesh.num_devices": 1})
  assert not any("one after another" in l for l in log)
  arm = tmp_path / "baseline" / "lr" / "lr=1e-3"
  for seed in range(2):  # lr 1e-3 is the smoke default: the same runs as `single`
    _assert_same_run(single / f"seed{seed}", arm / f"seed{seed}")


def test_stacked_layer_grad_norms_are_observation_only(tmp_path):
  """train.log_layer_grad_norms in a seed stack: each seed logs its own per-block grad norms
  and the losses are those of the stack without them, bit for bit (the sweep treats a run that
  logged them as the twin of one that did not)."""
  extra = {"train.log_every": 2}
  train_seeds([_trainer(tmp_path / f"off{s}", s, **extra) for s in range(2)])
  log = []
  train_seeds([_trainer(tmp_path / f"on{s}", s, log if s == 0 else None, **extra,
                        **{"train.log_layer_grad_norms": True}) for s in range(2)])
  assert not any("one after another" in l for l in log)  # trained as one stack
  norms = []
  for seed in range(2):
    for split in ("train", "valid"):
      assert _rows(tmp_path / f"on{seed}", split) == _rows(tmp_path / f"off{seed}", split)
    rows = [json.loads(l) for l in (tmp_path / f"on{seed}" / "metrics.jsonl").read_text().splitlines()]
    norms.append([r[k] for r in rows for k in sorted(r) if k.startswith("grad_norm/block_")])
    assert norms[-1] and all(np.isfinite(norms[-1]))
    off = (tmp_path / f"off{seed}" / "metrics.jsonl").read_text()
    assert "grad_norm/block_" not in off
  assert norms[0] != norms[1]  # each seed's own gradients, not one seed's copied
