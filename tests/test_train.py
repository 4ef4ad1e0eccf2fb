"""The trainer: exact resume after a kill or Ctrl-C, finished runs, checkpoint failures,
schedules, weight-decay mask, gradient accumulation and auxiliary losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import run_config
from research.model import create_model, ffn
from research.train import optim
from research.checkpoint import Checkpointer
from research.train.trainer import make_train_step

pytestmark = pytest.mark.needs_data

STEPS = 240
RUN = [sys.executable, "-m", "research.cli", "run", "baseline:scale=smoke,corpus=tinyshakespeare",
       f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=20",
       "--config.train.log_every=20", "--config.eval.every=120", "--config.train.progress=False"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device: the subprocess runs unsharded
  return env


def run_cli(workdir: Path, check=True) -> subprocess.CompletedProcess:
  p = subprocess.run(RUN + ["--workdir", str(workdir)], env=_env(), capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(p.stdout + p.stderr)
  return p


def start_and_signal(workdir: Path, sig: int, after_checkpoint: int) -> subprocess.CompletedProcess:
  """Starts a run and sends `sig` once the checkpoint of step `after_checkpoint` is on disk."""
  proc = subprocess.Popen(RUN + ["--workdir", str(workdir)], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  ckpt = workdir / "checkpoints" / str(after_checkpoint)
  while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be interrupted"
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final_checkpoint(workdir: Path):
  ckpt = Checkpointer(workdir / "checkpoints", keep=2, async_save=False)
  step = ckpt.latest_step()
  state, data_state, _ = ckpt.restore(step, None)
  ckpt.close()
  return step, state, data_state


# the logged quantities that are a function of the step (not of the wall clock)
PER_STEP = ("split", "step", "loss", "lr", "grad_norm", "bpb")


def per_step_rows(workdir: Path) -> list[dict]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k in PER_STEP or k.startswith(("aux/", "stat/"))}
          for r in rows]


def valid_losses(workdir: Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "valid":
      out[r["step"]] = r["loss"]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_cli(workdir)
  return workdir


def assert_same_run(a: Path, b: Path):
  step_a, state_a, data_a = final_checkpoint(a)
  step_b, state_b, data_b = final_checkpoint(b)
  assert step_a == step_b == STEPS
  assert data_a == data_b  # so the next batch is the same
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
  assert valid_losses(a)[STEPS] == valid_losses(b)[STEPS]
  # metrics.jsonl row for row: a resumed run logs each step once, with the uninterrupted
  # run's values (the lost steps' rows are cut; the unlogged steps' metrics were checkpointed)
  assert per_step_rows(a) == per_step_rows(b)


def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path):
  p = start_and_signal(tmp_path, signal.SIGKILL, after_checkpoint=60)
  assert p.returncode == -signal.SIGKILL
  assert not (tmp_path / "summary.json").exists()
  resumed = run_cli(tmp_path)
  assert "resumed from step" in resumed.stdout
  assert_same_run(uninterrupted, tmp_path)


def test_ctrl_c_saves_and_resumes_bit_identical(uninterrupted, tmp_path):
  p = start_and_signal(tmp_path, signal.SIGINT, after_checkpoint=40)
  assert p.returncode == 130, p.stderr
  assert "interrupted at step" in p.stdout
  step = int(p.stdout.split("interrupted at step ")[1].split(":")[0])
  assert (tmp_path / "checkpoints" / str(step)).is_dir()  # saved where it stopped
  if step % 20:  # between log lines: the steps since the last one were saved with it
    assert json.loads(next((tmp_path / "checkpoints" / str(step) / "log").glob("*")).read_text()
                      if (tmp_path / "checkpoints" / str(step) / "log").is_dir() else "{}")
  run_cli(tmp_path)
  assert_same_run(uninterrupted, tmp_path)


def test_finished_run_says_so(uninterrupted):
  p = run_cli(uninterrupted)
  assert "already finished at step 240" in p.stdout


def test_failed_checkpoint_write_exits_nonzero(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  p = run_cli(tmp_path, check=False)
  assert p.returncode == 1
  assert "checkpoint" in p.stderr and "Traceback" not in p.stderr


FAILING_SAVE = """
import os, shutil, sys
from pathlib import Path
import jax.numpy as jnp
from research.checkpoint import CheckpointError, Checkpointer
root = Path(sys.argv[1])
ckpt = Checkpointer(root / "ck", keep=2)
ckpt.save(1, {"w": jnp.ones((4,))}, {"i": 1})
ckpt.wait()
shutil.rmtree(root / "ck")
(root / "ck").write_text("the disk went away")
try:
  ckpt.save(2, {"w": jnp.ones((4,))}, {"i": 2})
  ckpt.wait()
  print("no error")
