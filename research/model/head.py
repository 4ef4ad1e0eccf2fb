"""Output-head family (`model.head.kind`).

The head turns the final hidden state into vocabulary logits. `plain` is tied to the input
embedding (`tie_embeddings=True`) or owns a separate [embed, vocab] matrix. Multi-token
prediction heads (VWN) register here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.linear import init_std
from research.model.registry import Registry

HEADS = Registry("model.head.kind")


@HEADS.register("plain")
class PlainHead(nnx.Module):

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.tied = cfg.head.tie_embeddings
    self.dtype = dtype
    if not self.tied:
      init = jax.nn.initializers.normal(init_std(cfg))
      self.kernel = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                              out_sharding=("embed", "vocab"))

  def __call__(self, h: jax.Array, embedding: nnx.Module, ctx) -> jax.Array:
    """h: [batch, seq, embed] -> logits [batch, seq, vocab] in fp32."""
    del ctx
    if self.tied:
      logits = embedding.attend(h)
    else:
      logits = jnp.dot(h, self.kernel[...].astype(h.dtype))
    return logits.astype(jnp.float32)
