"""Input-embedding family (`model.embed.kind`).

An embedding maps token ids to [batch, seq, embed] and, when the head is tied, also provides
`attend` (logits = h E^T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.linear import init_std
from research.model.registry import Registry

EMBEDDINGS = Registry("model.embed.kind")


@EMBEDDINGS.register("plain")
class PlainEmbedding(nnx.Module):
  """A token table E: [vocab, embed]; positions enter through RoPE in attention."""

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(init_std(cfg))
    self.table = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32),
                           out_sharding=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # tokens: [batch, seq] -> [batch, seq, embed]
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    # h: [batch, seq, embed] -> logits [batch, seq, vocab]
    return jnp.dot(h, self.table[...].astype(h.dtype).T)
