"""Checkpoint merging (PMA, arXiv:2505.12082): the weights of SMA / EMA / WMA, and `research
merge` over a real run's orbax checkpoints, read back by load_run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import cli, experiments
from research.infer.load import load_run
from research.train import merge
from research.train.workdir import checkpoint_steps
from research.train.trainer import Trainer


def test_weights_sum_to_one_and_follow_the_schemes():
  assert merge.merge_weights("sma", 4) == [0.25] * 4
  assert merge.merge_weights("wma", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
  for method in merge.METHODS:
    assert sum(merge.merge_weights(method, 7, alpha=0.1)) == pytest.approx(1.0)


def test_ema_weights_are_the_recursion():
  """M^(1) = M_1, M^(i) = alpha M_i + (1 - alpha) M^(i-1): merging scalars 10^i by the weights
  equals running the recursion."""
  alpha, values = 0.2, [1.0, 10.0, 100.0, 1000.0]
  running = values[0]
  for v in values[1:]:
    running = alpha * v + (1 - alpha) * running
  weights = merge.merge_weights("ema", 4, alpha)
  assert sum(w * v for w, v in zip(weights, values)) == pytest.approx(running)


def test_identical_trees_merge_to_themselves_and_sma_of_two_is_the_mean():
  a = {"w": jax.random.normal(jax.random.key(0), (5, 3)), "n": jnp.arange(3)}
  b = {"w": jax.random.normal(jax.random.key(1), (5, 3)), "n": jnp.arange(3) + 7}
  for method in merge.METHODS:
    same = merge.merge_trees([a, a, a], merge.merge_weights(method, 3))
    np.testing.assert_allclose(same["w"], a["w"], rtol=1e-6)
  mean = merge.merge_trees([a, b], merge.merge_weights("sma", 2))
  np.testing.assert_array_equal(mean["w"], (a["w"] + b["w"]) / 2)
  np.testing.assert_array_equal(mean["n"], b["n"])  # integers: the newest


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="median", n=3), "unknown merge method"),
    (dict(method="sma", n=0), "at least one"),
    (dict(method="ema", n=3, alpha=1.5), "alpha"),
])
def test_bad_merges_are_errors(kwargs, match):
  with pytest.raises(merge.MergeError, match=match):
    merge.merge_weights(**kwargs)


def test_missing_checkpoints_are_named():
  with pytest.raises(merge.MergeError, match=r"checkpoints \[2\] are not in the run"):
    merge.window_steps([4, 6, 8], last=4, every=2, step=8)
  assert merge.window_steps([2, 4, 6, 8], last=3, every=2, step=None) == [4, 6, 8]


@pytest.mark.needs_data
def test_research_merge_writes_a_run_that_load_run_reads(tmp_path, capsys):
  config = experiments.get_config("baseline:scale=smoke,corpus=tinyshakespeare", {
      "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 4,
      "train.log_every": 4, "train.progress": False, "mesh.num_devices": 1})
  run = tmp_path / "run"
  Trainer(config, run, experiment="baseline", arg="scale=smoke", log=lambda *_: None).run()
  assert checkpoint_steps(run) == [2, 4, 6, 8]
  out = tmp_path / "merged"
  assert cli.main(["merge", str(run), "--method", "sma", "--last", "2", "--every", "4",
                   "--out", str(out), "--eval"]) == 0
  printed = capsys.readouterr().out
  assert "merged sma of steps [4, 8]" in printed and "valid loss: merged" in printed
  info = json.loads((out / "merge.json").read_text())
  assert info["steps"] == [4, 8] and info["weights"] == [0.5, 0.5]
  merged = load_run(out)
  assert merged.step == 8
  four, eight = (nnx.state(load_run(run, step=s).model, nnx.Param) for s in (4, 8))
  got = nnx.state(merged.model, nnx.Param)
  for m, x, y in zip(jax.tree.leaves(got), jax.tree.leaves(four), jax.tree.leaves(eight)):
    np.testing.assert_array_equal(np.asarray(m), (np.asarray(x) + np.asarray(y)) / 2)
  # the merge differs from either checkpoint: the run trained between them
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(four), jax.tree.leaves(eight)))
  assert merge.validation_loss(out) == pytest.approx(
      float(printed.split("merged ")[2].split(",")[0]), abs=1e-4)


@pytest.mark.needs_data
def test_an_annealed_fork_continues_the_run_exactly_then_decays(tmp_path):
  """PMA's control: branch a constant-lr run at step 4 and decay over the next 4 steps. The
  branch restores the whole train state and the data position, so its losses equal the
  trunk's bit for bit until its first smaller update (the update of step 6, at count 5) shows;
  its learning rate falls linearly towards 0 while the trunk's stays."""
  common = {"train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 4,
            "train.log_every": 1, "train.warmup_steps": 2, "train.progress": False,
            "mesh.num_devices": 1}
  spec = "baseline:scale=smoke,corpus=tinyshakespeare"
  trunk = tmp_path / "trunk"
  Trainer(experiments.get_config(spec, {**common, "train.schedule": "constant"}), trunk,
          log=lambda *_: None).run()
  branch = tmp_path / "branch"
  anneal = {**common, "train.schedule": "wsd", "train.decay_fraction": 0.5,
            "train.min_lr_ratio": 0.0}
  Trainer(experiments.get_config(spec, anneal), branch, log=lambda *_: None,
          fork=(trunk, 4)).run()

  def train_rows(w):
    return {r["step"]: r for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}

  a, b = train_rows(trunk), train_rows(branch)
  for step in range(1, 7):
    assert b[step]["loss"] == a[step]["loss"], step
  assert b[7]["loss"] != a[7]["loss"]
  assert [b[s]["lr"] / a[s]["lr"] for s in (5, 6, 7, 8)] == pytest.approx([1, 0.75, 0.5, 0.25])
  history = json.loads((branch / "config.json").read_text())["history"]
  assert "forked from" in history[0]["change"] and "at step 4" in history[0]["change"]


