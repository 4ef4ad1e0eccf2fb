"""Perplexity of long validation windows after a dense or a sparse (FlexPrefill) prefill.

Each window of P + C tokens is split into a prefix of P tokens, prefilled into the KV cache with
the model's prefill attention, and a continuation of C tokens scored with dense attention over
that cache: the prefill's last logits predict token P, and one continuation forward over tokens
P .. P+C-2 predicts P+1 .. P+C-1. Under FlexPrefill the prefix keys and values of every layer
above the first come from sparsely attended hidden states, so the continuation's loss measures
what the sparse prefill lost. `ppl_delta` compares a result with the dense one.
"""

from __future__ import annotations

import math

import numpy as np
import optax

from research.infer.engine import Engine, stat_mean


def long_windows(tokens: np.ndarray, window: int, num: int) -> np.ndarray:
  """[num, window] non-overlapping windows spread evenly over the token stream."""
  tokens = np.asarray(tokens, np.int32)
  total = len(tokens) // window
  if num < 1 or total < num:
    raise ValueError(f"the stream holds {total} windows of {window} tokens, fewer than {num}")
  starts = (np.arange(num) * total // num) * window
  return tokens[starts[:, None] + np.arange(window)[None, :]]


def continuation_nll(model, windows: np.ndarray, *, prefix_len: int, batch_size: int = 4,
                     engine: Engine | None = None) -> dict:
  """Mean NLL (nats/token) of the continuation windows[:, prefix_len:] given the prefix.

  Returns {"nll", "ppl", "tokens", "prefix_len", "continuation_len", "density",
  "query_aware"} (density and query_aware: FlexPrefill's, mean over layers and windows; None
  after a dense prefill).
  """
  windows = np.asarray(windows, np.int32)
  n, w = windows.shape
  c = w - prefix_len
  if prefix_len < 1 or c < 1:
    raise ValueError(f"prefix_len must be in 1..{w - 1} for windows of {w}, got {prefix_len}")
  engine = engine or Engine(model, max_len=w)
  total, count, density, query_aware = 0.0, 0, [], []
  for i in range(0, n, batch_size):
    batch = windows[i:i + batch_size]
    pre = engine.prefill(batch[:, :prefix_len])
    logits = np.asarray(pre.logits)[:, None]  # predicts token prefix_len
    if c > 1:
      more, _ = engine.extend(pre.cache, batch[:, prefix_len:w - 1])
      logits = np.concatenate([logits, np.asarray(more)], axis=1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, prefix_len:])
    total += float(np.sum(nll))
    count += nll.size
    d = stat_mean(pre.stats, "flexprefill/density")
    if d is not None:
      density += list(d)
      query_aware += list(stat_mean(pre.stats, "flexprefill/query_aware"))
  nll = total / count
  return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "prefix_len": prefix_len,
          "continuation_len": c, "density": float(np.mean(density)) if density else None,
          "query_aware": float(np.mean(query_aware)) if query_aware else None}


def ppl_delta(result: dict, dense: dict) -> dict:
  """result's change against the dense prefill's: delta_nll (nats/token), delta_ppl and the
  relative change rel_ppl = ppl / ppl_dense - 1."""
  return {"delta_nll": result["nll"] - dense["nll"], "delta_ppl": result["ppl"] - dense["ppl"],
          "rel_ppl": result["ppl"] / dense["ppl"] - 1.0}
