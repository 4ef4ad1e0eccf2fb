"""Normalization layers and the norm-placement family (`model.norm.kind`).

A placement decides where a sublayer's normalization sits relative to the residual connection:

  pre   x <- x + f(norm(x))          (GPT-2 / LLaMA)
  post  x <- norm(x + f(x))          (original Transformer)

A placement wraps one sublayer (attention or channel mixer). It receives the residual stream,
the sublayer function and the residual connection, so residual options (hyper-connections) and
norm options compose without knowing each other.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.registry import Registry

NORM_PLACEMENTS = Registry("model.norm.kind")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """y = x / sqrt(mean(x^2) + eps) * g over the last axis, in fp32 (Zhang & Sennrich 2019, eq. 4).

  The backward is written by hand: autodiff of the three-line forward emits several passes
  over x (square, mean, rsqrt chain, broadcasts), ours one reduction and one fused elementwise
  pass. With r = rsqrt(mean(x^2) + eps) and n = x.shape[-1]:
    dx = r * (g dy) - x * r^3 * mean(x * g dy),   dg = sum over rows of dy * x * r.
  """
  return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale_b = scale.reshape((1,) * (x.ndim - 1) + scale.shape)  # explicit rank, no promotion
  return x32 * inv * scale_b, (x, scale, inv)


def _rms_norm_bwd(eps, res, dy):
  del eps
  x, scale, inv = res
  x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
  gdy = dy32 * scale.reshape((1,) * (x.ndim - 1) + scale.shape)
  dx = inv * gdy - x32 * (inv * inv * inv) * jnp.mean(x32 * gdy, axis=-1, keepdims=True)
  dscale = jnp.sum((dy32 * x32 * inv).reshape(-1, x.shape[-1]), axis=0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * g, statistics in fp32 (Zhang & Sennrich 2019, eq. 4)."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


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
