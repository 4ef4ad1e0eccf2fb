"""Normalization layers and the norm-placement family (`model.norm.kind`).

A placement decides where a sublayer's normalization sits relative to the residual connection:

  pre   x <- x + f(norm(x))          (GPT-2 / LLaMA)
  post  x <- norm(x + f(x))          (original Transformer)

A placement wraps one sublayer (attention or channel mixer). It receives the residual stream,
the sublayer function and the residual connection, so residual options (hyper-connections) and
norm options compose without knowing each other.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.registry import Registry

NORM_PLACEMENTS = Registry("model.norm.kind")


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * g, statistics in fp32 (Zhang & Sennrich 2019, eq. 4)."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), sharding_names=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(self.dtype)


@NORM_PLACEMENTS.register("pre")
class PreNorm(nnx.Module):

  def __init__(self, dim: int, *, cfg, dtype, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, eps=cfg.norm_eps, dtype=dtype)

  def __call__(self, stream, sublayer: Callable, residual: Callable):
    return residual(stream, lambda x: sublayer(self.norm(x)))

  def final_norm(self) -> bool:
    """Whether the decoder needs a norm after the last block (pre-norm leaves it unnormalized)."""
    return True


@NORM_PLACEMENTS.register("post")
class PostNorm(nnx.Module):

  def __init__(self, dim: int, *, cfg, dtype, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, eps=cfg.norm_eps, dtype=dtype)

  def __call__(self, stream, sublayer: Callable, residual: Callable):
    return self.norm(residual(stream, sublayer))

  def final_norm(self) -> bool:
    return False