except CheckpointError as e:
  print("CheckpointError:", e)
finally:
  sys.stdout.flush()
  os._exit(0)  # the failed save's background threads never finish (the CLI exits the same way)
"""


def test_checkpoint_write_failure_during_a_run_raises(tmp_path):
  """An asynchronous save that cannot be written surfaces as CheckpointError, not silence."""
  p = subprocess.run([sys.executable, "-c", FAILING_SAVE, str(tmp_path)], env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert "CheckpointError: checkpoint write" in p.stdout and "failed" in p.stdout, p.stdout + p.stderr


def test_changed_config_in_same_workdir_is_refused(uninterrupted):
  (uninterrupted / "summary.json").rename(uninterrupted / "summary.bak")
  try:
    p = subprocess.run(RUN + ["--workdir", str(uninterrupted), "--config.train.lr=0.5"],
                       env=_env(), capture_output=True, text=True, timeout=300)
  finally:
    (uninterrupted / "summary.bak").rename(uninterrupted / "summary.json")
  assert p.returncode == 2
  assert "different config: train.lr 0.001 -> 0.5; pass --restart" in p.stderr


# ---------------------------------------------------------------- in-process pieces

def train_config(**train):
  c = run_config.default_config()
  c.model.vocab_size = 32
  c.model.num_layers = 1
  c.model.d_model = 16
  c.model.num_heads = 2
  c.data.seq_len = 8
  for k, v in train.items():
    c.train[k] = v
  return run_config.resolve(c)


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedules(schedule):
  """Every schedule warms up linearly over 10 of 100 steps to lr 1, then follows its formula on
  hand-computed points (floor 0.1)."""
  t = train_config(schedule=schedule, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1,
                   decay_fraction=0.2, step_milestones=(0.5, 0.75), step_gamma=0.1).train
  s = optim.make_schedule(t)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  points = {  # step -> lr
      "constant": {55: 1.0, 100: 1.0},
      "cosine": {55: 0.55, 100: 0.1},  # halfway: (1 + 0.1) / 2
      "linear": {55: 0.55, 100: 0.1},
      "wsd": {79: 1.0, 90: 0.55, 100: 0.1},  # stable until the last 20 steps
      "step": {49: 1.0, 50: 0.1, 74: 0.1, 75: 0.01, 100: 0.01},
      # k = (1 / 0.1 - 1) / 90 = 0.1: 1 / (1 + 0.1 * 45) at step 55, 1 / 10 at the last
      "inverse_time": {55: 1 / 5.5, 100: 0.1},
  }[schedule]
  for step, lr in points.items():
    assert float(s(step)) == pytest.approx(lr, abs=1e-6), (schedule, step)
  if schedule != "constant":  # past the last step (an extended run recomputes): the floor
    assert float(s(150)) == pytest.approx(points[100], abs=1e-6)


def test_step_schedule_without_warmup():
  t = train_config(schedule="step", steps=100, warmup_steps=0, lr=1.0,
                   step_milestones=(0.3,), step_gamma=0.5).train
  s = optim.make_schedule(t)
  assert [float(s(i)) for i in (0, 29, 30, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.5])


def test_schedule_settings_are_checked():
  with pytest.raises(config_lib.ConfigError, match="floor must be > 0"):
    train_config(schedule="inverse_time", min_lr_ratio=0.0)
  with pytest.raises(config_lib.ConfigError, match="train.step_milestones"):
    train_config(schedule="step", step_milestones=(0.5, 1.5))
  with pytest.raises(config_lib.ConfigError, match="fall inside the warmup"):
    train_config(schedule="step", steps=100, warmup_steps=10, step_milestones=(0.05, 0.5))
  with pytest.raises(config_lib.ConfigError, match=r"train.step_gamma=0.0 must be in \(0, 1\]"):
    train_config(schedule="step", step_gamma=0.0)
  with pytest.raises(config_lib.ConfigError, match="is not one of"):
    train_config(schedule="onecycle")
  c = run_config.default_config()  # milestones from the command line: one or several
  config_lib.apply_overrides(c, {"train.step_milestones": "0.4"})
  assert c.train.step_milestones == (0.4,)
  config_lib.apply_overrides(c, {"train.step_milestones": "0.4,0.8"})
  assert c.train.step_milestones == (0.4, 0.8)


def test_weight_decay_mask_spares_vectors():
  params = {"w": jnp.ones((3, 4)), "scale": jnp.ones((4,)), "table": jnp.ones((5, 4))}
  assert optim.decay_mask(params) == {"w": True, "scale": False, "table": True}


def _state_and_step(c, seed=0):
  model = create_model(c.model, seed=seed)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = optim.make_optimizer(c.train)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
           "opt_state": tx.init(params)}
  return state, jax.jit(make_train_step(graphdef, tx, schedule, c))


def test_grad_accumulation_equals_full_batch():
  x = jax.random.randint(jax.random.key(0), (8, 9), 0, 32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  results = []
  for accum in (1, 4):
    c = train_config(batch_size=8, grad_accum=accum, warmup_steps=0, clip_norm=0.0)
    state, step = _state_and_step(c)
    state, metrics = step(state, batch)
    results.append((state, metrics))
  (s1, m1), (s4, m4) = results
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@ffn.CHANNEL_MIXERS.register("ffn_with_test_aux")
class FeedForwardWithAux(ffn.FeedForward):
  """An FFN that adds the mean square of its output as an auxiliary loss (test fixture)."""

  def __call__(self, x, ctx):
    y = super().__call__(x, ctx)
    ctx.add_aux_loss("out_sq", jnp.mean(y.astype(jnp.float32) ** 2))
    return y


@pytest.mark.parametrize("accum", [1, 2])
def test_aux_losses_are_collected_and_trained(accum):
  c = train_config(batch_size=4, grad_accum=accum, warmup_steps=0)
  c.model.channel.kind = "ffn_with_test_aux"
  state, step = _state_and_step(c)
  x = jax.random.randint(jax.random.key(0), (4, 9), 0, 32)
  _, metrics = step(state, {"inputs": x[:, :-1], "targets": x[:, 1:]})
  assert "aux/out_sq" in metrics and float(metrics["aux/out_sq"]) > 0


def test_a_run_from_before_a_new_option_still_resumes():
  """config.json of a run started before an option existed lacks its key: no difference while
  the option is at its default, a difference once it is changed."""
  from research.train.trainer import config_differences
  c = run_config.default_config()
  c.model.attention.kind = "moda"
  new = run_config.resolve(c).to_dict()
  old = json.loads(json.dumps(new))
  assert config_differences(old, new) == []  # as stored on disk (its tuples are lists)
  del old["model"]["attention"]["moda"]
  assert config_differences(old, new) == []
  changed = json.loads(json.dumps(new))
  changed["model"]["attention"]["moda"]["ffn_kv"] = False
  changed["train"]["lr"] = 5.0
  assert config_differences(old, changed) == ["model.attention.moda.ffn_kv", "train.lr"]


def test_a_run_with_an_option_on_differs_from_the_config_with_it_off():
  """A resolved config drops the section of an option that is off (train.expand without a
  step): an expanding run on disk is not the config that does not expand, in either
  direction, for a sweep's twin search and for resuming its work directory."""
  from research import experiments, sweep
  from research.train import workdir as workdir_lib
  expanding = run_config.resolve(experiments.get_config("sparkling:scale=tiny")).to_dict()
  plain = run_config.resolve(
      experiments.get_config("sparkling:scale=tiny", {"train.expand.step": 0})).to_dict()
  assert "expand" not in plain["train"] and expanding["train"]["expand"]["step"] > 0
  assert "train.expand.step" in workdir_lib.config_differences(expanding, plain)
  assert "train.expand.step" in workdir_lib.config_differences(plain, expanding)
  assert not sweep.same_config(expanding, plain) and not sweep.same_config(plain, expanding)
  assert sweep.same_config(expanding, expanding) and sweep.same_config(plain, plain)
  # a stored run that had the option off but held its settings (runs before configs dropped
  # them) is still the twin of the config without it
  stored = run_config.expand(plain).to_dict()
  stored["train"]["expand"]["d_ff"] = 4096
  assert workdir_lib.config_differences(stored, plain) == []


def test_a_workdir_of_an_expanding_run_refuses_the_config_that_does_not_expand(tmp_path):
  from research import experiments
  from research.errors import RunError
  from research.train import workdir as workdir_lib
  expanding = run_config.resolve(experiments.get_config("sparkling:scale=tiny")).to_dict()
  plain = run_config.resolve(
      experiments.get_config("sparkling:scale=tiny", {"train.expand.step": 0})).to_dict()
  (tmp_path / "config.json").write_text(json.dumps({"config": expanding}))
  step = expanding["train"]["expand"]["step"]
  with pytest.raises(RunError, match=rf"train.expand.step {step} -> \(absent\)"):
    workdir_lib.plan(tmp_path, plain)
