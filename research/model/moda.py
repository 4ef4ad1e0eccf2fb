"""Mixture-of-depths attention (MoDA; Zhu et al. 2026, arXiv 2603.15619) as a sequence mixer.

`model.attention.kind = "moda"`: each attention head at token t attends, under one softmax, to
the causal sequence keys of its layer and to the *depth* keys/values written at the same token
t by earlier sublayers (sec. 2.2; the digest's eqs. of sec. 3.4):

  s_seq(u) = <q_t, k_u> / sqrt(d)  (u <= t),    s_dep(i) = <q_t, k^dep_{t,i}> / sqrt(d)
  [p_seq; p_dep] = softmax([s_seq; s_dep]),     o_t = sum_u p_seq(u) v_u + sum_i p_dep(i) v^dep_{t,i}

Writers of the depth stream (Table 3), chosen by `model.attention.moda`:
  * every attention sublayer writes its own sequence K/V (post-RoPE, post-norm): "depth KV";
  * `ffn_kv`: a K/V projection beside each FFN reads what the FFN reads and writes one more
    slot (the paper's default, S = 2b for block b);
  * `extra_attn_kv`: the attention writes K/V from a separate projection of its input instead
    of its sequence K/V (Table 3 row 5).

The depth stream lives in the forward context (its slot `DEPTH`) as two buffers (K, V), each
[slots written, batch, seq, kv_heads, head_dim]. Slot numbers are fixed by the layer index and
written in order, so a sublayer reads the whole buffer; the same code runs unrolled, under
remat, and when decoding: a token's depth K/V are produced and used in its own forward, so
decoding keeps no depth cache (Table 1: the decode-time depth state is per token only).
Layout, measured on the tiny CPU model (12 blocks, fwd+bwd of the model on one core): a
growing slot-major buffer (one concatenate per write) 543 ms; per-slot entries stacked by each
reader 688 ms (each slot's gradient is then a sum over its readers that XLA fuses with a
transpose and runs slowly); a preallocated buffer updated in place 659 ms; dense attention of
the same shape 374 ms.

Choices where the paper is silent (README of experiments/moda):
  * RoPE: reused sequence keys are post-RoPE; projected depth keys are rotated at their own
    position, so q and every depth key carry the same rotation and depth logits are
    position-free (the rotations cancel).
  * Norms: projected depth keys/values get their own k/v RMSNorm when the attention uses k/v
    norms (`model.attention.norms`), so depth and sequence logits share a scale.
  * The last block's FFN K/V projection has no reader and is omitted unless
    `moda.ffn_kv_last_block` (the 700M parameter count implies L - 1 projections; Table 6
    implies L).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.errors import ConfigError
from research.model.attention import SEQUENCE_MIXERS, DenseAttention, causal_mask, rope
from research.model.context import Slot
from research.model.linear import make_linear
from research.model.norms import RMSNorm

DEPTH = Slot("moda/depth")  # (k, v), each [slots, batch, seq, kv_heads, head_dim]
# xla and auto (the default): jnp (moda_xla) on every backend; pallas*: the Pallas kernels of
# kernels_pallas.moda, opt-in as for dense attention (research.model.attention.resolve_impl)
IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")


def slots_per_block(cfg) -> int:
  """Depth slots one block writes: its attention's K/V, plus the FFN side's when ffn_kv."""
  return 1 + int(cfg.attention.moda.ffn_kv)


def has_channel_writer(cfg, layer: int) -> bool:
  o = cfg.attention.moda
  return bool(o.ffn_kv) and (layer < cfg.num_layers - 1 or bool(o.ffn_kv_last_block))


def attention_slot(cfg, layer: int) -> int:
  return layer * slots_per_block(cfg)


def channel_slot(cfg, layer: int) -> int:
  return layer * slots_per_block(cfg) + 1


def total_slots(cfg) -> int:
  """Size of the depth buffer: every slot any block writes."""
  return cfg.num_layers * slots_per_block(cfg)


def write_depth(ctx, cfg, slot: int, k: jax.Array, v: jax.Array) -> None:
  """Appends one sublayer's per-token K/V ([b, t, kv_heads, d]) as depth slot `slot`.

  The stream is kept as two buffers [slots written, b, t, kv_heads, d], slot-major: slots are
  written in order, so a sublayer reads the whole buffer, and the gradient of the buffer
  flows back through one slice per write instead of one per (reader, slot) pair.
  """
  del cfg
  buf = ctx.read(DEPTH)
  written = 0 if buf is None else buf[0].shape[0]
  if slot != written:
    raise ValueError(f"MoDA depth slot {slot} written out of order ({written} slots so far)")
  if buf is None:
    ctx.write(DEPTH, (k[None], v[None]))
  else:
    ctx.write(DEPTH, (jnp.concatenate([buf[0], k[None]], 0),
                      jnp.concatenate([buf[1], v[None]], 0)))


def read_depth(ctx, slots: int, axis: int = 2):
  """Depth slots 0 .. slots-1: ([b, t, slots, kv_heads, d],) * 2 for axis 2 (the kernels'
  layout), ([slots, b, t, kv_heads, d],) * 2 for axis 0 (the buffers as kept); (None, None)
  when slots = 0."""
  if slots == 0:
    return None, None
  buf = ctx.read(DEPTH)
  written = 0 if buf is None else buf[0].shape[0]
  if written < slots:
    raise ValueError(f"MoDA depth slots {list(range(written, slots))} were not written before "
                     "they are read")
  k, v = buf[0][:slots], buf[1][:slots]
  if axis == 0:
    return k, v
  return jnp.moveaxis(k, 0, axis), jnp.moveaxis(v, 0, axis)


def moda_xla(q, k, v, depth_k, depth_v, *, q_positions, k_positions, k_valid=None,
             slot_axis: int = 2):
  """MoDA attention in jnp for any key set (training or a KV cache): one softmax over the
  causal sequence keys (key position <= query position, and `k_valid` when given) and the
  query token's own depth slots.

  q: [b, t, h, d]; k, v: [b, s, kv, d]; depth_k, depth_v: [b, t, S, kv, d] (slot_axis 2, the
  kernels' layout) or [S, b, t, kv, d] (slot_axis 0, the model's depth buffers), or None.
  Query head h uses KV head h // (h / kv) (research.model.attention.xla_attention's grouping).
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  scale = 1.0 / math.sqrt(d)
  qg = q.reshape(b, t, kv, g, d)
  seq = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * scale
  mask = causal_mask(q_positions, k_positions)
  if k_valid is not None:
    mask = mask & k_valid[:, None, None, None, :]
  seq = jnp.where(mask, seq, jnp.finfo(jnp.float32).min)
  if depth_k is None:
    probs = jax.nn.softmax(seq, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
  # Depth logits and outputs as multiply-reduces over head_dim and slots rather than batched
  # dots: XLA:CPU runs [g, d] x [d, S] dots batched over (b, t, kv) slowly (tiny MoDA shape,
  # S = 12, fwd+bwd of this op on one core: 8.7 ms against 17 ms with einsums).
  f32 = jnp.float32
  if slot_axis == 2:
    depth_k, depth_v = jnp.moveaxis(depth_k, 2, 0), jnp.moveaxis(depth_v, 2, 0)
  elif slot_axis != 0:
    raise ValueError(f"slot_axis must be 2 or 0, got {slot_axis}")
  dk = depth_k[:, :, :, :, None]                                          # [S, b, t, kv, 1, d]
  dep = jnp.sum(qg[None].astype(f32) * dk.astype(f32), -1) * scale        # [S, b, t, kv, g]
  dep = jnp.transpose(dep, (1, 3, 4, 2, 0))                               # [b, kv, g, t, S]
  top = jnp.maximum(seq.max(-1), dep.max(-1))[..., None]                  # one normaliser
  e_seq, e_dep = jnp.exp(seq - top), jnp.exp(dep - top)
  z = e_seq.sum(-1, keepdims=True) + e_dep.sum(-1, keepdims=True)
  p_seq, p_dep = (e_seq / z).astype(v.dtype), (e_dep / z).astype(v.dtype)
  p_dep = jnp.transpose(p_dep, (4, 0, 3, 1, 2))                          # [S, b, t, kv, g]
  out = (jnp.einsum("bkgts,bskd->btkgd", p_seq, v)
         + jnp.sum(p_dep[..., None] * depth_v[:, :, :, :, None], axis=0))
  return out.reshape(b, t, h, d)


def check_moda_config(cfg) -> None:
  o = cfg.attention.moda
  if cfg.attention.impl not in IMPLS:
    raise ConfigError(f"model.attention.impl='{cfg.attention.impl}' is not available for moda "
                      f"(choose one of {', '.join(IMPLS)})")
  if cfg.attention.prefill != "dense":
    raise ConfigError(f"model.attention.prefill='{cfg.attention.prefill}' is not available for "
                      "moda (its depth slots have no block-sparse form): use dense")
  if o.extra_attn_kv and not o.ffn_kv:
    raise ConfigError("model.attention.moda.extra_attn_kv needs moda.ffn_kv (Table 3 row 5 adds "
                      "the attention K/V projection on top of the FFN one)")


class _DepthKV(nnx.Module):
  """A K/V projection of a sublayer's input into one depth slot, with the attention's k/v
  norms and RoPE at the token's own position (see the module docstring)."""

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    kvd = cfg.num_kv_heads * cfg.head_dim
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.k = make_linear(cfg, cfg.d_model, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    self.v = make_linear(cfg, cfg.d_model, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    norms = cfg.attention.norms

    def norm(letter):
      return RMSNorm(cfg.head_dim, eps=cfg.norm_eps, dtype=dtype) if letter in norms else None

    self.k_norm, self.v_norm = norm("k"), norm("v")
    self.kv_heads, self.head_dim, self.theta = cfg.num_kv_heads, cfg.head_dim, cfg.attention.rope_theta
    self.d_model = cfg.d_model

  def __call__(self, x, positions):
    b, t, _ = x.shape
    k = self.k(x).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
    if self.k_norm is not None:
      k = self.k_norm(k)
    if self.v_norm is not None:
      v = self.v_norm(v)
    return rope(k, positions, self.theta), v

  def flops_per_token(self) -> float:
    return 2 * 2 * self.d_model * self.kv_heads * self.head_dim


class ChannelDepthWriter(nnx.Module):
  """The FFN-side K/V projection (Fig. 1, "Linear KV Projection"): reads the tensor the FFN
  reads and writes it into this block's channel slot."""

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    self.cfg, self.layer = cfg, layer
    self.proj = _DepthKV(cfg, layer=layer, dtype=dtype, rngs=rngs)

  def __call__(self, x, ctx) -> None:
    k, v = self.proj(x, ctx.positions)
    write_depth(ctx, self.cfg, channel_slot(self.cfg, self.layer), k, v)

  def flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return self.proj.flops_per_token()


@SEQUENCE_MIXERS.register("moda")
class MoDAAttention(DenseAttention):
  """Dense attention whose softmax also covers the token's depth slots (eqs. in the module
  docstring); writes its own K/V (or a projection's, `extra_attn_kv`) into its depth slot."""

  impls = IMPLS
  # which sublayers write depth K/V (Table 3 of the paper)
  defaults = dict(moda=dict(
      ffn_kv=True,  # a K/V projection beside each FFN writes a depth slot (the default)
      extra_attn_kv=False,  # attention writes a separate projection, not its sequence K/V
      ffn_kv_last_block=False))  # the last block's FFN K/V projection (it has no reader)

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    check_moda_config(cfg)
    super().__init__(cfg, layer=layer, dtype=dtype, rngs=rngs)
    self.cfg, self.layer = cfg, layer
    self.depth_slots = attention_slot(cfg, layer)  # slots written before this sublayer
    self.depth_proj = (_DepthKV(cfg, layer=layer, dtype=dtype, rngs=rngs)
                       if cfg.attention.moda.extra_attn_kv else None)

  @staticmethod
  def channel_writer(cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    """The module the block runs beside its channel mixer (None: this block has none)."""
    if not has_channel_writer(cfg, layer):
      return None
    return ChannelDepthWriter(cfg, layer=layer, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    q, k, v = self.project_qkv(x, ctx)
    keys = self.sequence_keys(k, v, ctx)
    if keys.cached or self.impl in ("xla", "auto"):
      depth_k, depth_v = read_depth(ctx, self.depth_slots, axis=0)
      out = moda_xla(q, keys.k, keys.v, depth_k, depth_v, q_positions=ctx.positions,
                     k_positions=keys.positions, k_valid=keys.valid, slot_axis=0)
    else:
      depth_k, depth_v = read_depth(ctx, self.depth_slots)
      from kernels_pallas.moda import moda_attention  # pylint: disable=import-outside-toplevel
      out = moda_attention(q, k, v, depth_k, depth_v, causal=True, impl=self.impl)
    if self.depth_proj is not None:
      k, v = self.depth_proj(x, ctx.positions)
    write_depth(ctx, self.cfg, attention_slot(self.cfg, self.layer), k, v)
    return self.project_out(out)

  def flops_per_token(self, seq_len: int) -> float:
    """Dense attention plus q.k^dep and p.v^dep over this layer's depth slots and the extra
    projection when present."""
    depth = 2 * 2 * self.num_heads * self.head_dim * self.depth_slots
    extra = self.depth_proj.flops_per_token() if self.depth_proj is not None else 0.0
    return super().flops_per_token(seq_len) + depth + extra
