"""Two processes train as one: `mesh.distributed=true` over a loopback coordinator, 2 CPU
devices per process and gloo collectives, each process reading its own shard of the data; the
run ends with the parameters of one process training the same config over the same global mesh
(4 devices, data parallel)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from research.infer import load_run

pytestmark = pytest.mark.needs_data

STEPS = 8
RUN = [sys.executable, "-m", "research.cli", "run", "baseline:scale=smoke,corpus=tinyshakespeare",
       f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4",
       "--config.eval.every=4", "--config.train.log_every=2", "--config.train.progress=False"]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra)
  return env


# Gloo's connection report ("[Gloo] Rank 3 is connected to 3 peer ranks. Expected number of
# connected peer ranks is : 3"), which gloo's threads write piece by piece: two threads' reports
# can interleave into fragments on separate lines, so the pieces are removed wherever they fall.
_GLOO_PIECES = re.compile(r"\[Gloo\]|Rank|is connected to|peer ranks\.|Expected number of connected"
                          r" peer ranks is :|\d+|\s+")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(workdir: Path):
  """The last checkpoint's parameters, restored onto this process's first device (the
  two-process run's checkpoint spans devices of both processes)."""
  run = load_run(workdir)
  return run.step, jax.tree.leaves(nnx.state(run.model, nnx.Param))


def _valid(workdir: Path) -> list[float]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "valid"]


def test_two_processes_train_as_one(tmp_path):
  one = tmp_path / "one"
  p = subprocess.run(RUN + ["--workdir", str(one)], env=_env(4), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  two = tmp_path / "two"
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      RUN + ["--workdir", str(two), "--config.mesh.distributed=true"],
      env=_env(2, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [proc.communicate(timeout=600) for proc in procs]
  for proc, (out, err) in zip(procs, outs):
    assert proc.returncode == 0, out + err
  assert "data=4" in outs[0][0]  # one global mesh over both processes' devices
  ours = _GLOO_PIECES.sub("", outs[1][0])
  assert not ours, outs[1][0]  # process 1 trains silently; process 0 writes the run
  step_one, params_one = _params(one)
  step_two, params_two = _params(two)
  assert step_one == step_two == STEPS and len(params_one) == len(params_two) > 0
  for a, b in zip(params_one, params_two):
    # the same global batches, summed over the 4 devices in another grouping: fp32 rounding
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(_valid(one), _valid(two), rtol=1e-5)
