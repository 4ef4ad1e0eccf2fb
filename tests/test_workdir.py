"""Runs that cannot be corrupted: the work directory's lock, the resume rules for a changed
config, metrics after a resume, refusals that say why (from the CLI and from Python), signals,
divergence, and faults injected into checkpoints (a half-written step, a corrupted one, a write
the file system refuses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from research import cli
from research import config as config_lib
from research import run_config
from research import experiments
from research.errors import ResearchError, RunError, WorkdirBusy
from research.train import workdir as workdir_lib
from research.train.trainer import Trainer

SPEC = "baseline:scale=smoke,corpus=tinyshakespeare"
QUIET = {"train.progress": False, "mesh.num_devices": 1}


def smoke(**overrides):
  return experiments.get_config(SPEC, {**QUIET, **overrides})


def train(workdir, log=None, **overrides) -> dict:
  lines = [] if log is None else log
  return Trainer(smoke(**overrides), workdir, experiment="baseline", arg="scale=smoke",
                 log=lines.append).run()


def rows(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device
  return env


def cli_run(workdir: Path, *extra, check=True, prefix=(), timeout=300):
  p = subprocess.run([*prefix, sys.executable, "-m", "research.cli", "run", SPEC, "--workdir",
                      str(workdir), "--config.train.progress=False", "--config.mesh.num_devices=1",
                      *extra], env=_env(), capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(p.stdout + p.stderr)
  return p


def _start(workdir: Path, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "research.cli", "run", SPEC, "--workdir",
                           str(workdir), "--config.train.progress=False",
                           "--config.mesh.num_devices=1", *extra], env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(workdir: Path, timeout: float = 120) -> None:
  """Until the run has logged its first step."""
  deadline = time.time() + timeout
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)


def one_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  assert len(lines) == 1, text
  return lines[0]


# ------------------------------------------------------------------------------------- lock

@pytest.mark.needs_data
def test_a_workdir_in_use_is_refused_naming_its_owner(tmp_path):
  """Failure 1: two processes on one work directory. The lock is per open file, so a lock held
  by this test process blocks a run in the same process just as another process would."""
  with workdir_lib.WorkdirLock(tmp_path, log=lambda *_: None):
    with pytest.raises(WorkdirBusy, match=rf"in use by pid {os.getpid()} on host"):
      train(tmp_path)
    assert workdir_lib.lock_holder(tmp_path)["pid"] == os.getpid()
  assert not (tmp_path / "config.json").exists()  # refused before writing anything
  assert workdir_lib.lock_holder(tmp_path) is None
  summary = train(tmp_path, **{"train.steps": 4})  # free again
  assert summary["step"] == 4 and (tmp_path / "lock").read_text() == ""  # released


@pytest.mark.needs_data
def test_a_second_cli_process_exits_2_and_a_killed_owners_lock_is_taken_over(tmp_path):
  proc = _start(tmp_path, "--config.train.steps=100000")
  try:
    _wait_for_training(tmp_path)
    second = cli_run(tmp_path, "--config.train.steps=100000", check=False)
    assert second.returncode == 2
    line = one_line(second.stderr)
    assert f"in use by pid {proc.pid} on host" in line and f"run {SPEC}" in line
  finally:
    proc.kill()
    proc.communicate()
  log = []
  Trainer(smoke(**{"train.steps": 4}), tmp_path, log=log.append, restart=True).run()
  assert any(f"taking over the lock of {tmp_path} from pid {proc.pid}" in l for l in log)


def test_lock_file_in_a_path_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(RunError, match="is a file, not a directory"):
    workdir_lib.WorkdirLock(tmp_path / "f" / "run").acquire()


# ------------------------------------------------------------------------- changed configs

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished smoke run (12 steps)."""
  workdir = tmp_path_factory.mktemp("finished")
  train(workdir)
  return workdir


