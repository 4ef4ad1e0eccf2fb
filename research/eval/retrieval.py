"""Passkey retrieval (needle in a haystack), generated on the fly, scored by exact match.

A prompt of exactly `length` tokens is corpus text (the haystack) with a needle sentence at a
chosen depth and a question at the end:

  <filler ...> The pass key is 40172. Remember it. 40172 is the pass key. <filler ...>
  What is the pass key? The pass key is

The multi-key variant hides several needles "The pass key of <name> is <key>." and asks for
one name's key, so the model has to retrieve the right one, not any number-like token. The
model's greedy continuation is correct when its first non-space characters are the key.
Pieces are tokenized separately and joined as token ids, so every length is exact for any
tokenizer; keys use digits when the tokenizer can encode them, else the lowercase letters it
encodes (a character vocabulary such as Tiny Shakespeare's has almost no digits).

Every prompt of one length has that length, so a batch needs no padding (FlexPrefill prefill
requires that). The scores come with FlexPrefill's density when the model prefills sparsely.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from research.data.passkey import (  # noqa: F401  (the prompt builder, re-exported)
    MULTI_NEEDLE, MULTI_QUESTION, NAMES, NEEDLE, QUESTION, RetrievalExample, key_alphabet,
    make_example)
from research.infer.engine import Engine, stat_mean

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def exact_match(generated: str, answer: str) -> bool:
  """The continuation's first non-space characters are the answer."""
  return generated.lstrip()[:len(answer)] == answer


def key_char_accuracy(generated: str, answer: str) -> float:
  """Fraction of the key's characters the continuation has right, position by position.

  A graded score beside exact match: a model that copies part of the needle scores above the
  chance level 1 / len(key_alphabet) while its exact match is still 0.
  """
  got = generated.lstrip()[:len(answer)]
  return sum(a == b for a, b in zip(got, answer)) / len(answer)


def retrieval_eval(model, tokenizer, filler: np.ndarray, *, lengths: Sequence[int],
                   num_examples: int = 8, num_keys: int = 1, key_len: int = 5, seed: int = 0,
                   batch_size: int = 4, engine: Engine | None = None) -> dict:
  """Accuracy per prompt length of the model's greedy answers (exact match).

  Depths are spread evenly over [0, 1] at each length. Returns {"task", "accuracy" (mean over
  lengths), "char_accuracy" (key_char_accuracy, mean over lengths), "chance" (its chance
  level), "lengths": {length: {"accuracy", "char_accuracy", "correct", "examples", "density",
  "query_aware"}}}; density (fraction of causal blocks computed, mean over layers, rows and
  batches) and query_aware (fraction of query-aware heads) are None after a dense prefill.
  """
  rng = np.random.default_rng(seed)
  alphabet = key_alphabet(tokenizer)
  max_new = len(tokenizer.encode(" " + alphabet[0] * key_len)) + 2
  engine = engine or Engine(model, max_len=max(lengths) + max_new)
  out = {"task": "passkey" if num_keys == 1 else f"multikey{num_keys}", "lengths": {}}
  for length in lengths:
    depths = (np.arange(num_examples) + 0.5) / num_examples
    examples = [make_example(tokenizer, filler, length, rng, num_keys=num_keys, depth=d,
                             key_len=key_len) for d in depths]
    correct, chars, density, query_aware = 0, 0.0, [], []
    for i in range(0, num_examples, batch_size):
      chunk = examples[i:i + batch_size]
      gen = engine.generate(np.stack([e.tokens for e in chunk]), max_new_tokens=max_new)
      for e, row in zip(chunk, gen.tokens):
        text = tokenizer.decode(row)
        correct += exact_match(text, e.answer)
        chars += key_char_accuracy(text, e.answer)
      d, q = gen.density(), stat_mean(gen.stats, "flexprefill/query_aware")
      if d is not None:
        density += list(d)
        query_aware += list(q)
    out["lengths"][int(length)] = {
        "accuracy": correct / num_examples, "char_accuracy": chars / num_examples,
        "correct": correct, "examples": num_examples,
        "density": float(np.mean(density)) if density else None,
        "query_aware": float(np.mean(query_aware)) if query_aware else None}
  out["accuracy"] = float(np.mean([v["accuracy"] for v in out["lengths"].values()]))
  out["char_accuracy"] = float(np.mean([v["char_accuracy"] for v in out["lengths"].values()]))
  out["chance"] = 1.0 / len(alphabet)
  return out
