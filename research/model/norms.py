"""Normalization layers and the norm-placement family (`model.norm.kind`).

A placement decides, for each sublayer of each block, where the normalization sits relative to
the residual connection. Four modes cover every placement here (N = RMSNorm, f = sublayer):

  none      x <- x + f(x)
  pre       x <- x + f(N(x))          (GPT-2 / LLaMA)
  post      x <- N(x + f(x))          (original Transformer)
  normskip  x <- N(x) + f(N(x))       (the skip carries the normalized value; HybridNorm's FFN)

A placement kind is a pair (attention mode, channel mode), possibly per layer, plus the norms it
puts inside attention (`attention_norms`: letters of q, k, v, c = context before W_O). The
HybridNorm paper (Zhuo et al. 2025, Table 6 and App. G) names its variants this way:

  kind             attention, channel      attention norms   paper name
  pre              pre, pre                                  Pre-Norm (Pre-#-Pre with norms)
  post             post, post                                Post-Norm
  pre_post         pre, normskip                             Pre-Post (Pre-#-Post with norms)
  post_pre         normskip, pre                             Post-Pre
  hybrid_post      none, normskip          (from config)     #-Post, e.g. QK-Post, KV-Post
  hybrid_pre       none, pre               (from config)     #-Pre, e.g. QKV-Pre
  hybridnorm       none, normskip          qkv               HybridNorm = QKV-Post, eqs. (5)-(6)
  hybridnorm_star  block 0: pre, pre;      qkv               HybridNorm*, eq. (7)
                   others as hybridnorm

A placement wraps one sublayer. It receives the residual stream, the sublayer function and the
residual connection, so residual options (hyper-connections) and norm options compose without
knowing each other.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.option import Option
from research.model.registry import Registry


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


SUBLAYERS = ("attn", "channel")
MODES = ("none", "pre", "post", "normskip")


class Placement(Option):
  """Base of the placement options (`model.norm.kind`). Hooks: `modes(layer)`, (attention
  mode, channel mode) of block `layer`; `attention_norms`, the norms the placement puts inside
  attention (merged by run_config.resolve); `final_norm`, whether the decoder needs a norm after
  the last block."""

  HOOKS = ("modes", "attention_norms", "final_norm")

  attention_norms = ""  # norms this placement puts inside attention (merged by run_config.resolve)
  final_norm = True  # whether the decoder needs a norm after the last block

  @classmethod
  def modes(cls, layer: int) -> tuple[str, str]:
    raise NotImplementedError

  def __init__(self, dim: int, *, cfg, layer: int, sublayer: str, dtype, rngs: nnx.Rngs):
    del rngs
    if sublayer not in SUBLAYERS:
      raise ValueError(f"sublayer '{sublayer}' is not one of {', '.join(SUBLAYERS)}")
    self.mode = self.modes(layer)[SUBLAYERS.index(sublayer)]
    self.norm = (RMSNorm(dim, eps=cfg.norm_eps, dtype=dtype) if self.mode != "none" else None)

  def __call__(self, stream, sublayer: Callable, residual: Callable):
    mode, norm = self.mode, self.norm
    if mode == "none":
      return residual(stream, sublayer)
    if mode == "pre":
      return residual(stream, lambda x: sublayer(norm(x)))
    if mode == "post":
      return norm(residual(stream, sublayer))
    return residual(norm(stream), sublayer)  # normskip: HybridNorm eq. (6), N(Y) + FFN(N(Y))


NORM_PLACEMENTS = Registry("model.norm.kind", base=Placement, default="pre")


def _same_in_every_block(kind: str, attn: str, channel: str, *, attention_norms: str = "",
                         final_norm: bool = True) -> type[Placement]:
  """Registers the placement `kind` whose modes do not depend on the layer."""
  cls = type(f"Placement_{kind}", (Placement,), dict(
      modes=classmethod(lambda cls, layer: (attn, channel)),
      attention_norms=attention_norms, final_norm=final_norm))
  return NORM_PLACEMENTS.register(kind)(cls)


PreNorm = _same_in_every_block("pre", "pre", "pre")
# Post-norm leaves every block's output normalized: no final norm.
PostNorm = _same_in_every_block("post", "post", "post", final_norm=False)
_same_in_every_block("pre_post", "pre", "normskip")
_same_in_every_block("post_pre", "normskip", "pre")
_same_in_every_block("hybrid_post", "none", "normskip")
_same_in_every_block("hybrid_pre", "none", "pre")
# HybridNorm, eqs. (5)-(6): Y = MHA_QKV(X) + X;  X' = FFN(N(Y)) + N(Y).
HybridNorm = _same_in_every_block("hybridnorm", "none", "normskip", attention_norms="qkv")


@NORM_PLACEMENTS.register("hybridnorm_star")
class HybridNormStar(Placement):
  """HybridNorm*, eq. (7): block 0 is pre-norm in both sublayers (keeping QKV-norm),
  Y = MHA_QKV(N(X)) + X, X' = FFN(N(Y)) + Y; every other block is HybridNorm."""

  attention_norms = "qkv"

  @classmethod
  def modes(cls, layer):
    return ("pre", "pre") if layer == 0 else ("none", "normskip")
