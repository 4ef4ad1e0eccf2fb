"""Adjacent-layer cosine of a trained model (an evaluator, at the end of a run).

  layer_cosine  mean cosine similarity between the inputs of adjacent blocks (token-wise), the
                representation-collapse measure of the hyper-connections, HybridNorm and
                PolyCom papers: near 1 means a block barely changes the stream. It goes into
                summary.json as `layer_cosine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research import sharding
from research.model.context import ForwardContext, positions_for


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


WHEN = "at_end"


def at_end(model, *, tokens: jax.Array, workdir, title: str, primary: bool) -> dict:
  del workdir, title, primary
  return {"layer_cosine": layer_cosine(model, tokens)}
