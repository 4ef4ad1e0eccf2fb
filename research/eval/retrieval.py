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

import dataclasses
from typing import Sequence

import numpy as np

from research.infer.engine import Engine, stat_mean

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
MULTI_NEEDLE = " The pass key of {name} is {key}."
MULTI_QUESTION = " What is the pass key of {name}? The pass key of {name} is"
NAMES = ("red", "blue", "green", "gold", "white", "black", "brown", "grey", "pink", "violet")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass
class RetrievalExample:
  tokens: np.ndarray  # [length] int32, the prompt
  answer: str  # the key asked for
  depth: float  # where the asked needle starts, as a fraction of the haystack
  keys: dict[str, str]  # every needle: name -> key ("" for the single-key task)


def _encodes(tokenizer, text: str) -> bool:
  try:
    tokenizer.encode(text)
  except Exception:  # a character vocabulary raises on characters it lacks
    return False
  return True


def key_alphabet(tokenizer) -> str:
  """Digits if the tokenizer encodes them all, else the lowercase letters it encodes."""
  if _encodes(tokenizer, "0123456789"):
    return "0123456789"
  letters = "".join(c for c in "abcdefghijklmnopqrstuvwxyz" if _encodes(tokenizer, c))
  if len(letters) < 10:
    raise ValueError("the tokenizer encodes neither the digits nor 10 lowercase letters")
  return letters


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def make_example(tokenizer, filler: np.ndarray, length: int, rng: np.random.Generator, *,
                 num_keys: int = 1, depth: float | None = None,
                 key_len: int = 5) -> RetrievalExample:
  """One prompt of exactly `length` tokens; num_keys = 1 is passkey, > 1 the multi-key task.

  filler: a token stream (e.g. the validation split) the haystack is cut from at a random
  offset. depth: the asked needle's position in the haystack in [0, 1] (default random).
  """
  if not 1 <= num_keys <= len(NAMES):
    raise ValueError(f"num_keys must be in 1..{len(NAMES)}, got {num_keys}")
  alphabet = key_alphabet(tokenizer)
  names = [""]
  if num_keys > 1:
    names = [str(n) for n in rng.choice(NAMES, size=num_keys, replace=False)]
  keys = {}
  for name in names:
    while True:  # distinct keys, so the asked one is unambiguous
      key = "".join(rng.choice(list(alphabet), size=key_len))
      if key not in keys.values():
        break
    keys[name] = key
  asked = names[int(rng.integers(num_keys))]
  if num_keys == 1:
    needles = {asked: _encode(tokenizer, NEEDLE.format(key=keys[asked]))}
    question = _encode(tokenizer, QUESTION)
  else:
    needles = {n: _encode(tokenizer, MULTI_NEEDLE.format(name=n, key=k)) for n, k in keys.items()}
    question = _encode(tokenizer, MULTI_QUESTION.format(name=asked))
  n_fill = length - len(question) - sum(len(x) for x in needles.values())
  if n_fill < 1:
    raise ValueError(f"length {length} is too short for the needles and the question")
  if len(filler) < n_fill:
    raise ValueError(f"the filler stream ({len(filler)} tokens) is shorter than the "
                     f"{n_fill} haystack tokens of a {length}-token prompt")
  start = int(rng.integers(len(filler) - n_fill + 1))
  hay = np.asarray(filler[start:start + n_fill], np.int32)
  depth = float(rng.uniform()) if depth is None else float(depth)
  cuts = {asked: int(round(depth * n_fill))}
  for name in names:
    if name != asked:
      cuts[name] = int(rng.integers(n_fill + 1))
  pieces, prev = [], 0
  for name in sorted(names, key=lambda n: cuts[n]):
    pieces += [hay[prev:cuts[name]], needles[name]]
    prev = cuts[name]
  pieces += [hay[prev:], question]
  tokens = np.concatenate(pieces).astype(np.int32)
  assert len(tokens) == length, (len(tokens), length)
  return RetrievalExample(tokens=tokens, answer=keys[asked], depth=depth, keys=keys)


def exact_match(generated: str, answer: str) -> bool:
  """The continuation's first non-space characters are the answer."""
  return generated.lstrip()[:len(answer)] == answer


def retrieval_eval(model, tokenizer, filler: np.ndarray, *, lengths: Sequence[int],
                   num_examples: int = 8, num_keys: int = 1, key_len: int = 5, seed: int = 0,
                   batch_size: int = 4, engine: Engine | None = None) -> dict:
  """Accuracy per prompt length of the model's greedy answers (exact match).

  Depths are spread evenly over [0, 1] at each length. Returns {"task", "accuracy" (mean over
  lengths), "lengths": {length: {"accuracy", "correct", "examples", "density",
  "query_aware"}}}; density (fraction of causal blocks computed, mean over layers, rows and
  batches) and query_aware (fraction of query-aware heads) are None after a dense prefill.
  """
  rng = np.random.default_rng(seed)
  max_new = len(tokenizer.encode(" " + key_alphabet(tokenizer)[0] * key_len)) + 2
  engine = engine or Engine(model, max_len=max(lengths) + max_new)
  out = {"task": "passkey" if num_keys == 1 else f"multikey{num_keys}", "lengths": {}}
  for length in lengths:
    depths = (np.arange(num_examples) + 0.5) / num_examples
    examples = [make_example(tokenizer, filler, length, rng, num_keys=num_keys, depth=d,
                             key_len=key_len) for d in depths]
    correct, density, query_aware = 0, [], []
    for i in range(0, num_examples, batch_size):
      chunk = examples[i:i + batch_size]
      gen = engine.generate(np.stack([e.tokens for e in chunk]), max_new_tokens=max_new)
      for e, row in zip(chunk, gen.tokens):
        correct += exact_match(tokenizer.decode(row), e.answer)
      d, q = gen.density(), stat_mean(gen.stats, "flexprefill/query_aware")
      if d is not None:
        density += list(d)
        query_aware += list(q)
    out["lengths"][int(length)] = {
        "accuracy": correct / num_examples, "correct": correct, "examples": num_examples,
        "density": float(np.mean(density)) if density else None,
        "query_aware": float(np.mean(query_aware)) if query_aware else None}
  out["accuracy"] = float(np.mean([v["accuracy"] for v in out["lengths"].values()]))
  return out
