"""The KV cache: fixed-length per-layer buffers that travel explicitly in the forward context.

Layout. Rows are right-padded: slot s of row b holds the token at position s. A forward of t
tokens writes its entries at slots lengths[b] .. lengths[b] + t - 1 of each row, so a batch of
prompts of different lengths is simply rows with different `lengths`. Slots >= lengths[b] hold
nothing valid: the padding a ragged prefill writes there is masked (its positions lie after
every real query) and is overwritten by the tokens decoded next.

Protocol for sequence mixers (DenseAttention.sequence_keys is the reference user):

  cache, buf = ctx.cache.append(name, x)   # x [b, t, ...] -> buf [b, max_len, ...] after writing
  positions, valid = cache.key_positions(t) # slot positions [b, max_len] and validity
  ctx.cache = cache                         # functional: the context carries the new cache

Entries are created on first append (a prefill), named by the module (`layer<i>/k`); a mixer
that keeps more per-token state adds its own names. `prefill` (static) says this forward is the
first into an empty cache with positions 0..t-1, so attention may use the forward's own keys.
The engine advances `lengths` after each forward (`advance`). Modules may `record` statistics
(FlexPrefill's density) that the engine returns from the prefill.

Recurrent state. A recurrent mixer (research/model/recurrent.py) keeps no per-token entries: it
carries one state per row, constant in the context length:

  s = ctx.cache.state(name)                 # [b, ...] or None before the first forward
  ctx.cache = ctx.cache.set_state(name, s)  # the state after this forward's real tokens
  real = ctx.cache.real_mask(t)             # [b, t]: which of this forward's tokens are real

A ragged prefill's padding must not enter a recurrent state (it lies after the prompt, and a
recurrence has no positions to mask it by later), so the prefill says how many of its tokens
each row really has (`real`, the prompt lengths) and a mixer makes the others neither decay nor
write its state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVCache:
  lengths: jax.Array  # [batch] int32: tokens held per row before this forward (write offset)
  entries: dict[str, jax.Array]  # name -> [batch, max_len, ...]
  stats: dict[str, jax.Array]  # recorded by modules during this forward (cleared by advance)
  max_len: int  # static: slots per row
  prefill: bool  # static: first forward into an empty cache
  # name -> [batch, ...]: per-row recurrent state (recurrent mixers), constant in length
  states: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  # [batch] real tokens of this forward per row (a ragged prefill's prompt lengths); None: all
  real: jax.Array | None = None

  @classmethod
  def empty(cls, batch: int, max_len: int, real: jax.Array | None = None) -> "KVCache":
    if max_len <= 0:
      raise ValueError(f"KV cache max_len must be positive, got {max_len}")
    return cls(lengths=jnp.zeros((batch,), jnp.int32), entries={}, stats={}, max_len=max_len,
               prefill=True, real=None if real is None else jnp.asarray(real, jnp.int32))

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def append(self, name: str, x: jax.Array) -> tuple["KVCache", jax.Array]:
    """Writes x [batch, t, ...] at slots lengths[b] .. lengths[b] + t - 1 of entry `name`
    (created zero-filled on first use) -> (new cache, the entry [batch, max_len, ...])."""
    b, t = x.shape[:2]
    if b != self.batch:
      raise ValueError(f"cache entry '{name}': batch {b} != the cache's {self.batch}")
    if t > self.max_len:
      raise ValueError(f"cache entry '{name}': {t} tokens do not fit max_len={self.max_len}")
    buf = self.entries.get(name)
    if buf is None:
      buf = jnp.zeros((b, self.max_len) + x.shape[2:], x.dtype)
    elif buf.shape[2:] != x.shape[2:]:
      raise ValueError(f"cache entry '{name}' holds {buf.shape[2:]} per token, got {x.shape[2:]}")
    x = x.astype(buf.dtype)
    if self.prefill:
      buf = buf.at[:, :t].set(x)
    else:
      buf = jax.vmap(_write_row)(buf, x, self.lengths)
    return dataclasses.replace(self, entries={**self.entries, name: buf}), buf

  def key_positions(self, t: int) -> tuple[jax.Array, jax.Array]:
    """(positions, valid), both [batch, max_len], of the slots after a forward of t tokens:
    slot s holds position s; it is valid when s < lengths + t."""
    slots = jnp.arange(self.max_len, dtype=jnp.int32)[None, :]
    positions = jnp.broadcast_to(slots, (self.batch, self.max_len))
    return positions, slots < (self.lengths + t)[:, None]

  def query_positions(self, t: int) -> jax.Array:
    """[batch, t] positions of a forward of t tokens: lengths[b] + 0..t-1."""
    return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

  def state(self, name: str) -> jax.Array | None:
    """The recurrent state `name` [batch, ...] left by the previous forward, or None."""
    return self.states.get(name)

  def set_state(self, name: str, value: jax.Array) -> "KVCache":
    if value.shape[0] != self.batch:
      raise ValueError(f"recurrent state '{name}': batch {value.shape[0]} != the cache's "
                       f"{self.batch}")
    return dataclasses.replace(self, states={**self.states, name: value})

  def real_mask(self, t: int) -> jax.Array | None:
    """[batch, t] True for this forward's real tokens (None when all are: decode steps,
    continuations, a prefill without padding)."""
    if self.real is None:
      return None
    return jnp.arange(t, dtype=jnp.int32)[None, :] < self.real[:, None]

  def state_bytes(self) -> int:
    """Bytes of every per-row state and per-token entry the cache holds."""
    arrays = list(self.states.values()) + list(self.entries.values())
    return int(sum(x.size * x.dtype.itemsize for x in arrays))

  def record(self, name: str, value: jax.Array) -> "KVCache":
    return dataclasses.replace(self, stats={**self.stats, name: value})

  def advance(self, n: jax.Array | int) -> "KVCache":
    """After a forward: rows hold n more tokens ([batch] or a scalar); statistics cleared."""
    lengths = self.lengths + jnp.asarray(n, jnp.int32)
    return dataclasses.replace(self, lengths=lengths, stats={}, prefill=False, real=None)


def _write_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """row [max_len, ...] with new [t, ...] written at slots start .. start + t - 1."""
  return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)


jax.tree_util.register_dataclass(KVCache, data_fields=["lengths", "entries", "stats", "states",
                                                      "real"],
                                 meta_fields=["max_len", "prefill"])
