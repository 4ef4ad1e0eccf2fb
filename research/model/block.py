"""The decoder block: two sublayers (sequence mixer, channel mixer), each wrapped by its norm
placement and joined to the residual stream by its own residual connection:

  stream <- placement(stream, sublayer, residual)

so every family can change without the others knowing. Its own module so that the decoder
(lm.py) and a head that runs an extra block (head.py: MTP) both build it without importing
each other.
"""

from __future__ import annotations

import jax
from flax import nnx

from research.model import attention as attention_lib
from research.model import ffn as ffn_lib
from research.model import norms as norms_lib
from research.model import residual as residual_lib
from research.model.context import ForwardContext


class Block(nnx.Module):

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    d = cfg.d_model
    placement = norms_lib.NORM_PLACEMENTS.get(cfg.norm.kind)
    residual = residual_lib.RESIDUALS.get(cfg.residual.kind)
    self.layer = layer
    self.dropout = cfg.dropout
    self.attn_norm = placement(d, cfg=cfg, layer=layer, sublayer="attn", dtype=dtype, rngs=rngs)
    self.attn_residual = residual(d, cfg=cfg, layer=2 * layer, dtype=dtype, rngs=rngs)
    mixer = attention_lib.SEQUENCE_MIXERS.get(cfg.attention.kind)
    self.attn = mixer(cfg, layer=layer, dtype=dtype, rngs=rngs)
    # A sequence mixer may run a module beside the channel mixer, reading what it reads
    # (MoDA's FFN-side K/V projection); None for the others.
    self.channel_side = mixer.channel_writer(cfg, layer=layer, dtype=dtype, rngs=rngs)
    self.channel_norm = placement(d, cfg=cfg, layer=layer, sublayer="channel", dtype=dtype,
                                  rngs=rngs)
    self.channel_residual = residual(d, cfg=cfg, layer=2 * layer + 1, dtype=dtype, rngs=rngs)
    self.channel = ffn_lib.CHANNEL_MIXERS.get(cfg.channel.kind)(
        cfg, layer=layer, dtype=dtype, rngs=rngs)

  def __call__(self, stream: jax.Array, ctx: ForwardContext) -> jax.Array:
    site = 2 * self.layer

    def attn(x):
      return ctx.dropout(self.attn(x, ctx), self.dropout, site)

    def channel(x):
      if self.channel_side is not None:
        self.channel_side(x, ctx)
      return ctx.dropout(self.channel(x, ctx), self.dropout, site + 1)

    stream = self.attn_norm(stream, attn, self.attn_residual)
    stream = self.channel_norm(stream, channel, self.channel_residual)
    return stream

  def flops_per_token(self, seq_len: int) -> float:
    side = self.channel_side.flops_per_token(seq_len) if self.channel_side is not None else 0.0
    connections = self.attn_residual.flops_per_token() + self.channel_residual.flops_per_token()
    return (self.attn.flops_per_token(seq_len) + self.channel.flops_per_token(seq_len) + side
            + connections)
