"""TPU-style (Mosaic) Pallas kernels for the memory lookup, forward and backward.

Design (see README.md):
- forward: grid (dim tiles, token tiles), both "parallel". The token ids of every (token, j)
  pair are scalar-prefetched into SMEM; the table stays in HBM (`pl.ANY`). A program owns
  out[BT tokens, BD columns]: it starts one row DMA per pair of its tile into a VMEM buffer
  rows[k, BT, BD] (all BT*k copies in flight at once), waits for them, and accumulates
  sum_j w[:, j] * rows[j] in fp32.
- d_weights: grid (token tiles, dim tiles); the dim axis is the reduction ("arbitrary"): a VMEM
  fp32 accumulator [BT, k] collects <dout[t, cols], V[i[t, j], cols]> over the dim tiles.
- d_values: sort + segment-sum on a slot-owning grid (dim tiles, slot tiles), "parallel": the
  pairs sorted by slot (`reference.sort_pairs_by_slot`) are scalar-prefetched; a program owns
  dV[BS slots, BD columns] and walks only its own run of pairs in chunks of C, DMAing their dout
  rows into VMEM and adding w * row into an fp32 VMEM accumulator row. One writer per output
  row and a fixed order: no races, deterministic.

Limits: scalar prefetch puts O(T*k) int32 (forward: indices; backward: sorted pairs) in SMEM,
which is small on real TPUs; long token batches should be split by the caller (or the op moved to
the SparseCore). Block sizes are keyword arguments; the defaults are untuned (no TPU was
available to measure them). block_dim must equal dim or be a multiple of 128 that divides it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.memory_lookup import _compat
from kernels_pallas.memory_lookup import reference


def _dim_block(dim: int, block_dim: int | None) -> int:
  if block_dim is None or block_dim >= dim:
    return dim
  if block_dim % 128 or dim % block_dim:
    raise ValueError(f"pallas_tpu block_dim={block_dim} must equal dim={dim} or be a multiple "
                     "of 128 that divides it")
  return block_dim


def _token_block(block_tokens: int | None) -> int:
  return max(8, -(-(block_tokens or 8) // 8) * 8)


def _pad_tokens(indices: jax.Array, bt: int) -> jax.Array:
  pad = (-indices.shape[0]) % bt
  return jnp.pad(indices, ((0, pad), (0, 0))) if pad else indices


def _gather_rows(idx_smem, v_hbm, rows, sem, *, tile, col0, bt, bd, k):
  """DMAs V[i[t, j], col0:col0+bd] into rows[j, t] for the bt*k pairs of token tile `tile`."""

  def copy(r):
    t, j = r // k, r % k
    slot = idx_smem[(tile * bt + t) * k + j]
    return _compat.make_async_copy(v_hbm.at[pl.ds(slot, 1), pl.ds(col0, bd)],
                                   rows.at[j, pl.ds(t, 1)], sem)

  def start(r, c):
    copy(r).start()
    return c

  def wait(r, c):
    copy(r).wait()
    return c

  jax.lax.fori_loop(0, bt * k, start, 0)
  jax.lax.fori_loop(0, bt * k, wait, 0)


# ---------------------------------------------------------------------------------- forward

def _fwd_kernel(idx_smem, w_ref, v_hbm, o_ref, rows, sem, *, bt, bd, k):
  d, i = pl.program_id(0), pl.program_id(1)
  _gather_rows(idx_smem, v_hbm, rows, sem, tile=i, col0=d * bd, bt=bt, bd=bd, k=k)
  w = w_ref[...].astype(jnp.float32)                                    # [BT, k]
  lane = jax.lax.broadcasted_iota(jnp.int32, (bt, k), 1)

  def add_slot(j, acc):                                                 # lookup, fp32
    w_j = jnp.sum(jnp.where(lane == j, w, 0.0), axis=1, keepdims=True)  # column j, [BT, 1]
    return acc + w_j * rows[j].astype(jnp.float32)

  acc = jax.lax.fori_loop(0, k, add_slot, jnp.zeros((bt, bd), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def lookup_fwd(values, indices, weights, *, block_tokens=None, block_dim=None, interpret=None):
  """out [T, D] = sum_j w[t, j] V[i[t, j]]; indices [T, k] already clipped, weights [T, k]."""
  dim, (t, k) = values.shape[1], indices.shape
  bt, bd = _token_block(block_tokens), _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("tpu") if interpret is None else interpret
  idx_flat = _pad_tokens(indices, bt).reshape(-1)
  grid_spec = _compat.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(dim // bd, pl.cdiv(t, bt)),
      in_specs=[pl.BlockSpec((bt, k), lambda d, i, idx: (i, 0)),
                pl.BlockSpec(memory_space=_compat.ANY)],
      out_specs=pl.BlockSpec((bt, bd), lambda d, i, idx: (i, d)),
      scratch_shapes=[_compat.VMEM((k, bt, bd), values.dtype), _compat.DMA(())])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, bt=bt, bd=bd, k=k), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((t, dim), values.dtype),
      compiler_params=_compat.tpu_params("parallel", "parallel"), interpret=interpret,
  )(idx_flat, weights, values)


# ------------------------------------------------------------------------- backward: weights

def _dw_kernel(idx_smem, g_ref, v_hbm, dw_ref, rows, acc, sem, *, bt, bd, k):
  i, d = pl.program_id(0), pl.program_id(1)

  @pl.when(d == 0)
  def _():
    acc[...] = jnp.zeros_like(acc)

  _gather_rows(idx_smem, v_hbm, rows, sem, tile=i, col0=d * bd, bt=bt, bd=bd, k=k)
  g = g_ref[...].astype(jnp.float32)                                    # [BT, BD]
  lane = jax.lax.broadcasted_iota(jnp.int32, (bt, k), 1)

  def dot_slot(j, dw):                                                  # gather-dot
    s = jnp.sum(rows[j].astype(jnp.float32) * g, axis=1, keepdims=True)  # [BT, 1]
    return dw + jnp.where(lane == j, s, 0.0)

  acc[...] += jax.lax.fori_loop(0, k, dot_slot, jnp.zeros((bt, k), jnp.float32))

  @pl.when(d == pl.num_programs(1) - 1)
  def _():
    dw_ref[...] = acc[...]


def lookup_bwd_weights(values, indices, dout, *, block_tokens=None, block_dim=None,
                       interpret=None):
  """dw [T, k] fp32 = <dout[t], V[i[t, j]]>."""
  dim, (t, k) = values.shape[1], indices.shape
  bt, bd = _token_block(block_tokens), _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("tpu") if interpret is None else interpret
  idx_flat = _pad_tokens(indices, bt).reshape(-1)
  grid_spec = _compat.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(pl.cdiv(t, bt), dim // bd),
      in_specs=[pl.BlockSpec((bt, bd), lambda i, d, idx: (i, d)),
                pl.BlockSpec(memory_space=_compat.ANY)],
      out_specs=pl.BlockSpec((bt, k), lambda i, d, idx: (i, 0)),
      scratch_shapes=[_compat.VMEM((k, bt, bd), values.dtype),
                      _compat.VMEM((bt, k), jnp.float32), _compat.DMA(())])
  return pl.pallas_call(
      functools.partial(_dw_kernel, bt=bt, bd=bd, k=k), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32),
      compiler_params=_compat.tpu_params("parallel", "arbitrary"), interpret=interpret,
  )(idx_flat, dout, values)


# -------------------------------------------------------------------------- backward: values

def _dv_kernel(start_smem, slot_smem, tok_smem, w_smem, g_hbm, dv_ref, buf, acc, sem, *,
               bs, bd, chunk):
  d, s = pl.program_id(0), pl.program_id(1)
  base, col0 = s * bs, d * bd
  begin, end = start_smem[s], start_smem[s + 1]                        # this tile's pairs
  acc[...] = jnp.zeros_like(acc)

  def copy(p, c):
    return _compat.make_async_copy(g_hbm.at[pl.ds(tok_smem[p], 1), pl.ds(col0, bd)],
                                   buf.at[pl.ds(c, 1)], sem)

  def one_chunk(ch, carry):
    p0 = begin + ch * chunk
    n = jnp.minimum(chunk, end - p0)                                    # valid pairs here

    def start(c, x):
      copy(p0 + c, c).start()
      return x

    def wait(c, x):
      copy(p0 + c, c).wait()
      return x

    def add(c, x):                                                      # segment-sum
      p = p0 + c
      r = slot_smem[p] - base
      acc[pl.ds(r, 1), :] += w_smem[p] * buf[pl.ds(c, 1), :].astype(jnp.float32)
      return x

    jax.lax.fori_loop(0, n, start, 0)
    jax.lax.fori_loop(0, n, wait, 0)
    jax.lax.fori_loop(0, n, add, 0)
    return carry

  jax.lax.fori_loop(0, (end - begin + chunk - 1) // chunk, one_chunk, 0)
  dv_ref[...] = acc[...].astype(dv_ref.dtype)


def lookup_bwd_values(num_slots, indices, weights, dout, *, block_slots=8, block_dim=None,
                      chunk=32, out_dtype=jnp.float32, interpret=None):
  """dV [N, D] = scatter-add of w[t, j] dout[t] into row i[t, j], by sort + segment-sum."""
  dim = dout.shape[1]
  bs, bd = _token_block(block_slots), _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("tpu") if interpret is None else interpret
  tile_start, slot, token, weight = reference.sort_pairs_by_slot(indices, weights, num_slots, bs)
  grid_spec = _compat.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(dim // bd, pl.cdiv(num_slots, bs)),
      in_specs=[pl.BlockSpec(memory_space=_compat.ANY)],
      out_specs=pl.BlockSpec((bs, bd), lambda d, s, *_: (s, d)),
      scratch_shapes=[_compat.VMEM((chunk, bd), dout.dtype), _compat.VMEM((bs, bd), jnp.float32),
                      _compat.DMA(())])
  return pl.pallas_call(
      functools.partial(_dv_kernel, bs=bs, bd=bd, chunk=chunk), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((num_slots, dim), out_dtype),
      compiler_params=_compat.tpu_params("parallel", "parallel"), interpret=interpret,
  )(tile_start, slot, token, weight, dout)
