"""Output-head family (`model.head.kind`).

The head turns the final hidden state into vocabulary logits. `plain` is tied to the input
embedding (`tie_embeddings=True`) or owns a separate [embed, vocab] matrix.

  plain  logits = h E^T (tied) or h W
  mtp    plain, plus one sequential multi-token-prediction module (DeepSeek-V3's sequential
         MTP, as Virtual Width Networks' Fig. 3c uses it) that predicts token t+2 and adds
         `head.mtp_weight` x its cross-entropy to the objective as the auxiliary loss `mtp`
  over_decoding  plain, plus the Over-Tokenized Transformer's over-decoding (arXiv:2501.16975
         App. C): one linear vocabulary per further offset j = 2..n on the last hidden state,
         adding sum_j lambda_j x CE(token t+j) as the auxiliary loss `od`

On training forwards the decoder calls the head's loss hook `add_loss(stream, tokens, ctx,
shared)` with the last block's stream (uncollapsed) and the decoder's modules a loss may reuse
(`SharedParts`): MTP is a loss module over (hidden, tokens) that never calls back into the
decoder. Heads report their forward FLOPs per token.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.errors import ConfigError
from research.model import residual as residual_lib
from research.model.block import Block
from research.model.linear import PlainLinear, init_std, token_matmul
from research.model.norms import RMSNorm
from research.model.option import Option
from research.model.registry import Registry


class SharedParts(NamedTuple):
  """The decoder's modules that a head's loss reuses: its embedding (token -> stream input),
  its residual stream adapter (expand / collapse) and its final norm (None without one)."""
  embed: nnx.Module
  stream: nnx.Module
  final_norm: nnx.Module | None


class Head(Option):
  """Base of `model.head.kind` options: (h [b, t, d], embedding, ctx) -> fp32 logits. Hooks:
  `flops_per_token(seq_len)` (every option); `add_loss(stream, tokens, ctx, shared)`, called on
  training forwards with the last block's uncollapsed stream to add the head's own aux losses
  (a no-op here)."""

  HOOKS = ("flops_per_token", "add_loss")
  defaults = dict(tie_embeddings=True)  # the logits from the embedding table

  def flops_per_token(self, seq_len: int) -> float:
    raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")

  def add_loss(self, stream: jax.Array, tokens: jax.Array, ctx, shared: "SharedParts") -> None:
    del stream, tokens, ctx, shared


HEADS = Registry("model.head.kind", base=Head, default="plain")


@HEADS.register("plain")
class PlainHead(Head):

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.tied = cfg.head.tie_embeddings
    self.dtype = dtype
    self.d_model, self.vocab = cfg.d_model, cfg.vocab_size
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
      logits = token_matmul(h, self.kernel[...].astype(h.dtype))
    return logits.astype(jnp.float32)

  def flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return 2.0 * self.d_model * self.vocab


@HEADS.register("mtp")
class MultiTokenHead(PlainHead):
  """The plain head plus one MTP depth predicting token t+2 (VWN Fig. 3c):

    H-Norm(last block's stream at t), E-Norm(stream-space embedding of token t+1)
      -> concatenate segment by segment -> one shared (2w -> w) linear per segment
      -> one extra block (same options as the others, its own connections)
      -> the decoder's collapse, final norm and unembedding -> cross-entropy against t+2

  A segment is d_model wide (plain / hyper / frac: the DeepSeek-V3 fusion, 2D -> D, per copy for
  hyper) or D/m wide (VWN's block-level linear over its n slots). The norms are RMSNorms over a
  segment with one gain shared by the segments. Only the inputs are needed: position t < T-2
  fuses token t+1 and predicts token t+2, so the trainer needs no second target array (the
  last position of each window is not trained by this loss).
  """

  defaults = dict(mtp_weight=0.3)  # the weight of the t+2 cross-entropy in the objective

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg, dtype=dtype, rngs=rngs)
    w = residual_lib.segment_width(cfg)
    self.weight = cfg.head.mtp_weight
    if self.weight < 0:
      raise ConfigError(f"model.head.mtp_weight={self.weight} must be >= 0")
    self.segment = w
    self.h_norm = RMSNorm(w, eps=cfg.norm_eps, dtype=dtype)
    self.e_norm = RMSNorm(w, eps=cfg.norm_eps, dtype=dtype)
    self.fuse = PlainLinear(2 * w, w, axes=(None, "embed"), std=init_std(cfg), use_bias=False,
                            dtype=dtype, rngs=rngs)
    # layer L + 1: its dropout sites (2L + 2, 2L + 3) do not collide with the embedding's (2L)
    self.block = Block(cfg, layer=cfg.num_layers + 1, dtype=dtype, rngs=rngs)
    adapter = residual_lib.RESIDUALS.get(cfg.residual.kind).stream_adapter
    self._stream_flops = adapter.flops(cfg)
    self._stream_width = adapter.width_of(cfg)

  def add_loss(self, stream: jax.Array, tokens: jax.Array, ctx, shared: "SharedParts") -> None:
    """Adds `mtp_weight` x the next-2-token cross-entropy to `ctx` as aux loss `mtp`; `stream`:
    the last block's output (uncollapsed), `tokens` the inputs."""
    stream = stream[:, :-1]  # [b, T-1, ...]: the last block's output at t
    b, t = stream.shape[:2]
    # token t+1 in stream space, embedded in its window (an n-gram embedding reads t, t-1, ...)
    nxt = shared.stream.expand(shared.embed(tokens)[:, 1:])
    w = self.segment
    hs = self.h_norm(stream.reshape(b, t, -1, w))
    es = self.e_norm(nxt.reshape(b, t, -1, w))
    z = self.fuse(jnp.concatenate([hs, es], axis=-1)).reshape(stream.shape)
    inner = dataclasses.replace(ctx, positions=ctx.positions[:, :-1])  # shares aux_losses
    z = self.block(z, inner)
    h = shared.stream.collapse(z)
    if shared.final_norm is not None:
      h = shared.final_norm(h)
    logits = self(h[:, :-1], shared.embed, ctx)  # position t predicts token t+2
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 2:])
    ctx.add_aux_loss("mtp", self.weight * jnp.mean(nll))

  def flops_per_token(self, seq_len: int) -> float:
    w = self.segment
    fuse = 2.0 * (self._stream_width // w) * 2 * w * w  # one 2w x w linear per segment
    extra = (fuse + self.block.flops_per_token(seq_len) + self._stream_flops
             + 2.0 * self.d_model * self.vocab)
    return super().flops_per_token(seq_len) + extra


@HEADS.register("over_decoding")
class OverDecodingHead(PlainHead):
  """Over-Decoding (arXiv:2501.16975 App. C, Alg. 2): an n-gram output vocabulary decomposed
  into per-offset vocabularies, so its cross-entropy is a sum over offsets (App. C, eq. 9):

    L = CE(h_t E^T, x_(t+1)) + sum_{j=2..n} lambda_j CE(h_t W_j U_j, x_(t+j))

  h_t is the decoder's final hidden state (after the final norm); W_j [d_model, rank] is the
  optional low-rank projection (`od_rank` 0: none) and U_j [., vocab] offset j's own
  vocabulary. Unlike `mtp` there is no extra block. The first term is the trainer's loss; the
  rest goes to the objective as the auxiliary loss `od` (training forwards only).
  """

  defaults = dict(od_weights="0.1",  # lambda_2, ..., lambda_n (comma-separated): n - 1 heads
                  od_rank=0)          # W_j's width (0: no projection, U_j reads h directly)

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg, dtype=dtype, rngs=rngs)
    self.weights = _parse_weights(cfg.head.od_weights)
    rank = cfg.head.od_rank
    if rank < 0:
      raise ConfigError(f"model.head.od_rank={rank} must be >= 0 (0: no projection)")
    std = init_std(cfg)
    width = rank or cfg.d_model
    self.rank = rank
    self.project = nnx.List([
        PlainLinear(cfg.d_model, rank, axes=("embed", None), std=std, use_bias=False,
                    dtype=dtype, rngs=rngs) for _ in self.weights] if rank else [])
    self.vocabularies = nnx.List([
        PlainLinear(width, cfg.vocab_size, axes=("embed", "vocab"), std=std, use_bias=False,
                    dtype=dtype, rngs=rngs) for _ in self.weights])

  def add_loss(self, stream: jax.Array, tokens: jax.Array, ctx, shared: "SharedParts") -> None:
    h = shared.stream.collapse(stream)
    if shared.final_norm is not None:
      h = shared.final_norm(h)
    t = tokens.shape[1]
    total = jnp.zeros((), jnp.float32)
    for i, weight in enumerate(self.weights):
      offset = i + 2  # position p predicts token p + offset
      if offset >= t:
        break
      z = h[:, :t - offset]
      if self.rank:
        z = self.project[i](z)
      logits = self.vocabularies[i](z).astype(jnp.float32)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, offset:])
      total = total + weight * jnp.mean(nll)
    ctx.add_aux_loss("od", total)

  def flops_per_token(self, seq_len: int) -> float:
    width = self.rank or self.d_model
    per_head = 2.0 * width * self.vocab + (2.0 * self.d_model * self.rank if self.rank else 0.0)
    return super().flops_per_token(seq_len) + len(self.weights) * per_head


def _parse_weights(text: str) -> list[float]:
  try:
    weights = [float(w) for w in str(text).split(",") if w.strip()]
  except ValueError:
    weights = []
  if not weights or any(w < 0 for w in weights):
    raise ConfigError(f"model.head.od_weights='{text}' must list the weights lambda_2, ..., "
                      "lambda_n (>= 0), comma-separated (e.g. '0.1' or '0.5,0.25')")
  return weights
