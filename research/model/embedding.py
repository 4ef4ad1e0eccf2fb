"""Input-embedding family (`model.embed.kind`).

An embedding maps token ids to [batch, seq, width] and, when the head is tied, also provides
`attend` (logits = h E^T, h: [batch, seq, d_model]).

  plain       a [vocab, d_model] table
  over_width  VWN's over-width embedding (arXiv:2511.11238): width D' = r d_model
              (r = model.residual.expansion, with model.residual.kind='vwn'); a [vocab, D']
              table, or with `embed.factorized` the low-rank E_wide = E_base W_expand
              ([vocab, d_model] then [d_model, D'])
  over_encoding  the Over-Tokenized Transformer's input side (arXiv:2501.16975): the token's
              row plus hashed n-gram rows (`model.embed.over_encoding`)

An embedding is called as `embed(tokens, ctx)`; one that reads earlier tokens (n-grams) takes
them from the window, or at inference from the KV cache (`ctx.cache`), where it keeps the
tokens it has seen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.errors import ConfigError
from research.model import ngram
from research.model import residual as residual_lib
from research.model.linear import PlainLinear, init_std, token_matmul
from research.model.lookup import table_lookup
from research.model.option import Option
from research.model.registry import Registry


class Embedding(Option):
  """Base of `model.embed.kind` options: tokens [b, t] -> [b, t, width]. Hooks: `attend(h)`,
  the tied head's logits (h [b, t, d_model] -> [b, t, vocab]); `flops_per_token()`;
  `lookup_tables(tied)`, the tables a token reads only some rows of [(rows, params per row,
  rows read per token)] for research/model/accounting.py; with `tied` the token table is read
  whole by the head, so it is not listed."""

  HOOKS = ("attend", "flops_per_token", "lookup_tables")

  def lookup_tables(self, tied: bool) -> list[tuple[int, int, int]]:
    del tied
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

  def __call__(self, tokens: jax.Array, ctx=None) -> jax.Array:
    # tokens: [batch, seq] -> [batch, seq, embed]
    del ctx
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    # h: [batch, seq, embed] -> logits [batch, seq, vocab]
    return token_matmul(h, self.table[...].astype(h.dtype).T)

  def flops_per_token(self) -> float:
    return 0.0  # a lookup

  def lookup_tables(self, tied: bool) -> list[tuple[int, int, int]]:
    rows, width = self.table.shape
    return [] if tied else [(rows, width, 1)]


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

  def __call__(self, tokens: jax.Array, ctx=None) -> jax.Array:
    # tokens: [batch, seq] -> [batch, seq, D']
    del ctx
    h = jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)
    if self.factorized:
      h = token_matmul(h, self.expand[...].astype(self.dtype))
    return h

  def attend(self, h: jax.Array) -> jax.Array:
    return token_matmul(h, self.table[...].astype(h.dtype).T)  # factorized only (checked at init)

  def flops_per_token(self) -> float:
    return 2.0 * self.d * self.wide if self.factorized else 0.0

  def lookup_tables(self, tied: bool) -> list[tuple[int, int, int]]:
    rows, width = self.table.shape  # the factorized form's W_expand is read whole
    return [] if tied else [(rows, width, 1)]


ROW_ALIGN = 256  # the n-gram tables' rows are padded to a multiple of this (even row shards)


@EMBEDDINGS.register("over_encoding")
class OverEncodingEmbedding(Embedding):
  """Over-Encoding (OE, arXiv:2501.16975 §3.3 and Alg. 1):

    OE(x) = ( E[x_t] + sum_{i in grams} sum_{j<k} W_(i,j) T_(i,j)[x_t^(-i) mod M_(i,j)] + b )
            / (1 + k |grams|)

  E is the [vocab, d_model] token table (tied to the head when the head is tied); x^(-i) the
  i-gram id (research/model/ngram.py, eq. 1); table (i, j) of order i and slice j has
  M = rows + 2 idx rows (idx = its index over orders then slices: distinct moduli, Alg. 1) and
  width d_model / (k |grams|), so the tables hold about rows x d_model parameters ("OE-m" with
  m = rows). Each slice's own projection W_(i,j) [w, d_model] (a bias in the pseudocode's
  nn.Linear) is applied as one [d_model, d_model] matrix to the slices' concatenation, which is
  the same sum. `exact`: order i reads an exact V^i-row table (no hashing; small vocabularies).
  The tables are one [rows total, w] parameter on the logical axis `ngram_rows` (row-sharded
  under FSDP / tensor meshes; the lookup then runs where the rows live).

  Choices where the paper is silent: tables N(0, init_std^2) as the token table; projections
  N(0, 1/w), so a projected slice has the token row's scale; zero bias; positions before the
  window's start read token 0, as the paper pads. At inference the tokens seen so far are kept
  in the cache (entry `embed/tokens`, one int per token), so a decode step sees its n-grams.
  """

  API = ("ngram_rows",)
  defaults = dict(over_encoding=dict(
      grams="2,3",       # the hashed n-gram orders added to the token's row (Table 3: "2", "3", "2,3")
      rows=65537,        # m: rows per table (+ 2 idx), about rows x d_model parameters in all
      slices=1,          # k: tables per order (Table 2's slicing)
      exact=False,       # order i reads an exact V^i-row table (no hashing)
      unigram=True,      # include the token's own row (Table 3: without it, worse than baseline)
      normalize=True,    # divide by the number of summed embeddings (Alg. 1)
      impl="auto",       # the row lookup (kernels_pallas/memory_lookup): auto | xla | pallas
  ))

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    oe = cfg.embed.over_encoding
    self.vocab, d = cfg.vocab_size, cfg.d_model
    self.orders = _parse_orders(oe.grams)
    self.slices, self.unigram, self.impl = oe.slices, oe.unigram, oe.impl
    self.moduli = _table_moduli(self.orders, oe.slices, oe.rows, oe.exact, self.vocab)
    n_tables = len(self.moduli)
    if d % n_tables:
      raise ConfigError(f"model.embed.over_encoding: d_model={d} does not divide into "
                        f"{n_tables} slices ({len(self.orders)} orders x slices={oe.slices})")
    self.width = d // n_tables
    self.offsets = [sum(self.moduli[:i]) for i in range(n_tables)]
    total = -(-sum(self.moduli) // ROW_ALIGN) * ROW_ALIGN
    init = jax.nn.initializers.normal(init_std(cfg))
    self.table = nnx.Param(init(rngs.params(), (self.vocab, d), jnp.float32),
                           out_sharding=("vocab", "embed"))
    self.ngrams = nnx.Param(init(rngs.params(), (total, self.width), jnp.float32),
                            out_sharding=("ngram_rows", None))
    self.project = PlainLinear(d, d, axes=(None, "embed"), std=1.0 / math.sqrt(self.width),
                               use_bias=True, dtype=dtype, rngs=rngs)
    summed = n_tables + (1 if self.unigram else 0)
    self.scale = 1.0 / summed if oe.normalize else 1.0
    self.d = d
    self.dtype = dtype

  def _history(self, tokens: jax.Array, ctx) -> list[jax.Array]:
    """[x_t, x_{t-1}, ...] [b, t] each: from the window, or at inference from the cache."""
    n = max(self.orders)
    if ctx is None or ctx.cache is None:
      return ngram.previous_tokens(tokens, n)
    ctx.cache, seen = ctx.cache.append("embed/tokens", tokens)  # [b, max_len]: slot = position
    history = [tokens]
    for back in range(1, n):
      p = ctx.positions - back
      prev = jnp.take_along_axis(seen, jnp.maximum(p, 0), axis=1)
      history.append(jnp.where(p >= 0, prev, 0))
    return history

  def ngram_rows(self, tokens: jax.Array, ctx=None) -> jax.Array:
    """[b, t, tables] int32: the row each table reads, offset into the concatenated tables."""
    history = self._history(tokens, ctx)
    ids = []
    for i, modulus in enumerate(self.moduli):
      order = self.orders[i // self.slices]
      ids.append(ngram.ngram_id(history, order, self.vocab, modulus) + self.offsets[i])
    return jnp.stack(ids, axis=-1)

  def __call__(self, tokens: jax.Array, ctx=None) -> jax.Array:
    # tokens: [batch, seq] -> [batch, seq, embed]
    rows = self.ngram_rows(tokens, ctx)[..., None]  # [b, t, tables, 1]
    slices = table_lookup(self.ngrams[...], rows, jnp.ones(rows.shape, jnp.float32),
                          impl=self.impl)  # [b, t, tables, w]
    z = self.project(slices.reshape(*tokens.shape, self.d).astype(self.dtype))
    if self.unigram:
      z = z + jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)
    return z * self.scale  # Alg. 1: x / (1 + k (n - 1))

  def attend(self, h: jax.Array) -> jax.Array:
    return token_matmul(h, self.table[...].astype(h.dtype).T)

  def flops_per_token(self) -> float:
    return 2.0 * self.d * self.d  # the slices' projections

  def lookup_tables(self, tied: bool) -> list[tuple[int, int, int]]:
    rows, width = self.ngrams.shape  # a token reads one row of each n-gram table
    token = [] if tied else [(self.vocab, self.d, 1)]
    return token + [(rows, width, len(self.moduli))]


def _parse_orders(grams: str) -> list[int]:
  try:
    orders = [int(g) for g in str(grams).split(",") if g.strip()]
  except ValueError:
    orders = []
  if not orders or any(o < 2 for o in orders) or len(set(orders)) != len(orders):
    raise ConfigError(f"model.embed.over_encoding.grams='{grams}' must list distinct n-gram "
                      "orders >= 2, comma-separated (e.g. '2,3')")
  return sorted(orders)


def _table_moduli(orders: list[int], slices: int, rows: int, exact: bool, vocab: int) -> list[int]:
  """Rows of each table, orders then slices: rows + 2 idx (Alg. 1), or V^order when exact."""
  what = "model.embed.over_encoding"
  if slices < 1:
    raise ConfigError(f"{what}.slices={slices} must be >= 1")
  if exact and slices != 1:
    raise ConfigError(f"{what}.exact=True reads one exact table per order; slices={slices} "
                      "would repeat it (set slices=1)")
  moduli = []
  for g, order in enumerate(orders):
    for j in range(slices):
      moduli.append(vocab ** order if exact else rows + 2 * (g * slices + j))
      ngram.check_ngram_bounds(vocab, moduli[-1], f"{what} (order {order})")
  return moduli
