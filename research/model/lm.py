"""The decoder LM, assembled from the composition points named in `config.model`.

  tokens -> embed -> stream.expand -> [Block] x num_layers -> stream.collapse
         -> final norm (pre-norm placements) -> head -> logits

(`stream` is the residual option's stream adapter, one per decoder: the identity for plain,
n copies / their sum for hyper-connections, VWN's layout / group norm + reduce.)

With token repetition (`model.phd`, phd.py) the embeddings are copied K times into the layout
[originals ; hidden copies] before the blocks, which attend under the layout's mask, and the
final copy of each token goes on to the head: logits stay one row per input token.

A Block (block.py) is two sublayers (sequence mixer, channel mixer); each is wrapped by its
norm placement and joined to the stream by its own residual connection, so every family can
change without the others knowing. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from research.model import accounting
from research.model import embedding as embedding_lib
from research.model import head as head_lib
from research.model import norms as norms_lib
from research.model import phd as phd_lib
from research.model import residual as residual_lib
from research.model.block import Block
from research.model.context import ForwardContext, positions_for
from research.sharding import constrain


class DecoderLM(nnx.Module):

  def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if cfg.vocab_size <= 0:
      raise ValueError("model.vocab_size must be set (it is filled from the tokenizer)")
    self.cfg = cfg
    self.dtype = dtype
    self.embed = embedding_lib.EMBEDDINGS.get(cfg.embed.kind)(cfg, dtype=dtype, rngs=rngs)
    self.residual_cls = residual_lib.RESIDUALS.get(cfg.residual.kind)
    self.scanned = cfg.get("scan_blocks", "off") == "on" and cfg.num_layers > 0
    if self.scanned:
      self.blocks = stacked_blocks(cfg, dtype=dtype, rngs=rngs)
    else:
      self.blocks = nnx.List([Block(cfg, layer=i, dtype=dtype, rngs=rngs)
                              for i in range(cfg.num_layers)])
    needs_final = norms_lib.NORM_PLACEMENTS.get(cfg.norm.kind).final_norm or not cfg.num_layers
    self.final_norm = (norms_lib.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
                       if needs_final else None)
    self.head = head_lib.HEADS.get(cfg.head.kind)(cfg, dtype=dtype, rngs=rngs)
    # expand / collapse of the residual stream (parameters for VWN); made last so that the
    # other parameters draw the same random numbers whatever the residual option
    self.stream = self.residual_cls.stream_adapter(cfg, dtype=dtype, rngs=rngs)
    self.remat = cfg.remat
    if self.remat not in ("none", "block"):
      raise ValueError(f"model.remat='{self.remat}' is not one of none, block")
    self.phd = phd_lib.settings(cfg)  # token repetition (static); off unless kind and K > 1

  def __call__(self, tokens: jax.Array, ctx: ForwardContext | None = None, *,
               logits_at: jax.Array | None = None) -> jax.Array:
    """tokens: [batch, seq] int32 -> logits [batch, seq, vocab] fp32.

    Auxiliary losses that modules add land in `ctx.aux_losses`. `logits_at` [batch, k] int32
    (inference: the last prompt token of each row) computes the logits at those sequence
    indices only -> [batch, k, vocab].
    """
    if ctx is None:
      ctx = ForwardContext(positions=positions_for(tokens))
    h, stream, layout = self._run_blocks(tokens, ctx, logits_at=logits_at)
    if layout is not None:  # PHD §3: the final copy of each token predicts the next one
      h, stream = layout.outputs(h), layout.outputs(stream)
    elif logits_at is not None:
      h = jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
    if self.final_norm is not None:
      h = self.final_norm(h)
    logits = self.head(h, self.embed, ctx)
    if logits_at is None and ctx.cache is None:  # a head's own loss (MTP): training only
      self.head.add_loss(stream, tokens, ctx, self.shared_parts())
    return constrain(logits, ("batch", "seq", "act_vocab"))

  def shared_parts(self) -> head_lib.SharedParts:
    """The decoder's modules a head's loss reuses (MTP: the embedding, the stream adapter, the
    final norm)."""
    return head_lib.SharedParts(embed=self.embed, stream=self.stream, final_norm=self.final_norm)

  def _run_blocks(self, tokens, ctx: ForwardContext, hidden: list | None = None,
                  logits_at: jax.Array | None = None):
    """Embedding and blocks; returns (the collapsed stream before the final norm, the last
    block's stream uncollapsed, the token-repetition layout or None). With `hidden` a list,
    appends the collapsed stream entering each block and the last block's output (under
    model.phd every copy, in the layout's order)."""
    tokens = constrain(tokens, ("batch", "seq"))
    h = self.embed(tokens, ctx)
    h = ctx.dropout(h, self.cfg.dropout, site=2 * self.cfg.num_layers)
    layout, outer = None, ctx
    if self.phd.active:  # K copies of each token, one embedding (PHD §3 "sequence layout")
      layout = phd_lib.layout(self.phd, ctx, tokens.shape[1], logits_at)
      h = layout.expand(h)
      ctx = dataclasses.replace(ctx, positions=layout.positions, phd=layout)
    stream = self.stream.expand(h)
    if self.scanned:
      stream = self._scan_blocks(stream, ctx, hidden)
    for block in ([] if self.scanned else self.blocks):
      if hidden is not None:
        hidden.append(self.stream.collapse(stream))
      stream = self._apply_block(block, stream, ctx)
    h = self.stream.collapse(stream)
    if hidden is not None:
      hidden.append(h)
    if layout is not None:  # what the blocks added or replaced, back in the caller's context
      outer.aux_losses, outer.slots, outer.cache = ctx.aux_losses, ctx.slots, ctx.cache
    return h, stream, layout

  def hidden_states(self, tokens: jax.Array, ctx: ForwardContext | None = None) -> list:
    """[num_layers + 1] x [batch, seq, embed]: the input of each block, then the last block's
    output (streams collapsed), for diagnostics such as adjacent-layer similarity. Under
    model.phd the sequence axis holds every copy, [originals ; hidden copies]."""
    if ctx is None:
      ctx = ForwardContext(positions=positions_for(tokens))
    hidden = []
    self._run_blocks(tokens, ctx, hidden)
    return hidden

  def _scan_blocks(self, stream, ctx: ForwardContext, hidden: list | None):
    """The stacked blocks (model.scan_blocks) as one scan: one block's program, run
    num_layers times. Blocks in a scan may not write the context (aux losses, statistics,
    cross-layer state, a KV cache): scan_unsupported refuses the options that do."""
    if ctx.cache is not None:
      raise ValueError("model.scan_blocks=on has no KV-cache (inference) path yet")

    # A plain lax.scan over the stacked variables, merged into a Block inside: nnx.scan would
    # refuse variables traced one level out (a gradient-accumulation scan, eval_shape).
    graphdef, variables = nnx.split(self.blocks)

    def body(stream, layer_variables):
      before = self.stream.collapse(stream) if hidden is not None else None
      block = nnx.merge(graphdef, layer_variables)
      return self._apply_block(block, stream, ctx), before

    stream, before = jax.lax.scan(body, stream, variables)
    if hidden is not None:
      hidden.extend(before[i] for i in range(before.shape[0]))
    return stream

  def _apply_block(self, block: Block, stream, ctx: ForwardContext):
    if self.remat == "none":
      return block(stream, ctx)

    # Under remat the block runs in its own trace: its variables and the context's mutable
    # parts go in and out explicitly so nothing traced inside leaks out. The block is a pure
    # function of its variables (jax.checkpoint, not nnx.remat, which writes every variable
    # back after the call and refuses integer buffers such as a memory layer's permutation).
    graphdef, variables = nnx.split(block)

    def run(variables, stream, aux, slots, cache):
      inner = dataclasses.replace(ctx, aux_losses=dict(aux), slots=dict(slots), cache=cache)
      out = nnx.merge(graphdef, variables)(stream, inner)
      return out, inner.aux_losses, inner.slots, inner.cache

    out, ctx.aux_losses, ctx.slots, ctx.cache = jax.checkpoint(run)(
        variables, stream, ctx.aux_losses, ctx.slots, ctx.cache)
    return out

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token (multiply-add = 2), analytic; training is 3x this. Under
    model.phd per input token: its K copies through the blocks, attending the mask's keys."""
    if self.phd.active:
      return self._repeated_flops(seq_len)
    ends = (self.embed.flops_per_token() + self.stream.flops_per_token()
            + self.head.flops_per_token(seq_len))
    if self.scanned:  # one stacked block of num_layers identical ones
      return self.cfg.num_layers * self.blocks.flops_per_token(seq_len) + ends
    return sum(b.flops_per_token(seq_len) for b in self.blocks) + ends

  def _repeated_flops(self, seq_len: int) -> float:
    """K x a copy's blocks and stream adapter (every copy runs the FFN, PHD §3), the blocks
    counted at the length whose causal average (length + 1) / 2 is the mask's mean keys per
    copy (attention is the only block cost that depends on the length); the embedding and the
    head once (only the final copy is unembedded)."""
    k = self.phd.repeats
    length = 2 * phd_lib.keys_per_token(self.phd, seq_len) / k - 1
    if self.scanned:
      blocks = self.cfg.num_layers * self.blocks.flops_per_token(length)
    else:
      blocks = sum(b.flops_per_token(length) for b in self.blocks)
    return (k * (blocks + self.stream.flops_per_token()) + self.embed.flops_per_token()
            + self.head.flops_per_token(seq_len))


def scan_unsupported(cfg) -> str | None:
  """Why `cfg` (config.model) cannot run its blocks as one scan, or None. A scan runs one
  block's program for every layer, so blocks must be identical and write nothing into the
  forward's context: options that depend on the layer index, keep cross-layer state or add
  auxiliary losses need the unrolled form."""
  reasons = []
  if cfg.attention.kind != "dense":
    reasons.append(f"attention.kind={cfg.attention.kind} (cross-layer state)")
  if cfg.channel.kind != "ffn":
    reasons.append(f"channel.kind={cfg.channel.kind} (per-layer units or auxiliary losses)")
  if cfg.residual.kind != "plain":
    reasons.append(f"residual.kind={cfg.residual.kind} (per-layer connection init)")
  placement = norms_lib.NORM_PLACEMENTS.get(cfg.norm.kind)
  if placement.modes(0) != placement.modes(1):
    reasons.append(f"norm.kind={cfg.norm.kind} (block 0 differs)")
  if cfg.init_out_scaling == "layer_depth":
    reasons.append("init_out_scaling=layer_depth (init depends on the layer)")
  if cfg.dropout:
    reasons.append("dropout > 0 (its sites are numbered by layer)")
  if cfg.head.kind != "plain":
    reasons.append(f"head.kind={cfg.head.kind}")
  return "; ".join(reasons) or None


def stacked_blocks(cfg, *, dtype, rngs: nnx.Rngs) -> Block:
  """num_layers blocks as one Block whose parameters have a leading `layers` axis (logical
  name "layers": replicated). Each layer draws its own random init (split rngs), so a scanned
  model's init is not the unrolled model's."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(cfg, layer=0, dtype=dtype, rngs=rngs)

  return make(rngs)


def compute_dtype(precision: str, platform: str | None = None):
  """The mixed-precision policy: parameters fp32; compute fp32 on CPU, bf16 on GPU/TPU."""
  if precision == "fp32":
    return jnp.float32
  if precision == "bf16":
    return jnp.bfloat16
  if precision != "auto":
    raise ValueError(f"train.precision='{precision}' is not one of auto, fp32, bf16")
  platform = platform or jax.default_backend()
  return jnp.float32 if platform == "cpu" else jnp.bfloat16


def abstract_model(cfg, dtype=jnp.float32) -> DecoderLM:
  """The model with ShapeDtypeStruct leaves: shapes, counts and FLOPs without allocating."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: DecoderLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(state: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def model_summary(model: DecoderLM, seq_len: int) -> dict[str, float]:
  params = nnx.state(model, nnx.Param)
  n = count_params(params)
  n_embed = math.prod(model.embed.table.shape)
  fwd = model.flops_per_token(seq_len)
  return dict(params=n, params_non_embedding=n - n_embed, flops_per_token_fwd=fwd,
              flops_per_token_train=3 * fwd, params_activated=accounting.params_activated(model),
              param_bytes_per_token=accounting.param_bytes_per_token(model))
