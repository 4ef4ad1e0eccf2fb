"""GPU-style (Triton-lowering) Pallas kernels for the memory lookup, forward and backward.

Design (see README.md for the reasoning):
- forward: grid (token tiles, dim tiles). A program owns out[BT tokens, BD columns]; it walks the
  k slots of its tokens, gathers the BT selected row pieces V[i[t, j], cols] with one masked
  pointer load per j and accumulates w[t, j] * row in fp32 registers. Every program writes only
  its own tile: no races.
- d_weights: grid (token tiles,). A program loads its dout tile once per dim chunk and, for each
  j, gathers the rows again and reduces <dout[t], V[i[t, j]]> into a [BT, k] fp32 register tile.
- d_values: deterministic sort + segmented sum. The (token, j) pairs are sorted by slot (plain
  jnp, `reference.sort_pairs_by_slot`); grid (slot tiles, dim tiles). A program owns dV[BS slots,
  BD columns], reads only the pairs of its slots (a contiguous run of the sorted list), gathers
  their dout rows in chunks of C and adds onehot(slot)[BS, C] * w @ rows[C, BD] (an fp32 dot at
  full precision). Each output row has exactly one writer and a fixed summation order, so the
  result is bit-reproducible and needs no zero-initialised fp32 atomics buffer.

All block sizes are keyword arguments; the defaults are untuned (no GPU was available to measure
them). Triton needs power-of-two tile extents; ragged token counts and dims are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.memory_lookup import _compat
from kernels_pallas.memory_lookup import reference

HIGHEST = jax.lax.Precision.HIGHEST


def _pow2(n: int, lo: int = 16) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _dim_block(dim: int, block_dim: int | None) -> int:
  bd = 128 if block_dim is None else block_dim
  return _pow2(min(bd, _pow2(dim)))


# ---------------------------------------------------------------------------------- forward

def _fwd_kernel(idx_ref, w_ref, v_ref, o_ref, *, num_tokens, dim, k, bt, bd):
  rows = pl.program_id(0) * bt + jnp.arange(bt)                         # [BT] token ids
  cols = pl.program_id(1) * bd + jnp.arange(bd)                         # [BD] columns
  rmask, cmask = rows < num_tokens, cols < dim
  tile_mask = rmask[:, None] & cmask[None, :]

  def body(j, acc):
    idx = pltriton.load(idx_ref.at[rows, j], mask=rmask, other=0)       # [BT]
    w = pltriton.load(w_ref.at[rows, j], mask=rmask, other=0).astype(jnp.float32)
    row = pltriton.load(v_ref.at[idx[:, None], cols[None, :]], mask=tile_mask, other=0)
    return acc + w[:, None] * row.astype(jnp.float32)                   # lookup, fp32

  acc = jax.lax.fori_loop(0, k, body, jnp.zeros((bt, bd), jnp.float32))
  pltriton.store(o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=tile_mask)


def lookup_fwd(values, indices, weights, *, block_tokens=None, block_dim=None, num_warps=4,
               interpret=None):
  """out [T, D] = sum_j w[t, j] V[i[t, j]]; indices [T, k] already clipped, weights [T, k]."""
  dim, (t, k) = values.shape[1], indices.shape
  bt = _pow2(block_tokens or 32)
  bd = _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("gpu") if interpret is None else interpret
  kernel = functools.partial(_fwd_kernel, num_tokens=t, dim=dim, k=k, bt=bt, bd=bd)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(t, bt), pl.cdiv(dim, bd)),
      in_specs=[_compat.NO_BLOCK] * 3, out_specs=_compat.NO_BLOCK,
      out_shape=jax.ShapeDtypeStruct((t, dim), values.dtype),
      compiler_params=_compat.triton_params(num_warps), interpret=interpret,
  )(indices, weights, values)


# ------------------------------------------------------------------------- backward: weights

def _dw_kernel(idx_ref, v_ref, g_ref, dw_ref, *, num_tokens, dim, k, bt, bd, kp):
  rows = pl.program_id(0) * bt + jnp.arange(bt)
  rmask = rows < num_tokens
  jcol = jnp.arange(kp)

  def dim_chunk(c, dw):
    cols = c * bd + jnp.arange(bd)
    tile_mask = rmask[:, None] & (cols < dim)[None, :]
    g = pltriton.load(g_ref.at[rows[:, None], cols[None, :]], mask=tile_mask, other=0)
    g = g.astype(jnp.float32)                                            # dout tile, read once

    def per_j(j, dw):
      idx = pltriton.load(idx_ref.at[rows, j], mask=rmask, other=0)
      row = pltriton.load(v_ref.at[idx[:, None], cols[None, :]], mask=tile_mask, other=0)
      s = jnp.sum(row.astype(jnp.float32) * g, axis=1)                  # gather-dot, [BT]
      return jnp.where(jcol[None, :] == j, dw + s[:, None], dw)

    return jax.lax.fori_loop(0, k, per_j, dw)

  dw = jax.lax.fori_loop(0, pl.cdiv(dim, bd), dim_chunk, jnp.zeros((bt, kp), jnp.float32))
  store_mask = rmask[:, None] & (jcol < k)[None, :]
  pltriton.store(dw_ref.at[rows[:, None], jcol[None, :]], dw, mask=store_mask)


def lookup_bwd_weights(values, indices, dout, *, block_tokens=None, block_dim=None, num_warps=4,
                       interpret=None):
  """dw [T, k] fp32 = <dout[t], V[i[t, j]]>."""
  dim, (t, k) = values.shape[1], indices.shape
  bt = _pow2(block_tokens or 32)
  bd = _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("gpu") if interpret is None else interpret
  kernel = functools.partial(_dw_kernel, num_tokens=t, dim=dim, k=k, bt=bt, bd=bd,
                             kp=_pow2(k))
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(t, bt),),
      in_specs=[_compat.NO_BLOCK] * 3, out_specs=_compat.NO_BLOCK,
      out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32),
      compiler_params=_compat.triton_params(num_warps), interpret=interpret,
  )(indices, values, dout)


# -------------------------------------------------------------------------- backward: values

def _dv_kernel(start_ref, slot_ref, tok_ref, w_ref, g_ref, dv_ref, *, num_slots, dim, bs, bd,
               chunk):
  s = pl.program_id(0)
  base = s * bs
  cols = pl.program_id(1) * bd + jnp.arange(bd)
  cmask = cols < dim
  begin, end = start_ref[s], start_ref[s + 1]                          # this tile's pairs
  local = jnp.arange(bs)

  def body(c, acc):
    p = begin + c * chunk + jnp.arange(chunk)                           # [C] pair positions
    pm = p < end
    slot = pltriton.load(slot_ref.at[p], mask=pm, other=-1)
    tok = pltriton.load(tok_ref.at[p], mask=pm, other=0)
    w = pltriton.load(w_ref.at[p], mask=pm, other=0)
    g = pltriton.load(g_ref.at[tok[:, None], cols[None, :]], mask=pm[:, None] & cmask[None, :],
                      other=0).astype(jnp.float32)                      # [C, BD] dout rows
    onehot = jnp.where((slot - base)[None, :] == local[:, None], w[None, :], 0.0)  # [BS, C]
    return acc + jnp.dot(onehot, g, precision=HIGHEST)                  # segmented sum

  n_chunks = (end - begin + chunk - 1) // chunk
  acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((bs, bd), jnp.float32))
  slots = base + local
  out_mask = (slots < num_slots)[:, None] & cmask[None, :]
  pltriton.store(dv_ref.at[slots[:, None], cols[None, :]], acc.astype(dv_ref.dtype),
                 mask=out_mask)


def lookup_bwd_values(num_slots, indices, weights, dout, *, block_slots=16, block_dim=None,
                      chunk=32, num_warps=4, out_dtype=jnp.float32, interpret=None):
  """dV [N, D] = scatter-add of w[t, j] dout[t] into row i[t, j], by sort + segmented sum."""
  dim = dout.shape[1]
  bs, c = _pow2(block_slots), _pow2(chunk)
  bd = _dim_block(dim, block_dim)
  interpret = _compat.interpret_default("gpu") if interpret is None else interpret
  tile_start, slot, token, weight = reference.sort_pairs_by_slot(indices, weights, num_slots, bs)
  kernel = functools.partial(_dv_kernel, num_slots=num_slots, dim=dim, bs=bs, bd=bd, chunk=c)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(num_slots, bs), pl.cdiv(dim, bd)),
      in_specs=[_compat.NO_BLOCK] * 5, out_specs=_compat.NO_BLOCK,
      out_shape=jax.ShapeDtypeStruct((num_slots, dim), out_dtype),
      compiler_params=_compat.triton_params(num_warps), interpret=interpret,
  )(tile_start, slot, token, weight, dout)
