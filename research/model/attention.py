"""Sequence-mixer family (`model.attention.kind`) and the attention op.

`dense` is softmax attention with RoPE, MHA or GQA (num_kv_heads < num_heads) and optional
norms inside (`model.attention.norms`, letters of "qkvc"): q, k and v are RMS-normalized per
head over head_dim with one gain shared by the heads, before RoPE (QK-norm, Dehghani et al.
2023; QKV-norm, HybridNorm eq. (4)); c normalizes the context (the heads' concatenated output)
over its full width before W_O (the C of HybridNorm Table 6, SDD's context norm). The core op `attention` dispatches on `impl`: `xla` is plain jnp (the reference); the
Pallas kernels add `pallas` and `auto` when they land in kernels_pallas/.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.config import ConfigError
from research.model.linear import make_linear
from research.model.norms import RMSNorm
from research.model.registry import Registry
from research.sharding import constrain

SEQUENCE_MIXERS = Registry("model.attention.kind")
ATTENTION_IMPLS = ("xla",)
ATTENTION_NORMS = "qkvc"


def check_attention_norms(norms: str) -> str:
  bad = sorted(set(norms) - set(ATTENTION_NORMS))
  if bad:
    raise ConfigError(f"model.attention.norms='{norms}' has unknown letters {''.join(bad)} "
                     f"(letters of {ATTENTION_NORMS}: q, k, v, c = context before W_O)")
  return norms


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half form (Su et al. 2021, eq. 34).

  x: [batch, seq, heads, head_dim]; positions: [batch, seq]. Pairs (i, i + head_dim/2) are
  rotated by the angle position * theta^(-2i/head_dim).
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs[None, None, None, :]  # [b, s, 1, half]
  return _rotate(x.astype(jnp.float32), jnp.sin(angles), jnp.cos(angles)).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, sin, cos):
  """Rotates the pairs (x1, x2) = split(x) by the angles whose sin and cos are given.

  A rotation's transpose is the rotation by the opposite angle, so the backward is the same
  single fused pass with -sin; autodiff of the split/concatenate instead emits pads, adds and
  a concatenate per input (measured ~0.6 ms of the tiny training step's 56 ms).
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x, sin, cos):
  return _rotate(x, sin, cos), (sin, cos)


def _rotate_bwd(res, dy):
  sin, cos = res
  # The angles come from integer positions: their cotangents are never used.
  return _rotate(dy, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def xla_attention(q, k, v, *, q_positions, k_positions, causal: bool = True):
  """softmax(q k^T / sqrt(d) + mask) v with GQA folding.

  q: [b, t, h, d]; k, v: [b, s, kv, d] with h = kv * g. Positions give the causal mask
  (key position <= query position), so offsets and decoding work unchanged.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
  if causal:
    mask = k_positions[:, None, None, None, :] <= q_positions[:, None, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def attention(q, k, v, *, q_positions, k_positions, causal: bool = True, impl: str = "xla"):
  if impl == "xla":
    return xla_attention(q, k, v, q_positions=q_positions, k_positions=k_positions,
                         causal=causal)
  raise ValueError(
      f"model.attention.impl='{impl}' is not available (available: {', '.join(ATTENTION_IMPLS)})")


@SEQUENCE_MIXERS.register("dense")
class DenseAttention(nnx.Module):
  """Causal multi-head (or grouped-query) self-attention."""

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    a = cfg.attention
    if a.impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention.impl='{a.impl}' is not available "
                       f"(available: {', '.join(ATTENTION_IMPLS)})")
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.theta, self.impl = a.rope_theta, a.impl
    d, hd, kvd = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.d_model = d
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.q = make_linear(cfg, d, hd, axes=("embed", "heads"), role="in", **lin)
    self.k = make_linear(cfg, d, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    self.v = make_linear(cfg, d, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    self.o = make_linear(cfg, hd, d, axes=("heads", "embed"), role="out", **lin)
    norms = check_attention_norms(a.norms)

    def norm(letter, dim):
      return RMSNorm(dim, eps=cfg.norm_eps, dtype=dtype) if letter in norms else None

    self.q_norm, self.k_norm, self.v_norm = (norm(x, cfg.head_dim) for x in "qkv")
    self.c_norm = norm("c", hd)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = constrain(q, ("batch", "seq", "act_heads", None))
    k = constrain(k, ("batch", "seq", "act_kv_heads", None))
    q, k, v = (x if n is None else n(x) for x, n in ((q, self.q_norm), (k, self.k_norm),
                                                     (v, self.v_norm)))
    q = rope(q, ctx.positions, self.theta)
    k = rope(k, ctx.positions, self.theta)
    out = attention(q, k, v, q_positions=ctx.positions, k_positions=ctx.positions, impl=self.impl)
    out = out.reshape(b, t, self.num_heads * self.head_dim)
    if self.c_norm is not None:
      out = self.c_norm(out)
    return self.o(out)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: projections plus q k^T and p v over the causal average
    of (seq_len + 1) / 2 keys."""
    hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    d = self.d_model
    proj = 2 * d * (2 * hd + 2 * kvd)
    core = 2 * 2 * hd * (seq_len + 1) / 2
    return proj + core
