"""Exact-match scores of the synthetic tasks (research/data/synthetic.py).

At every answer position (`task.answer_mask`: MQAR's values after the separator, every value
of a facts instance) the model's argmax next token must equal the target:

  exact_match = correct answers / answers          (MQAR accuracy, fact recall)

Answers are single tokens, so per-answer exact match is per-token accuracy at those positions.
As an evaluator (research/eval/__init__.py; every_eval) it scores the trainer's fixed validation
batches (whole held-out instances) at every evaluation when the corpus is a synthetic task, and
the trainer writes `exact_match` beside the loss; `evaluate_task` scores any model on freshly
generated held-out instances.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data.synthetic import VALID_STREAM, Task
from research import sharding
from research.model.context import ForwardContext, positions_for


def count_correct(logits: jax.Array, inputs: jax.Array, targets: jax.Array,
                  task: Task) -> tuple[jax.Array, jax.Array]:
  """(correct answers, answers) of logits [batch, seq, vocab] against targets [batch, seq]."""
  mask = task.answer_mask(inputs, targets)
  hit = (jnp.argmax(logits, axis=-1) == targets) & mask
  return jnp.sum(hit).astype(jnp.float32), jnp.sum(mask).astype(jnp.float32)


def make_exact_match_step(graphdef: nnx.GraphDef, task: Task):
  """(params, other, batch) -> (correct, answers), jitted."""

  @jax.jit
  def step(params, other, batch):
    model = nnx.merge(graphdef, params, other)
    tokens = batch["inputs"]
    logits = model(tokens, ForwardContext(positions=positions_for(tokens)))
    return count_correct(logits, tokens, batch["targets"], task)

  return step


WHEN = "every_eval"


def make_step(graphdef: nnx.GraphDef, corpus):
  """The evaluator's step: exact match on a synthetic task's corpus; None on a text corpus."""
  task = getattr(corpus, "task", None)
  return make_exact_match_step(graphdef, task) if task is not None else None


def exact_match(step, params, other, batches: Iterable[dict]) -> float:
  """Fraction of answer positions predicted exactly over `batches`."""
  correct, total = 0.0, 0.0
  for batch in batches:
    c, n = step(params, other, batch)
    correct, total = correct + c, total + n
  value = sharding.to_host(correct) / np.maximum(sharding.to_host(total), 1.0)
  return float(value) if value.ndim == 0 else [float(v) for v in value]


score = exact_match  # the evaluator's score: (step, params, other, batches)


def evaluate_task(model: nnx.Module, task: Task, *, num: int = 256, batch_size: int = 32,
                  seed_offset: int = 1) -> float:
  """Exact match of `model` on `num` newly generated held-out instances of `task`, drawn from
  stream VALID_STREAM + seed_offset (neither the train nor the trainer's valid stream)."""
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  step = make_exact_match_step(graphdef, task)
  data = task.generate(num, VALID_STREAM + seed_offset)
  batches = [jax.tree.map(jnp.asarray, task.split(b))
             for b in np.array_split(data, max(1, -(-num // batch_size)))]
  return exact_match(step, params, other, batches)
