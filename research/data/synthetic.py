"""Synthetic tasks as corpora: multi-query associative recall (`mqar`), fact recall (`facts`) and
the word problem of a permutation group (`group`, state tracking).

All are token-level, with their own vocabulary (tokenizer `synthetic`), and are generated at
load time from `data.synthetic.seed` (nothing is stored on disk). Every instance is exactly
`seq_len + 1` tokens, one training window: the pipeline starts its windows on the instance grid
(`TokenizedCorpus.task` set, so `make_train_iterator(aligned=True)`), and the fixed validation
batches are whole held-out instances. `Task.split` makes a window's inputs and targets: the
next tokens (a model trains on them like on text, loss on every position), except for the word
problem with `products="targets"`. `research.eval.exact_match` scores exact match at the
answer positions.

Vocabulary (one layout for both tasks):

  0 pad   1 sep   keys k0..   values v0..   entity digits e0..   attributes a0..

mqar   (Zoology's MQAR, Arora et al. 2023, as a next-token task): `pairs` key-value pairs with
       distinct keys, then `sep`, then queries "k v" over random orders of the same keys until
       the instance is full (a trailing odd token is pad):
         k12 v3 k7 v40 ... | k7 v40 k12 v3 ...
       Answers: value tokens after the separator (each predicted from its query key).
       Held-out instances: new keys and values (valid split drawn from another stream).
facts  A fixed table (from the task seed) gives every (entity, attribute) a value; an entity
       is two digit tokens (base ceil(sqrt(entities))), so the embedding table cannot hold the
       facts and the network must. An instance is distinct random facts "e_hi e_lo a v":
         e3 e17 a1 v90 e0 e5 a3 v2 ...
       Answers: the value tokens. A fact never repeats within an instance, so an answer cannot
       be copied from context: the score is parametric recall. Held-out instances are new
       arrangements of the same facts (the knowledge is the training set's; the prompts are
       new), which is what "recall of seen facts from held-out prompts" measures.
group  The word problem of `data.synthetic.group` (S3, S4, S5: all permutations of 3-5 items;
       A4, A5: the even ones): random elements x_1, x_2, ... and their running products
       p_i = x_i p_{i-1} (permutations composed as functions, p_0 the identity; k: an input
       element, v: a product, both indexed by the group's elements in lexicographic order).
       `data.synthetic.products` says where the products are:
         targets   the state-tracking task of the DeltaProduct paper: the sequence holds the
                   inputs alone, and the target at position i is p_i, not the next input
                   (`Task.split`); no product is ever an input, so predicting p_i needs a state
                   that carries p_{i-1} through the whole prefix:
                     inputs   k4 k1 k5 ...
                     targets  v4 v3 v0 ...
         inputs    (the default, the first format) each input followed by its product, as
                   next-token text: k4 v4 k1 v3 k5 v0 ...; p_i is then a lookup of the two
                   tokens before it (x_i and p_{i-1}), solvable without any state: not a
                   state-tracking test. The inputs are uniform, their loss log |G|.
       Answers: every product. Held-out instances are new draws.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np

from research.errors import ConfigError

TASKS = ("mqar", "facts", "group")
GROUPS = ("S3", "S4", "S5", "A4", "A5")
PRODUCTS = ("inputs", "targets")  # where the word problem's running products are
PAD, SEP = 0, 1
VALID_STREAM, TRAIN_STREAM = 1, 0


@dataclasses.dataclass(frozen=True)
class Layout:
  keys: int
  values: int
  digits: int
  attributes: int

  @property
  def key0(self) -> int:
    return 2

  @property
  def value0(self) -> int:
    return self.key0 + self.keys

  @property
  def digit0(self) -> int:
    return self.value0 + self.values

  @property
  def attribute0(self) -> int:
    return self.digit0 + self.digits

  @property
  def vocab_size(self) -> int:
    return self.attribute0 + self.attributes

  def is_value(self, ids):
    return (ids >= self.value0) & (ids < self.digit0)


class SyntheticTokenizer:
  """ids <-> readable strings ("k3", "v12", "e4", "a1", "|", "_"), space separated."""

  name = "synthetic"

  def __init__(self, layout: Layout):
    self.layout = layout
    self.vocab_size = layout.vocab_size
    self.fingerprint = (f"synthetic-{layout.keys}-{layout.values}-{layout.digits}-"
                        f"{layout.attributes}")
    lo = layout
    self._names = ["_", "|"] + [f"k{i}" for i in range(lo.keys)] + [
        f"v{i}" for i in range(lo.values)] + [f"e{i}" for i in range(lo.digits)] + [
        f"a{i}" for i in range(lo.attributes)]
    self._ids = {name: i for i, name in enumerate(self._names)}

  def encode(self, text: str) -> np.ndarray:
    return np.asarray([self._ids[t] for t in text.split()], np.int32)

  def decode(self, ids) -> str:
    return " ".join(self._names[int(i)] for i in np.asarray(ids).reshape(-1))


@dataclasses.dataclass(frozen=True)
class Task:
  """A synthetic task: generates instances and says which target positions are answers."""
  name: str
  layout: Layout
  length: int          # tokens per instance (seq_len + 1)
  pairs: int = 0       # mqar
  entities: int = 0    # facts
  seed: int = 0
  group: str = ""      # group
  products: str = "inputs"  # group: "inputs" (interleaved tokens) | "targets" (module docstring)

  def generate(self, num: int, stream: int) -> np.ndarray:
    """[num, length] int32 instances; `stream` 0 = train, 1 = valid (disjoint draws)."""
    rng = np.random.default_rng([self.seed, stream, 0x5E7])
    make = {"mqar": _mqar, "facts": _facts, "group": _word_problem}[self.name]
    return make(self, num, rng)

  def split(self, windows: np.ndarray) -> dict[str, np.ndarray]:
    """{"inputs", "targets"} [..., length - 1] of instances [..., length]: the next tokens,
    except for the word problem with products as targets, whose targets are the running
    products of the inputs (p_i at input x_i)."""
    inputs = windows[..., :-1]
    if self.name != "group" or self.products == "inputs":
      return {"inputs": inputs, "targets": windows[..., 1:]}
    products = running_products(group_table(self.group), np.asarray(inputs) - self.layout.key0)
    return {"inputs": inputs, "targets": (products + self.layout.value0).astype(inputs.dtype)}

  def answer_mask(self, inputs, targets):
    """Where targets are answers: value tokens (after the separator, for mqar). Works on numpy
    and jax arrays of shape [..., seq]."""
    answers = self.layout.is_value(targets)
    if self.name == "mqar":
      answers = answers & ((inputs == SEP).cumsum(axis=-1) > 0)
    return answers

  def fact_table(self) -> np.ndarray:
    """[entities, attributes] int: the value of every fact (facts only)."""
    rng = np.random.default_rng([self.seed, 0xFAC7])
    return rng.integers(0, self.layout.values, (self.entities, self.layout.attributes))


def make_task(data_cfg) -> Task:
  """The task of `config.data` (corpus mqar | facts, `data.synthetic` sizes)."""
  s, length = data_cfg.synthetic, data_cfg.seq_len + 1
  if data_cfg.corpus not in TASKS:
    raise ConfigError(f"data.corpus='{data_cfg.corpus}' is not a synthetic task "
                      f"({', '.join(TASKS)})")
  if data_cfg.tokenizer != "synthetic":
    raise ConfigError(f"data.corpus='{data_cfg.corpus}' is token-level: set "
                      "data.tokenizer='synthetic'")
  if data_cfg.corpus == "group":
    if s.group not in GROUPS:
      raise ConfigError(f"data.synthetic.group='{s.group}' is not one of {', '.join(GROUPS)}")
    if s.products not in PRODUCTS:
      raise ConfigError(f"data.synthetic.products='{s.products}' is not one of "
                        f"{', '.join(PRODUCTS)}")
    if length < 3:
      raise ConfigError("data.corpus='group' needs seq_len >= 2 (an element and its product)")
    size = len(group_elements(s.group))
    return Task("group", Layout(keys=size, values=size, digits=0, attributes=0), length,
                seed=s.seed, group=s.group, products=s.products)
  digits = math.isqrt(max(s.entities - 1, 0)) + 1
  layout = Layout(keys=s.num_keys, values=s.num_values, digits=digits, attributes=s.attributes)
  task = Task(data_cfg.corpus, layout, length, pairs=s.pairs, entities=s.entities, seed=s.seed)
  if task.name == "mqar":
    if not 1 <= s.pairs <= s.num_keys:
      raise ConfigError(f"data.synthetic.pairs={s.pairs} must be in [1, num_keys={s.num_keys}]")
    if 2 * s.pairs + 3 > length:
      raise ConfigError(f"data.synthetic.pairs={s.pairs} needs seq_len >= {2 * s.pairs + 2} "
                        "(pairs, separator and one query)")
  else:
    if length < 4 or s.entities * s.attributes < length // 4:
      raise ConfigError(f"data.synthetic: {s.entities} entities x {s.attributes} attributes do "
                        f"not fill an instance of {length} tokens with distinct facts")
  return task


def group_elements(name: str) -> np.ndarray:
  """[|G|, n] the permutations of group `name` (S_n: all of n items; A_n: the even ones), in
  lexicographic order; row 0 is the identity."""
  kind, n = name[0], int(name[1:])
  perms = np.array(list(itertools.permutations(range(n))), np.int64)
  if kind == "A":
    inversions = (perms[:, :, None] > perms[:, None, :]).astype(int)
    parity = np.triu(inversions, 1).sum(axis=(1, 2)) % 2
    perms = perms[parity == 0]
  return perms


def multiplication_table(elements: np.ndarray) -> np.ndarray:
  """[|G|, |G|] index of a b (a after b: (a b)(j) = a[b[j]]) for the rows of `elements`."""
  index = {tuple(p): i for i, p in enumerate(elements)}
  return np.array([[index[tuple(a[b])] for b in elements] for a in elements], np.int64)


@functools.lru_cache(maxsize=None)
def group_table(name: str) -> np.ndarray:
  """The multiplication table of group `name`, built once (Task.split needs it every batch)."""
  return multiplication_table(group_elements(name))


def running_products(table: np.ndarray, x: np.ndarray) -> np.ndarray:
  """[..., n] element indices x -> their running products p_i = x_i p_{i-1}, p_0 the identity."""
  products = np.empty_like(x)
  p = np.zeros(x.shape[:-1], x.dtype)  # the identity
  for i in range(x.shape[-1]):
    p = table[x[..., i], p]
    products[..., i] = p
  return products


def _word_problem(task: Task, num: int, rng: np.random.Generator) -> np.ndarray:
  lo, length = task.layout, task.length
  table = group_table(task.group)
  if task.products == "targets":  # the inputs alone; Task.split computes the products
    return (rng.integers(0, len(table), (num, length)) + lo.key0).astype(np.int32)
  steps = -(-length // 2)
  x = rng.integers(0, len(table), (num, steps))
  prod = running_products(table, x)
  out = np.empty((num, 2 * steps), np.int32)
  out[:, 0::2], out[:, 1::2] = x + lo.key0, prod + lo.value0
  return out[:, :length]


def _mqar(task: Task, num: int, rng: np.random.Generator) -> np.ndarray:
  lo, n, length = task.layout, task.pairs, task.length
  keys = np.argsort(rng.random((num, lo.keys)), axis=1)[:, :n] + lo.key0     # distinct keys
  values = rng.integers(0, lo.values, (num, n)) + lo.value0
  out = np.full((num, length), PAD, np.int32)
  out[:, 0:2 * n:2], out[:, 1:2 * n:2] = keys, values
  out[:, 2 * n] = SEP
  queries = (length - 2 * n - 1) // 2
  reps = -(-queries // n)
  order = np.argsort(rng.random((num, reps, n)), axis=2).reshape(num, reps * n)[:, :queries]
  start = 2 * n + 1
  out[:, start:start + 2 * queries:2] = np.take_along_axis(keys, order, axis=1)
  out[:, start + 1:start + 2 * queries:2] = np.take_along_axis(values, order, axis=1)
  return out


def _facts(task: Task, num: int, rng: np.random.Generator) -> np.ndarray:
  lo, length = task.layout, task.length
  total = task.entities * lo.attributes
  per = length // 4
  if total <= 64 * per:  # small tables: a random permutation per row
    return _fill_facts(task, np.argsort(rng.random((num, total)), axis=1)[:, :per])
  ids = rng.integers(0, total, (num, per))
  while True:  # resample the rows that repeat a fact
    s = np.sort(ids, axis=1)
    bad = np.any(s[:, 1:] == s[:, :-1], axis=1)
    if not bad.any():
      break
    ids[bad] = rng.integers(0, total, (int(bad.sum()), per))
  return _fill_facts(task, ids)


def _fill_facts(task: Task, ids: np.ndarray) -> np.ndarray:
  """Instances from fact ids [num, per] (distinct within a row)."""
  lo, length = task.layout, task.length
  num, per = ids.shape
  entity, attribute = ids // lo.attributes, ids % lo.attributes
  out = np.full((num, length), PAD, np.int32)
  out[:, 0:4 * per:4] = entity // lo.digits + lo.digit0
  out[:, 1:4 * per:4] = entity % lo.digits + lo.digit0
  out[:, 2:4 * per:4] = attribute + lo.attribute0
  out[:, 3:4 * per:4] = task.fact_table()[entity, attribute] + lo.value0
  return out


def load_tokenized(data_cfg):
  """The TokenizedCorpus of a synthetic task: train / valid streams of whole instances."""
  from research.data.pipeline import TokenizedCorpus  # the pipeline imports this module lazily
  task = make_task(data_cfg)
  s = data_cfg.synthetic
  train = task.generate(s.train_sequences, TRAIN_STREAM).reshape(-1)
  valid = task.generate(s.valid_sequences, VALID_STREAM).reshape(-1)
  return TokenizedCorpus(train=train, valid=valid, tokenizer=SyntheticTokenizer(task.layout),
                         valid_bytes_per_token=1.0, task=task)
