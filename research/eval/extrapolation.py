"""Length extrapolation (an evaluator, at the end of a run): validation loss on windows of 1x,
2x, 4x and 8x the training context.

  extrapolation  {"<length>": {"loss": mean loss over every token of the windows,
                               "tail": mean loss over each window's last seq_len tokens}}
                 in summary.json; `tail` is the loss at positions the model never trained at
                 (equal to `loss` at 1x), the sharper test of whether it extrapolates.

The windows are `WINDOWS` evenly spaced slices of the validation token stream (the same starts
for every length where the stream allows), so lengths differ in context, not in text. Any
sequence mixer runs (softmax attention reads RoPE positions it never trained at; a recurrent
mixer carries its state). `length_extrapolation` is the reusable function; as an evaluator
(`eval.evaluators` naming `extrapolation`) it reads the run's data settings from config.json.

On the `group` word problem (research/data/synthetic.py) a long window of the validation stream
would cross instances, so the evaluator draws `TASK_INSTANCES` held-out instances of each length
instead and adds their exact match (`exact_match`: the fraction of running products predicted
right) to each entry: the state-tracking test of length generalisation.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.data.pipeline import next_tokens
from research.eval.exact_match import evaluate_task
from research.eval.lm_eval import cross_entropy

MULTIPLES = (1, 2, 4, 8)
WINDOWS = 16  # windows per length
TASK_INSTANCES = 64  # held-out instances per length on the group word problem
BATCH = 4


def windows(valid: np.ndarray, length: int, count: int = WINDOWS) -> np.ndarray:
  """[n, length + 1] int32 slices of `valid` (inputs and the next-token targets), n <= count,
  evenly spaced; fewer when the stream is short. A stream shorter than one window is a
  ValueError naming the lengths."""
  span = length + 1
  if len(valid) < span:
    raise ValueError(f"the validation stream ({len(valid)} tokens) is shorter than one "
                     f"extrapolation window of {span}")
  last = len(valid) - span
  n = min(count, last + 1)
  starts = np.linspace(0, last, n).astype(np.int64)
  return np.stack([valid[s:s + span] for s in starts]).astype(np.int32)


def length_extrapolation(model, valid: np.ndarray | None, seq_len: int,
                         multiples=MULTIPLES, count: int = WINDOWS, task=None) -> dict[str, dict]:
  """{str(m * seq_len): {"loss", "tail"}} for each multiple m (see the module docstring); with a
  `group` task, over held-out instances of each length, with their `exact_match`."""

  @nnx.jit
  def nll(model, inputs, targets):
    return cross_entropy(model(inputs, None), targets)  # [b, length]

  out = {}
  for m in multiples:
    length = m * seq_len
    long_task = None
    if task is not None:
      long_task = dataclasses.replace(task, length=length + 1)
      data = long_task.generate(count, 2)  # neither the train (0) nor the valid (1) stream
    else:
      data = windows(valid, length, count)
    split = long_task.split if long_task is not None else next_tokens
    losses = []
    for i in range(0, len(data), BATCH):
      batch = split(data[i:i + BATCH])
      losses.append(np.asarray(sharding.to_host(
          nll(model, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])))))
    per_token = np.concatenate(losses)  # [n, length]
    out[str(length)] = {"loss": float(per_token.mean()),
                        "tail": float(per_token[:, -seq_len:].mean())}
    if long_task is not None:
      out[str(length)]["exact_match"] = evaluate_task(model, long_task, num=count,
                                                      batch_size=BATCH, seed_offset=1)
  return out


WHEN = "at_end"


def at_end(model, *, tokens: jax.Array, workdir, title: str, primary: bool) -> dict:
  del title, primary, tokens
  from research import run_config  # pylint: disable=import-outside-toplevel
  from research.data import load_tokenized  # pylint: disable=import-outside-toplevel
  saved = json.loads((workdir / "config.json").read_text())["config"]
  c = run_config.expand(saved)
  corpus = load_tokenized(c.data)
  task = corpus.task if corpus.task is not None and corpus.task.name == "group" else None
  if corpus.task is not None and task is None:
    return {}  # mqar / facts: instances of one length; nothing to extrapolate
  count = TASK_INSTANCES if task is not None else WINDOWS
  return {"extrapolation": length_extrapolation(model, corpus.valid, c.data.seq_len, count=count,
                                                task=task)}

