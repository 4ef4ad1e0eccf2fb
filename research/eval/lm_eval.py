"""Language-modelling evaluation: mean token loss and bits-per-byte on fixed batches."""

from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research import sharding
from research.model.context import ForwardContext, positions_for


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats: [batch, seq, vocab], [batch, seq] -> [batch, seq]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
  """Converts a loss in nats/token into bits/byte of the underlying UTF-8 text."""
  return loss_nats_per_token / math.log(2) / bytes_per_token


def make_eval_step(graphdef: nnx.GraphDef):
  """(params, other, batch) -> (sum of token losses, token count), jitted."""

  @jax.jit
  def eval_step(params, other, batch):
    model = nnx.merge(graphdef, params, other)
    tokens = batch["inputs"]
    logits = model(tokens, ForwardContext(positions=positions_for(tokens)))
    nll = cross_entropy(logits, batch["targets"])
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)

  return eval_step


def evaluate(eval_step, params, other, batches: Iterable[dict]) -> float | list[float]:
  """Mean loss in nats/token over all tokens of `batches`; a list of them when the step is
  vmapped over stacked seeds (research/train/loop.py)."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = eval_step(params, other, batch)
    total, count = total + s, count + n
  value = sharding.to_host(total / count)
  return float(value) if value.ndim == 0 else [float(v) for v in value]
