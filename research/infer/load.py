"""A trained run's model for inference: its config.json and the parameters of its orbax checkpoint.

  run = load_run("runs/flexprefill/train/dense/seed0")          # latest checkpoint
  sparse = with_overrides(run.model, {"model.attention.prefill": "flexprefill"})

The checkpoint holds the trainer's whole state (step, params, other, opt_state); only the step
and the model's variables are read (research/checkpoint.py: restore_model_state, read-only),
against the abstract model rebuilt from the saved config, so nothing is allocated twice and
nothing is written. The evaluators read runs through this too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import config as config_lib
from research import run_config
from research.model import abstract_model, compute_dtype
from research.model import options as model_options
from research.model.lm import DecoderLM
from research.checkpoint import CheckpointError, restore_model_state


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
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  built = {}

  def abstract(step: int):
    # a checkpoint after a width expansion (train.expand) holds the grown model
    built["config"] = config_lib.grown_config(c) if config_lib.grown_at(c, step) else c
    graphdef, params, other = nnx.split(abstract_model(built["config"].model, dtype),
                                        nnx.Param, ...)
    built["graphdef"] = graphdef
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "other": other}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)

  step, state = restore_model_state(workdir / "checkpoints", abstract, step)
  model = nnx.merge(built["graphdef"], state["params"], state["other"])
  return LoadedRun(config=built["config"], model=model, step=step, workdir=workdir)


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
