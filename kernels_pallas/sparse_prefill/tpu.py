"""Block-sparse causal attention forward, Pallas Mosaic TPU style (FlexPrefill §3.5).

Splash-attention structure. The block lists are scalar-prefetched into SMEM
(pltpu.PrefetchScalarGridSpec, flattened to 1-D) and steer the K/V index maps:

  grid (B, Hq, nQB, m)   m = the padded list width, the innermost ("arbitrary") axis
  q, out   [bs, d] tile of (b, h, i), resident across the m axis
  k, v     [bs, d] tile of key block indices[b, h, i, min(t, counts - 1)] of KV head h // G

Steps t >= counts[b, h, i] are skipped with pl.when, and their index map repeats the last
valid block so the pipeline issues no new DMA. m, l (lane-replicated [bs, 128]) and acc
[bs, d] are fp32 VMEM scratch: initialised at t == 0, written out at t == m - 1. Inputs are
transposed to head-major [B, H, T, d] so every block's last two dims are (bs, d) with bs a
multiple of 8 and d the full extent. Forward only.

Untuned: no TPU was available to measure block sizes. The prefetched lists take
4 * B * Hq * nQB * m bytes of SMEM; at long T pass a small m (max_blocks) or call per head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.sparse_prefill import _compat
from kernels_pallas.sparse_prefill.reference import block_layout

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128


def _kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
            sm_scale: float, block_size: int, heads: int, num_blocks: int, width: int):
  b, h, i, t = (pl.program_id(a) for a in range(4))
  row = (b * heads + h) * num_blocks + i
  count = cnt_ref[row]

  @pl.when(t == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(t < count)
  def _step():
    kb = idx_ref[row * width + t]
    q = q_ref[...]  # [bs, d]
    k = k_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [bs, bs]
    rows = i * block_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = kb * block_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = cols <= rows
    s = jnp.where(visible, s, MASK_VALUE)
    m_prev = m_sc[...]  # [bs, LANES], lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

  @pl.when(t == width - 1)
  def _finish():
    l = l_sc[...][:, :1]
    o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "interpret"))
def block_sparse_attention(q, k, v, indices, counts, *, block_size: int, sm_scale: float,
                           interpret: bool = False):
  """q [B, T, Hq, d]; k, v [B, T, Hk, d]; indices [B, Hq, nQB, m]; counts [B, Hq, nQB]."""
  lay = block_layout(q, k, block_size)
  b, t, hq, g, d, nb, tp = lay.b, lay.t, lay.hq, lay.g, lay.d, lay.num_blocks, lay.padded
  bs = block_size
  width = indices.shape[-1]
  qh = lay.pad(q).transpose(0, 2, 1, 3)  # [B, Hq, Tp, d]
  kh = lay.pad(k).transpose(0, 2, 1, 3)  # [B, Hk, Tp, d]
  vh = lay.pad(v).transpose(0, 2, 1, 3)
  idx = jnp.clip(indices.astype(jnp.int32), 0, nb - 1).reshape(-1)
  cnt = counts.astype(jnp.int32).reshape(-1)

  def kv_map(bi, h, i, t_, idx_ref, cnt_ref):
    row = (bi * hq + h) * nb + i
    last = jnp.maximum(cnt_ref[row] - 1, 0)
    return bi, h // g, idx_ref[row * width + jnp.minimum(t_, last)], 0

  def q_map(bi, h, i, t_, idx_ref, cnt_ref):
    del t_, idx_ref, cnt_ref
    return bi, h, i, 0

  kernel = functools.partial(_kernel, sm_scale=sm_scale, block_size=bs, heads=hq,
                             num_blocks=nb, width=width)
  grid_spec = _compat.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, hq, nb, width),
      in_specs=[
          pl.BlockSpec((None, None, bs, d), q_map),
          pl.BlockSpec((None, None, bs, d), kv_map),
          pl.BlockSpec((None, None, bs, d), kv_map),
      ],
      out_specs=pl.BlockSpec((None, None, bs, d), q_map),
      scratch_shapes=[
          _compat.VMEM((bs, LANES), jnp.float32),
          _compat.VMEM((bs, LANES), jnp.float32),
          _compat.VMEM((bs, d), jnp.float32),
      ],
  )
  out = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, hq, tp, d), q.dtype),
      compiler_params=_compat.TPUParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="flexprefill_block_sparse_fwd_tpu",
  )(idx, cnt, qh, kh, vh)
  return out.transpose(0, 2, 1, 3)[:, :t]
