"""The decoder and its composition points; `create_model` builds it with sharded parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research import sharding
from research.model.context import ForwardContext
from research.model.lm import DecoderLM, abstract_model, compute_dtype, count_params, model_summary
from research.model import ffn, memory, moe  # noqa: F401  (memory, moe register channel mixers)

__all__ = ["DecoderLM", "ForwardContext", "create_model", "param_shardings", "abstract_model",
           "compute_dtype", "count_params", "model_summary", "lr_multipliers"]


def lr_multipliers(cfg, steps: int) -> list:
  """Per-parameter lr multipliers the channel mixer asks for (research.train.optim)."""
  mixer = ffn.CHANNEL_MIXERS.get(cfg.channel.kind)
  return mixer.lr_multipliers(cfg, steps) if hasattr(mixer, "lr_multipliers") else []


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
  """Builds `DecoderLM(cfg)` with every parameter created directly in its sharding.

  The initializer runs under `jax.jit` with the parameters' shardings as `out_shardings`, so no
  device ever holds the full unsharded model. `cfg` is `config.model`, resolved.
  """
  mesh = mesh or sharding.make_mesh("dp", devices=jax.devices()[:1])
  graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype))
  shardings = param_shardings(abstract_state, mesh)

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(DecoderLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))

  with sharding.use_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
