"""Passkey prompts (needle in a haystack), shared by the retrieval evals and the training mix.

A prompt of exactly `length` tokens is corpus text (the haystack) with a needle sentence at a
chosen depth and a question at the end:

  <filler ...> The pass key is 40172. Remember it. 40172 is the pass key. <filler ...>
  What is the pass key? The pass key is

The multi-key variant hides several needles "The pass key of <name> is <key>." and asks for
one name's key, so the model has to retrieve the right one, not any number-like token.
Pieces are tokenized separately and joined as token ids, so every length is exact for any
tokenizer; keys use digits when the tokenizer can encode them, else the lowercase letters it
encodes (a character vocabulary such as Tiny Shakespeare's has almost no digits).

`training_window` is a prompt followed by its answer, one training window long: mixed into a
text corpus's training batches (`data.passkey_mix`, research/data/pipeline.py), it teaches a
small model the retrieval that research/eval/retrieval.py scores.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
MULTI_NEEDLE = " The pass key of {name} is {key}."
MULTI_QUESTION = " What is the pass key of {name}? The pass key of {name} is"
NAMES = ("red", "blue", "green", "gold", "white", "black", "brown", "grey", "pink", "violet")


class PromptTooShort(ValueError):
  """The needles and the question do not leave room for a haystack in the prompt."""


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
    raise PromptTooShort(f"length {length} is too short for the needles and the question")
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


def answer_text(key: str) -> str:
  """What follows the question in a needle: " <key>."."""
  return f" {key}."


def _probe_keys(tokenizer, key_len: int) -> list[str]:
  """Keys that bound the token length of any key: each letter of the alphabet repeated, and a
  fixed draw of mixed ones (exact for character and byte tokenizers, where every key of
  key_len characters is key_len tokens)."""
  alphabet = list(key_alphabet(tokenizer))
  rng = np.random.default_rng(0)
  return [c * key_len for c in alphabet] + ["".join(rng.choice(alphabet, size=key_len))
                                            for _ in range(16)]


def answer_tokens(tokenizer, key_len: int) -> int:
  """Tokens of the answer a training window ends with (that of a probe key)."""
  return len(_encode(tokenizer, answer_text(key_alphabet(tokenizer)[0] * key_len)))


def prompt_overhead(tokenizer, num_keys: int, key_len: int) -> int:
  """The most tokens the needles and the question of a `num_keys` prompt take, over the names
  and keys that can be drawn: a prompt of length L has at least L - this haystack tokens."""
  keys = _probe_keys(tokenizer, key_len)

  def longest(template: str, **names) -> int:
    return max(len(_encode(tokenizer, template.format(key=k, **names))) for k in keys)

  if num_keys == 1:
    return longest(NEEDLE) + len(_encode(tokenizer, QUESTION))
  needles = sorted((longest(MULTI_NEEDLE, name=n) for n in NAMES), reverse=True)[:num_keys]
  question = max(len(_encode(tokenizer, MULTI_QUESTION.format(name=n))) for n in NAMES)
  return sum(needles) + question


def min_training_window(tokenizer, max_keys: int, key_len: int) -> int:
  """The shortest training window that holds a prompt with up to `max_keys` needles, at least
  one haystack token, and the answer, whatever names and keys are drawn."""
  return (max(prompt_overhead(tokenizer, k, key_len) for k in range(1, max_keys + 1))
          + 1 + answer_tokens(tokenizer, key_len))


def training_window(tokenizer, filler: np.ndarray, window: int, rng: np.random.Generator, *,
                    max_keys: int = 1, key_len: int = 5,
                    num_keys: int | None = None) -> np.ndarray:
  """A prompt with 1..max_keys needles (drawn uniformly; `num_keys` fixes the number) and its
  answer: exactly `window` int32
  tokens, the answer's tokens last, so the next-token loss at the question's end is retrieval.

  The prompt is built for the answer length of a probe key; with a subword tokenizer a drawn
  key may encode to another length, or to more tokens than the probes bound
  (`min_training_window`), and the draw is repeated (a character or byte tokenizer in a window
  of at least `min_training_window` tokens never needs it).
  """
  n_answer = answer_tokens(tokenizer, key_len)
  for _ in range(32):
    keys = int(rng.integers(1, max_keys + 1)) if num_keys is None else num_keys
    try:
      example = make_example(tokenizer, filler, window - n_answer, rng, num_keys=keys,
                             key_len=key_len)
    except PromptTooShort:
      continue
    answer = _encode(tokenizer, answer_text(example.answer))
    if len(answer) == n_answer:
      return np.concatenate([example.tokens, answer]).astype(np.int32)
  raise ValueError(f"no key of {key_len} characters encodes to {n_answer} answer tokens in 32 "
                   "draws: use another key length")
