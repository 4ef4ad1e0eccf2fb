"""Row lookups of large tables (memory layers' values, hashed n-gram embeddings).

`table_lookup(table, idx, w)` = sum_j w[..., j] table[idx[..., j]] by the kernel of
kernels_pallas/memory_lookup; when the current mesh shards the table's rows (logical axes
`memory_slots` / `ngram_rows`, mesh axes fsdp x tensor), each device reads its own rows and the
partial sums are added over those axes (`sharded_memory_lookup`), so the table is never
gathered. A table whose rows do not divide over those axes falls back to the plain lookup,
which the compiler serves by gathering the table (the n-gram tables pad their rows to a
multiple of 256 for this reason).
"""

from __future__ import annotations

import math

import jax

from kernels_pallas.memory_lookup import memory_lookup, sharded_memory_lookup
from research import sharding

SLOT_AXES = ("fsdp", "tensor")  # the mesh axes the row-sharded tables' rows lie on


def table_lookup(table: jax.Array, idx: jax.Array, w: jax.Array, *, impl: str) -> jax.Array:
  """table [rows, dim]; idx, w [..., k] -> [..., dim]."""
  mesh = sharding.current_mesh()
  if mesh is not None:
    shards = math.prod(mesh.shape[a] for a in SLOT_AXES)
    if shards > 1 and table.shape[0] % shards == 0:
      return sharded_memory_lookup(table, idx, w, mesh=mesh, slot_axes=SLOT_AXES,
                                   token_axes=("data",), impl=impl)
  return memory_lookup(table, idx, w, impl=impl)