def copy_run(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  (dst / "lock").write_text("")
  return dst


@pytest.mark.needs_data
def test_a_finished_run_refuses_a_changed_config_with_old_and_new_values(finished):
  """Failure 3: a finished run asked for another lr used to say 'nothing to do'."""
  with pytest.raises(RunError) as e:
    train(finished, **{"train.lr": 3e-4, "model.num_layers": 3})
  msg = str(e.value)
  assert "\n" not in msg and "--restart" in msg
  assert "model.num_layers 2 -> 3" in msg and "train.lr 0.001 -> 0.0003" in msg


@pytest.mark.needs_data
def test_restart_discards_the_run_and_more_steps_extend_it(finished, tmp_path):
  work = copy_run(finished, tmp_path / "run")
  old = json.loads((work / "summary.json").read_text())
  log = []
  summary = Trainer(smoke(**{"train.lr": 3e-4}), work, log=log.append, restart=True).run()
  assert any("restart: removed" in l for l in log)
  assert summary["valid_loss"] != old["valid_loss"]
  assert json.loads((work / "config.json").read_text())["config"]["train"]["lr"] == 3e-4
  log = []
  summary = train(work, log, **{"train.lr": 3e-4, "train.steps": 18})
  assert any("extending the run from train.steps=12 to 18" in l and "schedule is recomputed" in l
             for l in log)
  assert any("resumed from step 12" in l for l in log) and summary["step"] == 18
  steps = [(r["split"], r["step"]) for r in rows(work)]
  assert steps == sorted(set(steps), key=steps.index)  # each row once
  history = json.loads((work / "config.json").read_text())["history"]
  assert "train.steps=12 to 18" in history[-1]["change"]
  with pytest.raises(RunError, match="trained to step 18; train.steps=12 would not extend it"):
    train(work, **{"train.lr": 3e-4})


@pytest.mark.needs_data
def test_a_run_that_stored_every_options_settings_still_resumes_and_loads(finished, tmp_path):
  """Runs from before resolved configs dropped the settings of unselected options hold them
  all in config.json (here with a value of their own): such a run extends and loads."""
  from research.infer import load_run  # pylint: disable=import-outside-toplevel
  work = copy_run(finished, tmp_path / "run")
  path = work / "config.json"
  stored = json.loads(path.read_text())
  full = run_config.expand(stored["config"])
  full.model.channel.moe.num_experts = 64
  assert "moe" not in stored["config"]["model"]["channel"]  # what runs store now
  stored["config"] = full.to_dict()
  path.write_text(json.dumps(stored))
  log = []
  summary = train(work, log, **{"train.steps": 14})
  assert any("resumed from step 12" in l for l in log) and summary["step"] == 14
  assert load_run(work).step == 14


def test_resume_plan_allows_logging_changes_and_ignores_where_the_data_is(tmp_path):
  c = run_config.resolve(smoke()).to_dict()
  (tmp_path / "config.json").write_text(json.dumps({"config": c}))
  changed = json.loads(json.dumps(c))
  changed["train"]["log_every"] = 2
  changed["eval"]["every"] = 3
  changed["data"]["data_dir"] = "/elsewhere"
  changed["model"]["attention"]["impl"] = "xla"  # a run begun with the CPU kernel (auto)
  action, note = workdir_lib.plan(tmp_path, changed)
  assert action == "resume" and "train.log_every 4 -> 2" in note and "data_dir" not in note
  assert "model.attention.impl 'auto' -> 'xla'" in note
  changed["train"]["b2"] = 0.95
  with pytest.raises(RunError, match=r"train.b2 0.99 -> 0.95; pass --restart"):
    workdir_lib.plan(tmp_path, changed)


# ------------------------------------------------------------------------------ resume

@pytest.mark.needs_data
def test_a_run_killed_after_its_last_checkpoint_finishes_with_its_evaluation(finished, tmp_path):
  """Killed after the final checkpoint, before summary.json: the re-run used to write a
  'finished' summary with valid loss NaN, which reports counted as diverged."""
  work = copy_run(finished, tmp_path / "run")
  (work / "summary.json").unlink()
  before = rows(work)
  summary = train(work)
  expected = json.loads((finished / "summary.json").read_text())
  assert summary["valid_loss"] == expected["valid_loss"] and not summary["diverged"]
  assert rows(work) == before  # nothing logged twice, nothing lost


@pytest.mark.needs_data
def test_metrics_of_a_run_killed_before_its_first_checkpoint_start_over(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 9.0}\n{"spl')
  train(tmp_path, **{"train.steps": 4})
  assert [r["step"] for r in rows(tmp_path) if r["split"] == "train"] == [1, 4]
  assert rows(tmp_path)[0]["loss"] != 9.0


# --------------------------------------------------------------------- values and divergence

@pytest.mark.parametrize("key,value,message", [
    ("train.steps", -5, "train.steps=-5 must be >= 1"),
    ("train.lr", -0.1, "train.lr=-0.1 must be > 0"),
    ("train.log_every", 0, "train.log_every=0 must be >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be >= 1"),
    ("eval.every", 0, "eval.every=0 must be >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be >= 1"),
    ("train.schedule", "cosin",
     "train.schedule='cosin' is not one of constant, cosine, linear, wsd, step, inverse_time"),
    ("train.precision", "fp16", "train.precision='fp16' is not one of auto, fp32, bf16"),
    ("train.warmup_steps", 50, "train.warmup_steps=50 exceeds train.steps=12"),
    ("data.passkey_mix", 1.0, r"data.passkey_mix=1.0 must be in \[0, 1\)"),
    ("train.b2", 1.0, r"train.b2=1.0 must be in \[0, 1\)"),
])
def test_values_out_of_range_are_one_line_config_errors(key, value, message):
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    run_config.resolve(smoke(**{key: value}))
  assert "\n" not in str(e.value)


@pytest.mark.needs_data
def test_a_diverged_run_says_so_and_exits_3(tmp_path, capsys):
  """Failure 4: lr 1000 used to end 'done: ... valid loss inf' with exit 0."""
  code = cli.main(["run", SPEC, "--workdir", str(tmp_path), "--config.train.progress=False",
                   "--config.mesh.num_devices=1", "--config.train.lr=1000"])
  out, err = capsys.readouterr()
  assert code == cli.EXIT_DIVERGED == 3
  assert "diverged" in [l for l in out.splitlines() if l.strip()][-1]
  assert "the run diverged at step" in one_line(err)
  assert json.loads((tmp_path / "summary.json").read_text())["diverged"] is True


# ------------------------------------------------------------------- errors from Python

@pytest.mark.needs_data
def test_python_entry_points_raise_the_typed_one_line_errors_of_the_cli(tmp_path):
  """Failure 6: the library raises what the CLI prints (research.errors), one line each."""
  from research.infer import Engine
  from research.model import create_model
  from research.sweep import run_sweep
  calls = {
      "unknown experiment": lambda: experiments.get_config("baselin"),
      "unknown key": lambda: experiments.get_config(SPEC, {"train.lrr": 1.0}),
      "value out of range": lambda: Trainer(smoke(**{"train.steps": 0}), tmp_path / "a").run(),
      "mesh": lambda: Trainer(smoke(**{"mesh.num_devices": 0, "mesh.preset": "fsdp_tp",
                                       "mesh.tensor": 3}), tmp_path / "b").build(),
      "validation split too small": lambda: Trainer(
          smoke(**{"eval.batches": 10 ** 6}), tmp_path / "c").build(),
      "bad sweep override": lambda: run_sweep("baseline", group="lr", arg="scale=smoke",
                                              runs_dir=tmp_path, overrides={"train.lr": 5e-3}),
      "sweep without seeds": lambda: run_sweep("baseline", group="lr", seeds=0, runs_dir=tmp_path),
      "sweep with a bad argument": lambda: run_sweep("baseline", group="lr", arg="scale=huge",
                                                     runs_dir=tmp_path),
  }
  for what, call in calls.items():
    with pytest.raises(ResearchError) as e:
      call()
    assert "\n" not in str(e.value), what
  c = run_config.resolve(smoke())
  c.model.vocab_size = 65
  engine = Engine(create_model(c.model), max_len=16)
  for bad in ([[1, 2, 65]], [[-1, 3]]):
    with pytest.raises(ResearchError, match=r"token ids must be in 0..64"):
      engine.prefill(np.asarray(bad))


def test_default_workdir_names_the_overrides():
  base = cli._default_workdir("baseline:scale=smoke")
  assert base.as_posix() == "runs/baseline/scale-smoke"
  lr = cli._default_workdir("baseline:scale=smoke", {"train.lr": "3e-4", "data.data_dir": "/d"})
  assert lr.as_posix() == "runs/baseline/scale-smoke_train.lr-3e-4"
  long = cli._default_workdir("baseline", {f"model.k{i}": "x" * 20 for i in range(10)})
  assert len(long.name) <= 120


# ------------------------------------------------------------------------------ signals



@pytest.mark.needs_data
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
  proc = _start(tmp_path, "--config.train.steps=100000", "--config.train.checkpoint_every=1000")
  _wait_for_training(tmp_path)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  step = int(out.split("interrupted at step ")[1].split(":")[0])
  assert (tmp_path / "checkpoints" / str(step)).is_dir() and "Traceback" not in err


@pytest.mark.needs_data
@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_ctrl_c_during_start_up_exits_130_cleanly(tmp_path, delay):
  """Ctrl-C 0-3 s after config.json appears used to crash (SIGSEGV) or be swallowed."""
  proc = _start(tmp_path)
  deadline = time.time() + 120
  while not (tmp_path / "config.json").exists() and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "Traceback" not in err and not (tmp_path / "summary.json").exists()


# --------------------------------------------------------------------------- fault injection

def _step_dirs(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.needs_data
def test_a_half_written_checkpoint_is_ignored(finished, tmp_path):
  """A kill during a checkpoint write leaves the step in orbax's temporary directory."""
  work = copy_run(finished, tmp_path / "run")
  (work / "summary.json").unlink()
  shutil.copytree(work / "checkpoints" / "12", work / "checkpoints" / "18.orbax-checkpoint-tmp-1")
  for f in (work / "checkpoints" / "18.orbax-checkpoint-tmp-1").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])  # cut short
  log = []
  summary = train(work, log, **{"train.steps": 18})
  assert any("resumed from step 12" in l for l in log) and summary["step"] == 18


@pytest.mark.needs_data
def test_a_corrupted_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path):
  work = copy_run(finished, tmp_path / "run")
  (work / "summary.json").unlink()
  assert _step_dirs(work) == [6, 12]
  for f in (work / "checkpoints" / "12" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0" * 64)  # the newest step's arrays are garbage
  log = []
  summary = train(work, log)
  assert any("warning: checkpoint 12" in l and "cannot be read" in l for l in log), log
  assert any("resumed from step 6" in l for l in log)
  assert (work / "corrupt_checkpoints" / "12").is_dir()
  expected = json.loads((finished / "summary.json").read_text())
  assert summary["valid_loss"] == expected["valid_loss"]  # redone from step 6, the same run
  # with no readable checkpoint at all: a clear error
  (work / "summary.json").unlink()
  for f in (work / "checkpoints").rglob("*"):
    if f.is_file() and f.parent.name != "checkpoints":
      f.write_bytes(b"\0" * 64)
  p = cli_run(work, check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "no checkpoint in" in p.stderr and "--restart" in p.stderr


@pytest.mark.needs_data
def test_a_checkpoint_write_the_disk_refuses_stops_the_run_and_loses_nothing(finished, tmp_path):
  """A full disk: here the file-size limit (RLIMIT_FSIZE) makes the file system refuse the
  checkpoint's writes (EFBIG, as ENOSPC would be). The run exits 1 naming the step whose write
  failed; the checkpoint before it is intact, and a re-run resumes from it to the same end."""
  work = copy_run(finished, tmp_path / "run")
  (work / "summary.json").unlink()
  shutil.rmtree(work / "checkpoints" / "12")
  workdir_lib.cut_metrics(work / "metrics.jsonl", 6)
  # The limit lets the run write what it writes before the checkpoint (metrics.jsonl, config.json)
  # and refuses the checkpoint's metadata file: how orbax splits the arrays into data files
  # varies from write to write (one file of 320 KB or several smaller ones), the metadata not.
  before = max((finished / name).stat().st_size for name in ("metrics.jsonl", "config.json"))
  limit = (before + 4096) // 1024 * 1024 + 1024
  metadata = max(f.stat().st_size for f in (work / "checkpoints" / "6").rglob("_METADATA"))
  assert limit < metadata, (limit, metadata)

  # bash sets the limit (in KiB) and ignores SIGXFSZ, so writes fail with EFBIG instead of
  # killing the process; exec keeps both for the run
  p = cli_run(work, check=False, prefix=["bash", "-c", f"ulimit -f {limit // 1024}; "
                                         "trap '' XFSZ; exec \"$@\"", "bash"])
  assert p.returncode == 1, p.stdout + p.stderr
  line = one_line(p.stderr)
  assert "checkpoint write of step 12" in line and "Traceback" not in p.stderr
  assert _step_dirs(work) == [6]  # nothing lost before it
  cli_run(work)  # no limit: resumes from 6
  assert json.loads((work / "summary.json").read_text())["valid_loss"] == json.loads(
      (finished / "summary.json").read_text())["valid_loss"]


# ------------------------------------------------------------------------------- sweeps

@pytest.mark.needs_data
def test_sweep_extends_finished_arms_and_skips_busy_ones(tmp_path):
  """A finished sweep re-run with more steps used to skip every arm (and record the new steps
  for runs trained to the old ones); an arm another process holds is left to it."""
  from research.sweep import run_sweep
  args = dict(group="lr", arg="scale=smoke,corpus=tinyshakespeare", arms=["lr=1e-3"], seeds=2,
              runs_dir=tmp_path, overrides=dict(QUIET))
  run_sweep("baseline", **args, log=lambda *_: None)
  arm = tmp_path / "baseline" / "lr" / "lr=1e-3"
  log = []
  with workdir_lib.WorkdirLock(arm / "seed1", log=lambda *_: None):
    run_sweep("baseline", **{**args, "overrides": {**QUIET, "train.steps": 16}}, log=log.append)
  assert any("extending the run from train.steps=12 to 16" in l for l in log)
  assert json.loads((arm / "seed0" / "summary.json").read_text())["step"] == 16
  assert any("seed 1: skipped" in l and "in use by pid" in l for l in log)
  assert json.loads((arm / "seed1" / "summary.json").read_text())["step"] == 12  # left alone
  manifest = json.loads((tmp_path / "baseline" / "lr" / "manifest.json").read_text())
  status = {(e["arm"], e["seed"]): e["status"] for e in manifest["arms"]}
  assert status[("lr=1e-3", 0)] == "done" and status[("lr=1e-3", 1)] == "busy"
  # a config that differs in more than steps is refused before anything trains
  with pytest.raises(RunError, match=r"arm lr=1e-3 seed 0: .* train.b2 0.99 -> 0.9;"):
    run_sweep("baseline", **{**args, "overrides": {**QUIET, "train.b2": 0.9}})


@pytest.mark.needs_data
def test_end_of_run_evaluators_are_declared_in_the_config(finished, tmp_path):
  """The default evaluators write layer_cosine into the summary; a config without them does
  not (and a run that names them differently is another run)."""
  summary = json.loads((finished / "summary.json").read_text())
  layers = json.loads((finished / "config.json").read_text())["config"]["model"]["num_layers"]
  assert len(summary["layer_cosine"]) == layers
  assert "layer_cosine" not in train(tmp_path / "none", **{"eval.evaluators": ""})
