"""Block-sparse causal attention forward, Pallas Triton style (FlexPrefill §3.5).

Grid (B * Hq, nQB): one program per (batch-head, query block) owns a [bs, d] output tile. It
reads its row of the block list (indices[b, h, i, :counts]) and loops over those key blocks
with the online softmax (FlashAttention-2): m, l and acc live in registers, fp32. K and V of the
program's KV head (h // G) are passed whole; each iteration loads one [bs, d] tile at
kb * bs. Only the elementwise causal mask is applied (off-diagonal blocks are fully visible;
key blocks above the diagonal, if listed, are masked out entirely). Rows with no visible key
return 0. Forward only: prefill is inference.

Defaults (num_warps=4, num_stages=2) are untuned: no GPU was available to measure them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.sparse_prefill import _compat
from kernels_pallas.sparse_prefill.reference import block_layout

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def _kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale: float, block_size: int,
            num_blocks: int):
  bs = block_size
  i = pl.program_id(1)
  q = q_ref[...]  # [bs, d]
  d = q.shape[-1]
  rows = i * bs + jnp.arange(bs)
  qk_scale = sm_scale * LOG2E  # exp2 domain

  def body(t, carry):
    acc, m, l = carry
    kb = jnp.minimum(jnp.maximum(idx_ref[t], 0), num_blocks - 1)
    start = pl.multiple_of(kb * bs, bs)
    k = k_ref[pl.ds(start, bs), :]  # [bs, d]
    v = v_ref[pl.ds(start, bs), :]
    s = _compat.triton_dot(q, k.T).astype(jnp.float32) * qk_scale  # [bs, bs]
    visible = (kb * bs + jnp.arange(bs))[None, :] <= rows[:, None]
    s = jnp.where(visible, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _compat.triton_dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_next, l

  init = (jnp.zeros((bs, d), jnp.float32), jnp.full((bs,), MASK_VALUE, jnp.float32),
          jnp.zeros((bs,), jnp.float32))
  acc, _, l = lax.fori_loop(0, cnt_ref[0], body, init)
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "num_warps", "num_stages",
                                             "interpret"))
def block_sparse_attention(q, k, v, indices, counts, *, block_size: int, sm_scale: float,
                           num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """q [B, T, Hq, d]; k, v [B, T, Hk, d]; indices [B, Hq, nQB, m]; counts [B, Hq, nQB].

  T is padded to nQB * block_size inside; head_dim must be a power of two >= 16 (Triton tiles).
  """
  lay = block_layout(q, k, block_size)
  b, t, hq, g, d, nb, tp = lay.b, lay.t, lay.hq, lay.g, lay.d, lay.num_blocks, lay.padded
  bs = block_size
  m = indices.shape[-1]
  qp, kp, vp = lay.pad(q), lay.pad(k), lay.pad(v)
  idx = indices.astype(jnp.int32)
  cnt = counts.astype(jnp.int32).reshape(b, hq, nb, 1)

  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_size=bs, num_blocks=nb)
  out = pl.pallas_call(
      kernel,
      grid=(b * hq, nb),
      in_specs=[
          pl.BlockSpec((None, None, None, m), lambda bh, i: (bh // hq, bh % hq, i, 0)),
          pl.BlockSpec((None, None, None, 1), lambda bh, i: (bh // hq, bh % hq, i, 0)),
          pl.BlockSpec((None, bs, None, d), lambda bh, i: (bh // hq, i, bh % hq, 0)),
          pl.BlockSpec((None, tp, None, d), lambda bh, i: (bh // hq, 0, (bh % hq) // g, 0)),
          pl.BlockSpec((None, tp, None, d), lambda bh, i: (bh // hq, 0, (bh % hq) // g, 0)),
      ],
      out_specs=pl.BlockSpec((None, bs, None, d), lambda bh, i: (bh // hq, i, bh % hq, 0)),
      out_shape=jax.ShapeDtypeStruct((b, tp, hq, d), q.dtype),
      compiler_params=_compat.TritonParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="flexprefill_block_sparse_fwd",
  )(idx, cnt, qp, kp, vp)
  return out[:, :t]


# ---------------------------------------------------------------------------------------------
# Estimate kernel (§3.1-3.3 step 4): pooled vertical and slash scores of the last bs queries
# without materialising A_hat [B, Hq, bs, T]. Two passes over K, both on the grid
# (B * Hq, nKB) with one [bs, bs] tile per program:
#   pass 1: per-tile row max and sum of exp -> combined to the row logsumexp in XLA;
#   pass 2: p = exp(s - lse); the tile's column mass (its vertical block score) and its mass
#           on the (at most four) block diagonals the tile's token offsets fall on, with the
#           same split weights as reference.pool_slash. A tiny XLA scatter-add assembles them.

_SLOTS = 8  # per-tile output: [vertical, diag c_lo + 0..3, unused x 3]


def _rep_tile(i_key, q_ref, k_ref, *, sm_scale, block_size, seq_len, rows):
  """Masked logits [bs, bs] of the representative rows against key block i_key."""
  bs = block_size
  s = _compat.triton_dot(q_ref[...], k_ref[...].T).astype(jnp.float32) * sm_scale
  r_idx = jnp.arange(bs)
  pos = seq_len - rows + r_idx  # query positions of the representative rows
  cols = i_key * bs + jnp.arange(bs)
  visible = (cols[None, :] <= pos[:, None]) & (r_idx < rows)[:, None]
  return jnp.where(visible, s, MASK_VALUE), visible, pos, cols


def _estimate_stats_kernel(q_ref, k_ref, m_ref, l_ref, **kw):
  s, visible, _, _ = _rep_tile(pl.program_id(1), q_ref, k_ref, **kw)
  m = jnp.max(s, axis=1)
  m_ref[...] = m
  l_ref[...] = jnp.sum(jnp.where(visible, jnp.exp(s - m[:, None]), 0.0), axis=1)


def _estimate_pool_kernel(q_ref, k_ref, lse_ref, out_ref, **kw):
  bs, t, rows = kw["block_size"], kw["seq_len"], kw["rows"]
  j = pl.program_id(1)
  s, visible, pos, cols = _rep_tile(j, q_ref, k_ref, **kw)
  p = jnp.where(visible, jnp.exp(s - lse_ref[...][:, None]), 0.0) / rows
  offset = pos[:, None] - cols[None, :]  # o = query - key position
  c_lo = jnp.maximum(t - rows - j * bs - bs + 1, 0) // bs
  band = offset // bs - c_lo  # in {0, 1, 2} where p > 0
  rem = (offset % bs).astype(jnp.float32)
  w_same, w_next = p * (bs - rem) / bs, p * rem / bs
  slot = jnp.arange(_SLOTS)
  vec = jnp.where(slot == 0, jnp.sum(p), 0.0)
  for delta in range(4):
    part = jnp.sum(jnp.where(band == delta, w_same, 0.0) + jnp.where(band + 1 == delta, w_next,
                                                                      0.0))
    vec = vec + jnp.where(slot == delta + 1, part, 0.0)
  out_ref[...] = vec


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "num_warps", "interpret"))
def estimate_scores(q, k, *, block_size: int, sm_scale: float, num_warps: int = 4,
                    interpret: bool = False):
  """Pallas version of reference.estimate_scores (pooled scores only, no token-level ones)."""
  from kernels_pallas.sparse_prefill.reference import Estimate  # no cycle at import time
  b, t, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  bs = block_size
  nb = -(-t // bs)
  rows = min(bs, t)
  q_rep = jnp.pad(q[:, t - rows:], ((0, 0), (0, bs - rows), (0, 0), (0, 0)))  # [B, bs, Hq, d]
  kp = jnp.pad(k, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0)))
  kw = dict(sm_scale=sm_scale, block_size=bs, seq_len=t, rows=rows)
  q_spec = pl.BlockSpec((None, bs, None, d), lambda bh, j: (bh // hq, 0, bh % hq, 0))
  k_spec = pl.BlockSpec((None, bs, None, d), lambda bh, j: (bh // hq, j, (bh % hq) // g, 0))
  part_spec = pl.BlockSpec((None, None, bs), lambda bh, j: (bh, j, 0))
  params = _compat.TritonParams(num_warps=num_warps, num_stages=2)
  m_part, l_part = pl.pallas_call(
      functools.partial(_estimate_stats_kernel, **kw),
      grid=(b * hq, nb),
      in_specs=[q_spec, k_spec],
      out_specs=[part_spec, part_spec],
      out_shape=[jax.ShapeDtypeStruct((b * hq, nb, bs), jnp.float32)] * 2,
      compiler_params=params, interpret=interpret, name="flexprefill_estimate_stats",
  )(q_rep, kp)
  m_all = jnp.max(m_part, axis=1)  # [B * Hq, bs]
  lse = m_all + jnp.log(jnp.sum(l_part * jnp.exp(m_part - m_all[:, None, :]), axis=1))
  pooled = pl.pallas_call(
      functools.partial(_estimate_pool_kernel, **kw),
      grid=(b * hq, nb),
      in_specs=[q_spec, k_spec, pl.BlockSpec((None, bs), lambda bh, j: (bh, 0))],
      out_specs=pl.BlockSpec((None, None, _SLOTS), lambda bh, j: (bh, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b * hq, nb, _SLOTS), jnp.float32),
      compiler_params=params, interpret=interpret, name="flexprefill_estimate_pool",
  )(q_rep, kp, lse)
  vertical = pooled[..., 0].reshape(b, hq, nb)
  j = jnp.arange(nb)
  c_lo = jnp.maximum(t - rows - j * bs - bs + 1, 0) // bs  # [nb], as in the kernel
  target = (c_lo[:, None] + jnp.arange(4)[None, :]).reshape(-1)  # [nb * 4]
  slash = jnp.zeros((b * hq, nb + 4), jnp.float32)
  slash = slash.at[:, target].add(pooled[..., 1:5].reshape(b * hq, nb * 4))
  return Estimate(vertical, slash[:, :nb].reshape(b, hq, nb), None, None)
