"""Residual-stream family (`model.residual.kind`).

The decoder keeps a residual *stream*; each sublayer reads from it and writes back through a
residual connection. The plain option is the identity skip `x + f(x)`. Options with several
streams (hyper-connections, frac-connections, virtual width) widen the stream at `expand`,
mix it in `__call__`, and collapse it back to [batch, seq, embed] before the final norm.
One connection object exists per sublayer, so each can own its parameters.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from research.model.registry import Registry

RESIDUALS = Registry("model.residual.kind")


@RESIDUALS.register("plain")
class PlainResidual(nnx.Module):
  """h <- h + f(h)."""

  def __init__(self, dim: int, *, cfg, layer: int, dtype, rngs: nnx.Rngs):
    del dim, cfg, layer, dtype, rngs

  @staticmethod
  def expand(h: jax.Array, cfg) -> jax.Array:
    """[batch, seq, embed] embeddings -> the stream (identity here)."""
    return h

  @staticmethod
  def collapse(stream: jax.Array, cfg) -> jax.Array:
    """The stream -> [batch, seq, embed] for the final norm and head (identity here)."""
    return stream

  def __call__(self, stream: jax.Array, f: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return stream + f(stream)
