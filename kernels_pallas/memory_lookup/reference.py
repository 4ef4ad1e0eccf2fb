"""The memory-layer value lookup in plain jnp: the definition, the test oracle, the CPU path.

UltraMem (Huang et al. 2025, §3.5 and §4 of our digest) reads, for every token t, the k value
rows its retrieval selected and sums them weighted by their raw scores:

  out[t, :] = sum_j w[t, j] * V[i[t, j], :]                                   (lookup)

Backward (no gradient reaches the integer indices):

  dw[t, j]      = <dout[t, :], V[i[t, j], :]>                                 (gather-dot)
  dV[s, :]      = sum_{(t, j) : i[t, j] = s} w[t, j] * dout[t, :]               (scatter-add)

Implicit value expansion (IVE) and multi-core scoring are expressed by the caller with this
same op (one call per virtual block / core slice, or indices into a pre-offset table); the op
itself is the plain gather-and-weighted-sum of the paper's fused kernel.

Out-of-range indices are clamped to [0, num_slots - 1] (like `jnp.take(mode="clip")`) by every
implementation, and the clamped row receives their gradient; indices are traced values, so they
cannot be validated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def clip_indices(indices: jax.Array, num_slots: int) -> jax.Array:
  return jnp.clip(indices.astype(jnp.int32), 0, num_slots - 1)


def lookup(values: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """out[t] = sum_j w[t, j] V[i[t, j]], fp32 accumulation; values [N, D], indices/weights [T, k].

  Differentiable by autodiff (jnp.take's transpose is the scatter-add); this is the oracle.
  """
  rows = jnp.take(values, clip_indices(indices, values.shape[0]), axis=0)  # [T, k, D]
  out = jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), rows.astype(jnp.float32),
                   precision=HIGHEST)
  return out.astype(values.dtype)


def lookup_bwd_weights(values: jax.Array, indices: jax.Array, dout: jax.Array) -> jax.Array:
  """dw[t, j] = <dout[t], V[i[t, j]]> in fp32: gather then a batched dot. Returns [T, k] fp32."""
  rows = jnp.take(values, clip_indices(indices, values.shape[0]), axis=0)  # [T, k, D]
  return jnp.einsum("td,tkd->tk", dout.astype(jnp.float32), rows.astype(jnp.float32),
                    precision=HIGHEST)


def lookup_bwd_values(num_slots: int, indices: jax.Array, weights: jax.Array,
                      dout: jax.Array) -> jax.Array:
  """dV[s] = sum over pairs with i[t, j] = s of w[t, j] dout[t]: fp32 `.at[].add`, [N, D]."""
  contrib = weights.astype(jnp.float32)[:, :, None] * dout.astype(jnp.float32)[:, None, :]
  flat = contrib.reshape(-1, dout.shape[-1])                                # [T*k, D]
  dv = jnp.zeros((num_slots, dout.shape[-1]), jnp.float32)
  return dv.at[clip_indices(indices, num_slots).reshape(-1)].add(flat)


# ---- plain-jnp preprocessing shared by the kernels' deterministic table gradient ----

def sort_pairs_by_slot(indices: jax.Array, weights: jax.Array, num_slots: int, block_slots: int):
  """Orders the T*k (token, j) pairs by slot so each slot tile owns one contiguous run.

  Returns (tile_start [n_tiles + 1], slot [P], token [P], weight [P] fp32), P = T*k, sorted by
  slot (stable, so the summation order inside a slot is fixed: the result is deterministic).
  Pairs of slot tile s are sorted[tile_start[s] : tile_start[s + 1]].
  """
  k = indices.shape[-1]
  flat = clip_indices(indices, num_slots).reshape(-1)                        # [P]
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  slot = flat[order]
  token = order // k
  weight = weights.astype(jnp.float32).reshape(-1)[order]
  n_tiles = -(-num_slots // block_slots)
  bounds = jnp.arange(n_tiles + 1, dtype=jnp.int32) * block_slots
  tile_start = jnp.searchsorted(slot, bounds, side="left").astype(jnp.int32)
  return tile_start, slot, token, weight
