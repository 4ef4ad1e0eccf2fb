"""A trained run's model for inference: its config.json and the parameters of its orbax checkpoint.

  run = load_run("runs/flexprefill/train/dense/seed0")          # latest checkpoint
  sparse = with_overrides(run.model, {"model.attention.prefill": "flexprefill"})

The checkpoint holds the trainer's whole state (step, params, other, opt_state; see
research/train/checkpoint.py); it is read through a read-only manager against the abstract
state rebuilt from the saved config, so nothing is allocated twice and nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from research import config as config_lib

from research import run_config
from research.model import abstract_model, compute_dtype, lr_multipliers
from research.model import options as model_options
from research.model.lm import DecoderLM
from research.train.checkpoint import CheckpointError
from research.train.optim import make_optimizer


@dataclasses.dataclass
class LoadedRun:
  config: ml_collections.ConfigDict  # the run's resolved config (with any overrides)
  model: DecoderLM
  step: int
  workdir: Path


def saved_config(workdir: str | Path, overrides: dict[str, Any] | None = None):
  """The resolved config a run trained with (config.json), over today's defaults so settings
  added since (e.g. model.attention.prefill) and those of options it did not select read as
  their defaults; dotted overrides applied."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{workdir} has no config.json: not a run directory")
  c = run_config.expand(json.loads(path.read_text())["config"])
  config_lib.apply_overrides(c, overrides or {})
  return run_config.resolve(c)


def load_run(workdir: str | Path, *, step: int | None = None,
             overrides: dict[str, Any] | None = None) -> LoadedRun:
  """The model of a run at checkpoint `step` (default: the latest), on the default device.

  overrides: dotted config keys applied before the model is built; only keys that leave the
  parameters unchanged make sense (model.attention.prefill and flexprefill.*, say).
  """
  workdir = Path(workdir)
  c = saved_config(workdir, overrides)
  dtype = compute_dtype(c.train.precision)
  graphdef, params, other = nnx.split(abstract_model(c.model, dtype), nnx.Param, ...)
  tx, _ = make_optimizer(c.train, lr_multipliers(c.model, c.train.steps))  # as the trainer's
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "other": other,
              "opt_state": jax.eval_shape(tx.init, params)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  directory = (workdir / "checkpoints").absolute()
  try:
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise CheckpointError(f"{directory} holds no checkpoint")
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
      manager.close()
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types; all mean "cannot read this checkpoint"
    raise CheckpointError(f"cannot restore {directory} (step {step}): {e}") from e
  model = nnx.merge(graphdef, state["params"], state["other"])
  return LoadedRun(config=c, model=model, step=int(step), workdir=workdir)


def with_overrides(model: DecoderLM, overrides: dict[str, Any]) -> DecoderLM:
  """The same parameters under a model config with dotted `model.*` overrides (e.g. the
  prefill settings); overrides that change the parameters' shapes are an error."""
  bad = [k for k in overrides if not k.startswith("model.")]
  if bad:
    raise config_lib.ConfigError(f"with_overrides takes model.* keys only, got {', '.join(bad)}")
  root = run_config.expand({"model": model.cfg.to_dict()})  # unselected options' settings too
  config_lib.apply_overrides(root, overrides)
  root = ml_collections.ConfigDict(model_options.select(root.to_dict()))
  state = nnx.state(model)
  graphdef, abstract = nnx.split(abstract_model(root.model, model.dtype))
  same = jax.tree.structure(abstract) == jax.tree.structure(state) and all(
      a.shape == b.shape for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)))
  if not same:
    raise config_lib.ConfigError(f"overrides {sorted(overrides)} change the model's parameters")
  return nnx.merge(graphdef, state)
