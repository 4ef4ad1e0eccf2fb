"""The memory lookup with the value table sharded over its slot dimension (`memory_slots`).

research/sharding.py maps the logical axis `memory_slots` to the mesh axes (fsdp, tensor). Here
each device of those axes owns one contiguous range of slots [lo, lo + N/P):

  1. it keeps the (token, j) pairs whose slot lies in its range, and sets the weight of every
     other pair to 0 (its index is clipped to a local row, so the gather stays in bounds);
  2. it runs the ordinary single-device lookup on its rows: a partial sum per token;
  3. a psum over the slot axes adds the partials into the full output.

The backward is a second shard_map tied in by a custom VJP: the table gradient stays local (each
device scatters only into its own rows; pairs outside its range carry weight 0), summed over the
token axes only when tokens are split there; the weight gradient is the psum over the slot axes
of the partial gather-dots, masked to the pairs each device owns (so each pair's dot comes from
exactly the device holding its slot). Tokens are split over `token_axes` when their count
divides; otherwise they are replicated.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _live_axes(mesh, axes: Sequence[str]) -> tuple[str, ...]:
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"mesh has no axis '{a}' (its axes: {', '.join(mesh.axis_names)})")
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _spec_entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def sharded_memory_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                          mesh: jax.sharding.Mesh, slot_axes: Sequence[str] = ("fsdp", "tensor"),
                          token_axes: Sequence[str] = ("data",), impl: str = "auto",
                          block_tokens: int | None = None,
                          block_dim: int | None = None) -> jax.Array:
  """memory_lookup with values [num_slots, dim] sharded over `slot_axes` of `mesh` (see above).

  num_slots must divide by the product of the slot axes' sizes. Same semantics, dtypes and
  out-of-range clamping as `memory_lookup`.
  """
  from kernels_pallas.memory_lookup import _check  # the package's own validation
  _check(values, indices, weights)
  slot_axes, token_axes = _live_axes(mesh, slot_axes), _live_axes(mesh, token_axes)
  if set(slot_axes) & set(token_axes):
    raise ValueError(f"slot_axes {slot_axes} and token_axes {token_axes} must not overlap")
  num_slots, dim = values.shape
  shards = math.prod(mesh.shape[a] for a in slot_axes)
  if num_slots % shards:
    raise ValueError(f"num_slots={num_slots} does not divide over slot axes {slot_axes} "
                     f"({shards} shards)")
  lead, k = indices.shape[:-1], indices.shape[-1]
  idx = jnp.clip(indices.reshape(-1, k).astype(jnp.int32), 0, num_slots - 1)   # [T, k] global
  w = weights.reshape(-1, k)
  if token_axes and idx.shape[0] % math.prod(mesh.shape[a] for a in token_axes):
    token_axes = ()                                                      # replicate tokens
  local_slots = num_slots // shards
  lookup = _sharded_op(mesh, slot_axes, token_axes, local_slots,
                       dict(impl=impl, block_tokens=block_tokens, block_dim=block_dim))
  return lookup(values, idx, w).reshape(*lead, dim)


def _sharded_op(mesh, slot_axes, token_axes, local_slots, kw):
  """The shard_map'd forward and backward, tied together by a custom VJP (see module doc)."""
  from kernels_pallas.memory_lookup import memory_lookup  # the package's own entry
  slot_spec, tok_spec = P(_spec_entry(slot_axes), None), P(_spec_entry(token_axes), None)

  def mask(idx_t, w_t):
    lo = (jax.lax.axis_index(slot_axes) * local_slots) if slot_axes else 0
    mine = (idx_t >= lo) & (idx_t < lo + local_slots)                  # pairs this device owns
    return mine, jnp.where(mine, idx_t - lo, 0), jnp.where(mine, w_t, jnp.zeros_like(w_t))

  def psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x

  def local_fwd(v_loc, idx_t, w_t):
    _, idx_loc, w_loc = mask(idx_t, w_t)
    part = memory_lookup(v_loc, idx_loc, w_loc, **kw)                   # [T_loc, D] partial
    return psum(part.astype(jnp.float32), slot_axes).astype(v_loc.dtype)

  def local_bwd(v_loc, idx_t, w_t, g_t):
    mine, idx_loc, w_loc = mask(idx_t, w_t)
    _, vjp = jax.vjp(lambda v, w: memory_lookup(v, idx_loc, w, **kw), v_loc, w_loc)
    dv_loc, dw_loc = vjp(g_t)                                          # dV: own rows only
    dw = psum(jnp.where(mine, dw_loc, jnp.zeros_like(dw_loc)).astype(jnp.float32), slot_axes)
    dv = psum(dv_loc.astype(jnp.float32), token_axes)                  # tokens split: add up
    return dv.astype(v_loc.dtype), dw.astype(w_t.dtype)

  fwd_map = jax.shard_map(local_fwd, mesh=mesh, in_specs=(slot_spec, tok_spec, tok_spec),
                          out_specs=tok_spec, check_vma=False)
  bwd_map = jax.shard_map(local_bwd, mesh=mesh,
                          in_specs=(slot_spec, tok_spec, tok_spec, tok_spec),
                          out_specs=(slot_spec, tok_spec), check_vma=False)

  @jax.custom_vjp
  def op(values, idx, w):
    return fwd_map(values, idx, w)

  def op_fwd(values, idx, w):
    return fwd_map(values, idx, w), (values, idx, w)

  def op_bwd(res, g):
    values, idx, w = res
    dv, dw = bwd_map(values, idx, w, g)
    return dv, None, dw

  op.defvjp(op_fwd, op_bwd)
  return op
