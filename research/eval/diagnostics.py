"""Diagnostics of a trained model that papers on residual streams and normalization plot.

  layer_cosine      mean cosine similarity between the inputs of adjacent blocks (token-wise),
                    the representation-collapse measure of the hyper-connections, HybridNorm and
                    PolyCom papers: near 1 means a block barely changes the stream
  block_grad_norms  the gradient norm of each block's parameters: the profile over depth that
                    shows growth (pre-norm) or vanishing (post-norm) toward the input
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.eval.lm_eval import positions_for
from research import sharding
from research.model.context import ForwardContext


def layer_cosine(model, tokens: jax.Array) -> list[float]:
  """[num_layers] cosine(h_l, h_{l+1}) averaged over tokens, where h_l is the (collapsed)
  stream entering block l and h_L the last block's output."""

  @nnx.jit
  def run(model, tokens):
    hidden = model.hidden_states(tokens, ForwardContext(positions=positions_for(tokens)))
    h = jnp.stack([x.astype(jnp.float32) for x in hidden])  # [L + 1, batch, seq, embed]
    h = h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-12)
    return jnp.mean(jnp.sum(h[:-1] * h[1:], axis=-1), axis=(1, 2))

  return [float(x) for x in sharding.to_host(run(model, tokens))]


def block_grad_norms(grads) -> dict[str, jax.Array]:
  """{"grad_norm/block_<i>": norm} from the gradient State of a DecoderLM's parameters."""
  blocks = grads["blocks"]
  if not all(isinstance(k, int) for k in blocks.keys()):  # stacked blocks (model.scan_blocks)
    squares = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                  for g in jax.tree.leaves(blocks))
    return {f"grad_norm/block_{i:02d}": jnp.sqrt(squares[i]) for i in range(squares.shape[0])}
  return {f"grad_norm/block_{i:02d}": optax.tree.norm(blocks[i]) for i in sorted(blocks.keys())}
