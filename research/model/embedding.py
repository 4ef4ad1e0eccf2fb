"""Input-embedding family (`model.embed.kind`).

An embedding maps token ids to [batch, seq, width] and, when the head is tied, also provides
`attend` (logits = h E^T, h: [batch, seq, d_model]).

  plain       a [vocab, d_model] table
  over_width  VWN's over-width embedding (arXiv:2511.11238): width D' = r d_model
              (r = model.residual.expansion, with model.residual.kind='vwn'); a [vocab, D']
              table, or with `embed.factorized` the low-rank E_wide = E_base W_expand
              ([vocab, d_model] then [d_model, D'])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.errors import ConfigError
from research.model import residual as residual_lib
from research.model.linear import init_std, token_matmul
from research.model.option import Option
from research.model.registry import Registry


class Embedding(Option):
  """Base of `model.embed.kind` options: tokens [b, t] -> [b, t, width]. Hooks: `attend(h)`,
  the tied head's logits (h [b, t, d_model] -> [b, t, vocab]); `flops_per_token()`;
  `lookup_tables()`, the tables a token reads one row of [(rows, params per row, rows read per
  token)] for research/model/accounting.py (a tied table is read whole by the head instead)."""

  HOOKS = ("attend", "flops_per_token", "lookup_tables")

  def lookup_tables(self) -> list[tuple[int, int, int]]:
    return []

  def attend(self, h: jax.Array) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} cannot be tied to the head")

  def flops_per_token(self) -> float:
    raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")


EMBEDDINGS = Registry("model.embed.kind", base=Embedding, default="plain")


@EMBEDDINGS.register("plain")
class PlainEmbedding(Embedding):
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
    return token_matmul(h, self.table[...].astype(h.dtype).T)

  def flops_per_token(self) -> float:
    return 0.0  # a lookup

  def lookup_tables(self) -> list[tuple[int, int, int]]:
    rows, width = self.table.shape
    return [(rows, width, 1)]


@EMBEDDINGS.register("over_width")
class OverWidthEmbedding(Embedding):
  """VWN's over-width embedding: tokens -> [batch, seq, D'].

  The full table draws its entries with the plain table's std; the factorized one keeps the
  plain [vocab, d_model] table (same draw as `plain`) and a W_expand: [d_model, D'] with std
  1/sqrt(d_model), so both give entries of the same scale. A tied head needs the factorized
  form (the head is d_model wide): it then attends with the base table.
  """

  defaults = dict(factorized=False)  # True: E_wide = E_base W_expand (low rank)

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.wide = residual_lib.virtual_width(cfg)
    self.factorized = cfg.embed.factorized
    if cfg.head.tie_embeddings and not self.factorized:
      raise ConfigError("model.embed.kind='over_width' has a [vocab, D'] table that cannot be "
                        "tied to the d_model-wide head; set model.head.tie_embeddings=False or "
                        "model.embed.factorized=True")
    init = jax.nn.initializers.normal(init_std(cfg))
    width = cfg.d_model if self.factorized else self.wide
    self.table = nnx.Param(init(rngs.params(), (cfg.vocab_size, width), jnp.float32),
                           out_sharding=("vocab", "embed"))
    if self.factorized:
      expand = jax.nn.initializers.normal(1.0 / math.sqrt(cfg.d_model))
      self.expand = nnx.Param(expand(rngs.params(), (cfg.d_model, self.wide), jnp.float32),
                              out_sharding=("embed", None))
    self.d = cfg.d_model
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # tokens: [batch, seq] -> [batch, seq, D']
    h = jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)
    if self.factorized:
      h = token_matmul(h, self.expand[...].astype(self.dtype))
    return h

  def attend(self, h: jax.Array) -> jax.Array:
    return token_matmul(h, self.table[...].astype(h.dtype).T)  # factorized only (checked at init)

  def flops_per_token(self) -> float:
    return 2.0 * self.d * self.wide if self.factorized else 0.0

  def lookup_tables(self) -> list[tuple[int, int, int]]:
    rows, width = self.table.shape  # the factorized form's W_expand is read whole
    return [(rows, width, 1)]
