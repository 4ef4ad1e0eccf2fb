"""The explicit per-forward context.

Everything that one forward pass shares across layers travels here rather than in globals or
module attributes: token positions, the dropout key, auxiliary losses that modules add (a MoE
balance loss, say), scalar statistics the trainer logs (a MoE's dropped fraction), and
cross-layer state in typed slots (MoDA's depth keys/values, a skip memory unit's pending
output). At inference the KV cache travels here too (`cache`; None in training). A forward that
repeats its tokens (model.phd) carries its layout and attention mask (`phd`).
The context lives only inside one traced forward; modules read it and add to it.

A `Slot` is declared, at module level, by the option that owns it (moda.DEPTH,
memory.PENDING); modules write and read it through `ctx.write(slot, value)`, `ctx.read(slot)`
and `ctx.take(slot)`, never by a string key, so two options cannot collide on a name and a
misspelled slot is a NameError where it is used. The decoder threads every slot through a
rematerialized block generically (lm.py: the slots dict goes in and out of jax.checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Slot:
  """A named entry of the cross-layer state (see the module docstring). `at(i)`: the slot's
  i-th member, for state kept per layer."""
  name: str

  def at(self, index) -> "Slot":
    return Slot(f"{self.name}/{index}")


STATS = Slot("stat")  # add_stat's [sum, count] per statistic name


def _name(slot: Slot) -> str:
  if not isinstance(slot, Slot):
    raise TypeError(f"cross-layer state is written and read through a declared Slot, not "
                    f"{slot!r}")
  return slot.name


def positions_for(tokens) -> np.ndarray:
  """[batch, seq] positions 0..seq-1 of a forward over whole windows (training, evaluation,
  a prompt without a cache), as a numpy array: known when the forward is traced, so RoPE's
  sin/cos tables enter the program as constants instead of being recomputed inside its
  fusions (the causal mask is still computed from them as traced values: attention.causal_mask)."""
  return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)


@dataclasses.dataclass
class ForwardContext:
  # [batch, seq] int32, absolute position of each token (numpy when known at trace time)
  positions: jax.Array | np.ndarray
  deterministic: bool = True  # False enables dropout
  dropout_key: jax.Array | None = None
  # Training only: the fraction of the run's steps done (a scalar; schedules inside the model,
  # e.g. GatePro's hot-swap); None reads as the trained model (evaluation, inference)
  progress: jax.Array | None = None
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  slots: dict[str, Any] = dataclasses.field(default_factory=dict)  # Slot name -> value
  # Inference only: the KV cache (research/infer/cache.py KVCache) this forward reads and
  # appends to; None in training. Modules replace it functionally (ctx.cache = ...).
  cache: Any = None
  # Token repetition (model.phd, research/model/phd.py): this forward's Layout (its copies'
  # attention mask, which replaces the causal mask from positions); None: one copy per token.
  phd: Any = None

  def add_aux_loss(self, name: str, value: jax.Array) -> None:
    """Adds a scalar to the named auxiliary loss (summed over layers); the trainer logs each
    name and adds their sum to the training objective."""
    value = jnp.asarray(value, jnp.float32)
    self.aux_losses[name] = self.aux_losses.get(name, 0.0) + value

  def write(self, slot: Slot, value: Any) -> None:
    self.slots[_name(slot)] = value

  def read(self, slot: Slot, default: Any = None) -> Any:
    return self.slots.get(_name(slot), default)

  def take(self, slot: Slot) -> Any:
    """Reads and removes `slot` (a value consumed once, such as a skip unit's output); a slot
    never written is a KeyError naming it."""
    if _name(slot) not in self.slots:
      raise KeyError(f"cross-layer slot {slot.name} was read before it was written")
    return self.slots.pop(slot.name)

  def add_stat(self, name: str, value: jax.Array) -> None:
    """Records a scalar measured in the forward (not a loss), averaged over the calls of one
    forward (e.g. over layers); the trainer logs it as `stat/<name>`. It lives in the slot
    STATS.at(name) as [sum, count] so it travels wherever the cross-layer state does."""
    entry = jnp.stack([jnp.asarray(value, jnp.float32), jnp.float32(1)])
    slot = STATS.at(name)
    before = self.read(slot)
    self.write(slot, entry if before is None else before + entry)

  def stats(self) -> dict[str, jax.Array]:
    """{name: mean of the values recorded with add_stat} of this forward."""
    prefix = STATS.name + "/"
    return {k[len(prefix):]: v[0] / v[1] for k, v in self.slots.items() if k.startswith(prefix)}

  def dropout(self, x: jax.Array, rate: float, site: int) -> jax.Array:
    """Inverted dropout with a key derived from (per-step key, site): no hidden rng state."""
    if self.deterministic or rate == 0.0:
      return x
    if self.dropout_key is None:
      raise ValueError("dropout is enabled but the forward context has no dropout_key")
    keep = jax.random.bernoulli(jax.random.fold_in(self.dropout_key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
