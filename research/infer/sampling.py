"""Next-token choice from logits: greedy, or temperature with nucleus (top-p) truncation.

`Sampling(temperature, top_p)`: temperature 0 is greedy (argmax, no randomness); otherwise
logits / temperature are truncated to the smallest set of most likely tokens whose probability
reaches top_p (nucleus sampling, Holtzman et al. 2020, sec. 3.1) and sampled. Inside jit only
"greedy or not" is static; temperature and top_p are traced values (`draw`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0  # 1: no truncation

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling()


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
  """[..., vocab] bool: the smallest set of most probable tokens whose probability reaches
  top_p (the most probable token always). Ties at the boundary are all kept."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly better ranks
  keep_sorted = before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # The threshold probability: the smallest kept one.
  threshold = jnp.min(jnp.where(keep_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return probs >= threshold


def sample(logits: jax.Array, key: jax.Array | None, sampling: Sampling = GREEDY) -> jax.Array:
  """logits [batch, vocab] -> token ids [batch] int32."""
  return draw(logits, key, greedy=sampling.greedy, temperature=sampling.temperature,
              top_p=sampling.top_p)


def draw(logits: jax.Array, key: jax.Array | None, *, greedy: bool, temperature, top_p):
  """`sample` with temperature and top_p as (possibly traced) values and greedy static, so
  one compilation serves every temperature and top_p."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("sampling with temperature > 0 needs a random key")
  scaled = logits.astype(jnp.float32) / temperature
  scaled = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)  # top_p = 1 keeps all
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
