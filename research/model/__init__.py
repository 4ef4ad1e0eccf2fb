"""The decoder and its composition points; `create_model` builds it with sharded parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research import sharding
from research.model.context import ForwardContext
from research.model.lm import DecoderLM, abstract_model, compute_dtype, count_params, model_summary
from research.model import ffn
from research.model import options  # noqa: F401  (imports every family file: registers every option)

__all__ = ["DecoderLM", "ForwardContext", "create_model", "param_shardings", "abstract_model",
           "compute_dtype", "count_params", "model_summary", "lr_multipliers"]


def lr_multipliers(cfg, steps: int) -> list:
  """Per-parameter lr multipliers the channel mixer asks for (research.train.optim)."""
  mixer = ffn.CHANNEL_MIXERS.get(cfg.channel.kind)
  return mixer.lr_multipliers(cfg, steps)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh):
  """NamedShardings for a model state (a prefix tree of it), from each variable's logical axes."""
  def one(var):
    value = var.get_value()
    logical = var.get_metadata().get("out_sharding")
    return sharding.named_sharding(logical, value.shape, mesh)
  return jax.tree.map(one, state, is_leaf=_is_var)


def create_model(cfg, *, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 dtype=jnp.float32) -> DecoderLM:
  """Builds `DecoderLM(cfg)` and places every parameter in its sharding on `mesh`.

  The parameters are created one at a time, each by its own initializer on this process's
  first device, and moved to their shardings as they are made (`jax.device_put`): jax compiles
  an initializer once per distinct shape, so start-up does not grow with depth. One jitted
  program for the whole initializer (the form before 2026-12-04) unrolls the random-number
  generator of every parameter into one program: 1021 fusions for the 124M model, compiled in
  ~20 s on a 2-core CPU and minutes on a GPU. The random bits are the same; values differ from
  that form's by float rounding of the normal transform (at most 7e-9 at the tiny scale), so
  a run started before then is the same experiment, not a bit-identical one. No device ever
  holds more than one unsharded parameter. `cfg` is `config.model`, resolved.
  """
  mesh = mesh or sharding.make_mesh("dp", devices=jax.devices()[:1])
  with nnx.use_eager_sharding(False), jax.default_device(jax.local_devices()[0]):
    model = DecoderLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  shardings = param_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  return nnx.merge(graphdef, state)
