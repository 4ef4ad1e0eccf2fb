"""Checkpoint merging in pre-training (PMA, arXiv:2505.12082 §3): the weighted average of a
run's last N checkpoints, spaced V steps apart, M_avg = sum_i w_i M_i over every weight.

  research merge W --method sma --last 10 --every 100            # ends at W's newest checkpoint
  research merge W --method ema --alpha 0.2 --last 6 --every 50 --step 2500 --eval

Weights, oldest checkpoint first (i = 1..N):
  sma  w_i = 1 / N
  wma  w_i = i / sum_j j                               (linearly increasing)
  ema  the recursion M^(1) = M_1, M^(i) = alpha M_i + (1 - alpha) M^(i-1): w_1 = (1 - alpha)^(N-1),
       w_i = alpha (1 - alpha)^(N-i) for i >= 2 (they sum to 1; the paper's closed form omits
       the oldest checkpoint's remaining mass, see the digest's pitfalls)

The merge reads each checkpoint's model variables read-only (research/checkpoint.py), averages
the floating-point ones in fp32 (integer buffers are the newest checkpoint's) and writes a run
directory: config.json (the source run's), merge.json (method, steps, weights) and
checkpoints/<S>/ holding {step, params, other}, no optimizer state; so research.infer.load_run
and the evaluators read a merged model as they read any run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from research.errors import ResearchError
from research.train.workdir import checkpoint_steps

METHODS = ("sma", "ema", "wma")


class MergeError(ResearchError, ValueError):
  """A merge that cannot be made: unknown method, missing checkpoints, bad counts."""


def merge_weights(method: str, n: int, alpha: float = 0.2) -> list[float]:
  """The N weights of `method`, oldest checkpoint first (module docstring)."""
  if method not in METHODS:
    raise MergeError(f"unknown merge method '{method}' (choose one of {', '.join(METHODS)})")
  if n < 1:
    raise MergeError(f"a merge needs at least one checkpoint, got last={n}")
  if method == "sma":
    return [1.0 / n] * n
  if method == "wma":
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]
  if not 0.0 < alpha <= 1.0:
    raise MergeError(f"ema needs 0 < alpha <= 1, got {alpha}")
  return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def merge_trees(trees: list, weights: list[float]):
  """sum_i weights[i] trees[i] leaf by leaf, in fp32, cast back to each leaf's dtype; integer
  and boolean leaves are taken from the last tree (the newest checkpoint)."""
  if len(trees) != len(weights):
    raise MergeError(f"{len(trees)} checkpoints but {len(weights)} weights")

  def combine(*leaves):
    if not jnp.issubdtype(leaves[-1].dtype, jnp.floating):
      return leaves[-1]
    total = sum(w * jnp.asarray(x, jnp.float32) for w, x in zip(weights, leaves))
    return total.astype(leaves[-1].dtype)

  return jax.tree.map(combine, *trees)


def window_steps(available: list[int], last: int, every: int, step: int | None) -> list[int]:
  """[S - (N-1) V, ..., S - V, S] (S: `step`, default the newest available); every one must
  be a checkpoint of the run."""
  if not available:
    raise MergeError("the run holds no checkpoint")
  if every < 1:
    raise MergeError(f"--every must be a positive number of steps, got {every}")
  end = max(available) if step is None else step
  steps = [end - k * every for k in range(last - 1, -1, -1)]
  missing = [s for s in steps if s not in available]
  if missing:
    raise MergeError(f"checkpoints {missing} are not in the run (it keeps {sorted(available)}); "
                     "save every V steps and keep N of them (train.checkpoint_every, "
                     "train.keep_checkpoints)")
  return steps


class RunCheckpoints:
  """A run's checkpoints, read one at a time (read-only, model variables only) against one
  abstract model built from its config.json, through one read-only checkpoint manager (a
  context manager: closed on exit, or by close())."""

  def __init__(self, workdir: str | Path):
    # pylint: disable=import-outside-toplevel
    from research.checkpoint import read_only_manager, restore_model_state
    from research.infer.load import saved_config
    from research.model import abstract_model, compute_dtype
    self.workdir = Path(workdir)
    self.config = saved_config(self.workdir)
    model = abstract_model(self.config.model, compute_dtype(self.config.train.precision))
    self.graphdef, params, other = nnx.split(model, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "other": other}
    self._abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    self._restore = restore_model_state
    self._manager = read_only_manager(self.workdir / "checkpoints")

  def steps(self) -> list[int]:
    return checkpoint_steps(self.workdir)

  def variables(self, step: int) -> tuple:
    """(params, other) of checkpoint `step`."""
    _, state = self._restore(self.workdir / "checkpoints", self._abstract, step,
                             manager=self._manager)
    return state["params"], state["other"]

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "RunCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def merge_run(workdir: str | Path, *, method: str, last: int, every: int,
              step: int | None = None, alpha: float = 0.2,
              out: str | Path | None = None) -> Path:
  """Merges the run in `workdir` (module docstring) into the run directory `out` (default
  W/merged/<method>_n<N>_v<V>_s<S>) and returns it."""
  workdir = Path(workdir)
  weights = merge_weights(method, last, alpha)
  steps = window_steps(checkpoint_steps(workdir), last, every, step)
  with RunCheckpoints(workdir) as run:
    params, other = merge_trees([run.variables(s) for s in steps], weights)
  tag = f"{method}{'' if method != 'ema' else f'{alpha:g}'}_n{last}_v{every}_s{steps[-1]}"
  out = Path(out) if out is not None else workdir / "merged" / tag
  _check_output(out, workdir)
  if out.exists():  # a previous merge's directory (it holds merge.json): replaced
    shutil.rmtree(out)
  out.mkdir(parents=True)
  shutil.copy(workdir / "config.json", out / "config.json")
  state = {"step": jnp.asarray(steps[-1], jnp.int32), "params": params, "other": other}
  manager = ocp.CheckpointManager((out / "checkpoints").absolute(), item_names=("state",))
  manager.save(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  (out / "merge.json").write_text(json.dumps(
      {"source": str(workdir.absolute()), "method": method, "alpha": alpha if method == "ema"
       else None, "last": last, "every": every, "steps": steps,
       "weights": [float(np.float64(w)) for w in weights]}, indent=2) + "\n")
  return out


def _check_output(out: Path, workdir: Path) -> None:
  """A merge writes only a new directory or replaces an earlier merge's: never the source
  run, its checkpoints, or a directory holding anything else."""
  src, dst = workdir.resolve(), out.resolve()
  if dst == src or src in dst.parents and dst.parent != src / "merged" or dst in src.parents:
    raise MergeError(f"--out {out} is the source run, inside it or above it; pick a new "
                     f"directory (default: {workdir / 'merged'}/<tag>)")
  if dst.exists() and any(dst.iterdir()) and not (dst / "merge.json").is_file():
    raise MergeError(f"--out {out} exists and does not hold an earlier merge (no merge.json); "
                     "it is not overwritten")


def validation_loss(run_dir: str | Path, step: int | None = None,
                    overrides: dict | None = None) -> float:
  """The run's validation loss (nats/token) at checkpoint `step` on the fixed validation
  batches its config defines: the number its training log reports at an evaluation."""
  # pylint: disable=import-outside-toplevel
  from research import data as data_lib
  from research.eval import lm_eval
  from research.infer.load import load_run
  run = load_run(run_dir, step=step, overrides=overrides)
  graphdef, params, other = nnx.split(run.model, nnx.Param, ...)
  return lm_eval.evaluate(lm_eval.make_eval_step(graphdef), params, other,
                          data_lib.validation_batches(run.config))
