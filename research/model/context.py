"""The explicit per-forward context.

Everything that one forward pass shares across layers travels here rather than in globals or
module attributes: token positions, the dropout key, auxiliary losses that modules add (a MoE
balance loss, say), scalar statistics the trainer logs (a MoE's dropped fraction), and
cross-layer state (MoDA's depth keys/values, hyper-connection streams).
At inference the KV cache travels here too (`cache`; None in training).
The context lives only inside one traced forward; modules read it and add to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class ForwardContext:
  positions: jax.Array  # [batch, seq] int32, absolute position of each token
  deterministic: bool = True  # False enables dropout
  dropout_key: jax.Array | None = None
  aux_losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  state: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Inference only: the KV cache (research/infer/cache.py KVCache) this forward reads and
  # appends to; None in training. Modules replace it functionally (ctx.cache = ...).
  cache: Any = None

  def add_aux_loss(self, name: str, value: jax.Array) -> None:
    """Adds a scalar to the named auxiliary loss (summed over layers); the trainer logs each
    name and adds their sum to the training objective."""
    value = jnp.asarray(value, jnp.float32)
    self.aux_losses[name] = self.aux_losses.get(name, 0.0) + value

  def add_stat(self, name: str, value: jax.Array) -> None:
    """Records a scalar measured in the forward (not a loss), averaged over the calls of one
    forward (e.g. over layers); the trainer logs it as `stat/<name>`. It lives in `state` under
    "stat/<name>" as [sum, count] so it travels wherever the cross-layer state does."""
    entry = jnp.stack([jnp.asarray(value, jnp.float32), jnp.float32(1)])
    key = f"stat/{name}"
    self.state[key] = self.state[key] + entry if key in self.state else entry

  def stats(self) -> dict[str, jax.Array]:
    """{name: mean of the values recorded with add_stat} of this forward."""
    return {k[len("stat/"):]: v[0] / v[1] for k, v in self.state.items() if k.startswith("stat/")}

  def dropout(self, x: jax.Array, rate: float, site: int) -> jax.Array:
    """Inverted dropout with a key derived from (per-step key, site): no hidden rng state."""
    if self.deterministic or rate == 0.0:
      return x
    if self.dropout_key is None:
      raise ValueError("dropout is enabled but the forward context has no dropout_key")
    keep = jax.random.bernoulli(jax.random.fold_in(self.dropout_key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