def test_forking_at_a_missing_checkpoint_is_an_error(tmp_path):
  from research.errors import RunError
  from research.train import workdir
  (tmp_path / "src" / "checkpoints" / "2").mkdir(parents=True)
  with pytest.raises(RunError, match=r"no checkpoint there \(checkpoints: \[2\]\)"):
    workdir.copy_fork(tmp_path / "src", 3, tmp_path / "dst")


@pytest.mark.needs_data
def test_model_merging_evaluates_merges_and_tabulates_them(tmp_path):
  """experiments/model_merging: merges.py's evaluation of a smoke trunk, and analysis.py's
  table with its verdict column."""
  config = experiments.get_config("model_merging:scale=smoke,corpus=tinyshakespeare", {
      "train.progress": False, "mesh.num_devices": 1})
  run = tmp_path / "seed0"
  Trainer(config, run, log=lambda *_: None).run()
  assert checkpoint_steps(run) == [2, 4, 6, 8, 10, 12]
  merges = experiments._load_module("model_merging", "merges.py")  # pylint: disable=protected-access
  grid = [("sma", None, 3, 2), ("ema", 0.2, 3, 4), ("wma", None, 7, 2)]  # the last does not fit
  rows = merges.evaluate_seed(run, points=(12,), grid=grid)
  assert [r["merge"] for r in rows] == ["sma_n3_v2", "ema0.2_n3_v4"]
  assert rows[0]["latest"] == pytest.approx(merge.validation_loss(run, step=12), abs=1e-6)
  out = merge.merge_run(run, method="sma", last=3, every=2, out=tmp_path / "m")
  assert rows[0]["loss"] == pytest.approx(merge.validation_loss(out), abs=1e-6)
  analysis = experiments._load_module("model_merging", "analysis.py")  # pylint: disable=protected-access
  table = analysis.merge_tables([{"trunk": "constant_3e-3", "seed": f"seed{k}", **r}
                                 for k in range(2) for r in rows], {12: [3.0, 3.1]})
  assert "| sma_n3_v2 |" in table and "annealed control" in table
  sma = next(l for l in table.splitlines() if l.startswith("| sma_n3_v2 |"))
  # the last column: the merge against the annealed control, seed by seed (mean 3.05)
  assert sma.split("|")[-2].strip().startswith(f"{rows[0]['loss'] - 3.05:+.4f} (")


def test_merge_output_never_overwrites_a_run(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  for out in (run, run / "checkpoints", tmp_path, other):
    with pytest.raises(merge.MergeError):
      merge._check_output(out, run)  # pylint: disable=protected-access
  assert (other / "notes.txt").is_file()
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  (earlier / "merge.json").write_text("{}")
  merge._check_output(earlier, run)  # pylint: disable=protected-access  (replaced: a merge)
  merge._check_output(run / "merged" / "sma_n2_v4_s8", run)  # pylint: disable=protected-access


@pytest.mark.needs_data
def test_a_fork_that_changes_the_model_is_refused(tmp_path):
  from research.errors import RunError
  common = {"train.steps": 4, "train.checkpoint_every": 2, "train.progress": False,
            "mesh.num_devices": 1}
  spec = "baseline:scale=smoke,corpus=tinyshakespeare"
  Trainer(experiments.get_config(spec, common), tmp_path / "a", log=lambda *_: None).run()
  wider = {**common, "model.d_model": 64}
  with pytest.raises(RunError, match=r"model.d_model 32 -> 64"):
    Trainer(experiments.get_config(spec, wider), tmp_path / "b", log=lambda *_: None,
            fork=(tmp_path / "a", 2)).run()
  assert not (tmp_path / "b" / "checkpoints").exists()
