"""Token streams and the grain pipelines that cut them into language-modelling batches.

`load_tokenized` turns `config.data` into a train and a valid token stream (1-D int32), encoding
each split once and caching it as `.npy` in the cache directory. The synthetic tasks (`mqar`,
`facts`: research/data/synthetic.py) are generated instead, as streams of whole instances.

`make_train_iterator` yields `{"inputs", "targets"}` int32 [batch, seq_len] forever. An example is
a window of seq_len + 1 consecutive tokens (targets = inputs shifted by one). Each epoch:

  1. a random start offset in [0, seq_len], drawn from (seed, epoch), shifts the window grid so
     that across epochs every position is a window start, as nanoGPT's random offsets give;
  2. the grid's n non-overlapping windows are shuffled with grain's per-epoch index shuffle;
  3. process p of P takes every P-th window of the shuffled order (grain slicing), so the
     processes never share a window and together cover the epoch (n is cut to a multiple of P);
  4. batches run on across epoch boundaries (repeat before batch), like nanoGPT's sampling.

  5. with a mix (`data.passkey_mix` > 0: `PasskeyMix`), each window is replaced, with that
     probability, by a passkey prompt and its answer (research/data/passkey.py) whose haystack
     is cut from the train stream; the coin and the prompt are drawn from (seed, epoch,
     window), so the mix is as reproducible as the text.

All of it is index arithmetic in grain `MapDataset`s, so batch k is a pure function of
(seed, k, shapes): the iterator's state is just its position, which `get_state` returns as a
JSON-serialisable dict and `set_state` restores exactly. No worker processes or threads are used.

`make_valid_batches` gives fixed batches: non-overlapping windows evenly spread over the valid
stream, each process a disjoint share.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from typing import Any, Callable, Iterator

import grain
import numpy as np

from research.data.corpora import DataError, _write_atomic, cache_dir, load_corpus
from research.data.tokenizers import Tokenizer, get_tokenizer

# ----------------------------------------------------------------------------- token streams


@dataclasses.dataclass
class TokenizedCorpus:
  train: np.ndarray  # int32 [n_train_tokens]
  valid: np.ndarray  # int32 [n_valid_tokens]
  tokenizer: Tokenizer
  # UTF-8 bytes of the valid text per valid token: bits/byte = loss_nats / ln 2 / this.
  valid_bytes_per_token: float
  # A synthetic task (research/data/synthetic.py) whose streams are whole instances of
  # seq_len + 1 tokens: windows start on that grid (make_train_iterator(aligned=True)).
  task: Any = None

  def split(self, windows: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of windows [..., seq_len + 1]: the task's inputs and targets, else the next
    tokens."""
    return self.task.split(windows) if self.task is not None else next_tokens(windows)


def _encode_cached(tokenizer: Tokenizer, corpus_name: str, split: str, text: str) -> np.ndarray:
  """tokenizer.encode(text), read from / written to `<cache>/tokens/` keyed by content."""
  content = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
  path = cache_dir() / "tokens" / f"{corpus_name}.{tokenizer.fingerprint}.{split}.{content}.npy"
  if path.is_file():
    return np.load(path)
  ids = tokenizer.encode(text).astype(np.int32)
  buffer = io.BytesIO()
  np.save(buffer, ids)
  _write_atomic(path, buffer.getvalue())
  return ids


def load_tokenized(data_cfg) -> TokenizedCorpus:
  """Train and valid token streams for `data_cfg.corpus` / `.tokenizer` / `.data_dir` ('' = unset)."""
  from research.data import synthetic  # imported here: it builds a TokenizedCorpus
  if data_cfg.corpus in synthetic.TASKS:
    return synthetic.load_tokenized(data_cfg)
  data_dir = getattr(data_cfg, "data_dir", "") or None
  corpus = load_corpus(data_cfg.corpus, data_dir)
  tokenizer = get_tokenizer(data_cfg.tokenizer, corpus, data_dir)
  train = _encode_cached(tokenizer, corpus.name, "train", corpus.splits["train"])
  valid_text = corpus.splits["valid"]
  valid = _encode_cached(tokenizer, corpus.name, "valid", valid_text)
  if len(valid) == 0:
    raise DataError(f"corpus {corpus.name!r} has an empty valid split: use another corpus")
  return TokenizedCorpus(
      train=train, valid=valid, tokenizer=tokenizer,
      valid_bytes_per_token=len(valid_text.encode("utf-8")) / len(valid))


# ----------------------------------------------------------------------------- train iterator


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if int(value) <= 0:
      raise DataError(f"{name} must be positive, got {value}")


def _check_process(process_index: int, process_count: int) -> None:
  _check_positive(process_count=process_count)
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is outside [0, {process_count}):"
                    " pass jax.process_index() and jax.process_count()")


def _derive_seed(seed: int, purpose: int) -> int:
  """A 31-bit seed for one purpose, so that seed s and s + 1 give unrelated streams."""
  return int(np.random.default_rng([int(seed) % 2**63, purpose]).integers(0, 2**31 - 1))


def epoch_windows(num_tokens: int, seq_len: int, process_count: int = 1) -> int:
  """Windows of seq_len + 1 tokens per epoch: the most that fit after any offset in [0, seq_len],
  cut to a multiple of process_count."""
  window = seq_len + 1
  n = (num_tokens - seq_len) // window
  return (n // process_count) * process_count


@dataclasses.dataclass(frozen=True)
class PasskeyMix:
  """Training windows replaced by passkey prompts + answers (research/data/passkey.py)."""

  rate: float  # probability that a window is a passkey prompt, in [0, 1)
  tokenizer: Tokenizer
  max_keys: int = 1  # needles per prompt drawn from 1..max_keys (> 1: the multi-key task)
  key_len: int = 5

  def __post_init__(self):
    if not 0.0 <= self.rate < 1.0:
      raise DataError(f"data.passkey_mix must be in [0, 1), got {self.rate}")
    if self.max_keys < 1 or self.key_len < 1:
      raise DataError(f"data.passkey_keys ({self.max_keys}) and data.passkey_key_len "
                      f"({self.key_len}) must be positive")

  def settings(self) -> dict:
    return {"passkey_mix": float(self.rate), "passkey_keys": int(self.max_keys),
            "passkey_key_len": int(self.key_len)}

  def check(self, filler: np.ndarray, window: int) -> None:
    """Fails now, not mid-training, unless every prompt that can be drawn (1..max_keys needles,
    the longest names and keys) fits a window."""
    from research.data import passkey  # pylint: disable=import-outside-toplevel
    try:
      need = passkey.min_training_window(self.tokenizer, self.max_keys, self.key_len)
      if window >= need:  # and a real one builds from this filler
        passkey.training_window(self.tokenizer, filler, window, np.random.default_rng(0),
                                key_len=self.key_len, num_keys=self.max_keys)
    except ValueError as e:
      raise DataError(f"data.passkey_mix: a passkey prompt cannot be built ({e}): change "
                      "data.passkey_key_len or the tokenizer") from None
    if window < need:
      raise DataError(f"data.passkey_mix: a window of seq_len + 1 = {window} tokens cannot hold "
                      f"every passkey prompt with up to {self.max_keys} needle(s) (the longest "
                      f"needs {need}): raise data.seq_len to at least {need - 1} or lower "
                      "data.passkey_keys")

  def window(self, filler: np.ndarray, window: int, seed: int, epoch: int, index: int):
    """The passkey window replacing window `index` of `epoch`, or None (drawn from the three)."""
    from research.data import passkey  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng([seed, epoch, index])
    if rng.random() >= self.rate:
      return None
    return passkey.training_window(self.tokenizer, filler, window, rng, max_keys=self.max_keys,
                                   key_len=self.key_len)


class TrainIterator:
  """Infinite iterator of train batches with `get_state()` / `set_state()`.

  Wraps grain's `DatasetIterator`; the state adds the settings it was made with, so that restoring
  into an iterator with other settings fails loudly instead of silently changing the data order.
  """

  def __init__(self, dataset: grain.MapDataset, settings: dict[str, int],
               epoch_offset, window_starts):
    self._iter = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    self._settings = settings
    self.epoch_offset = epoch_offset  # (epoch) -> start offset of that epoch's window grid
    self.window_starts = window_starts  # (batch index) -> int [batch] window starts, for tests

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._iter.get_state(), "settings": dict(self._settings)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by get_state. The process index is not compared: in a
    multi-process run the checkpoint holds the primary process's state, and every process is
    at the same position of its own shard."""
    ours = {k: v for k, v in self._settings.items() if k != "process_index"}
    saved = {k: v for k, v in state.get("settings", {}).items() if k != "process_index"}
    if saved != ours:
      diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
      raise DataError(f"data-iterator state was saved with other settings {diff} (saved, now):"
                      " resume with the data settings of the checkpointed run")
    self._iter.set_state(state["grain"])


def next_tokens(windows: np.ndarray) -> dict[str, np.ndarray]:
  """A batch of windows [..., seq_len + 1] as language modelling: each token's target is the
  next one."""
  return {"inputs": windows[..., :-1], "targets": windows[..., 1:]}


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        aligned: bool = False, mix: PasskeyMix | None = None,
                        split: Callable[[np.ndarray], dict] = next_tokens) -> TrainIterator:
  """Batches {"inputs", "targets"}: int32 [batch_size, seq_len] (batch_size per process).

  `aligned`: the stream is whole instances of seq_len + 1 tokens (a synthetic task), so every
  epoch's window grid starts at 0 instead of a random offset. `mix`: passkey windows mixed in
  (step 5 of the module docstring). `split`: windows -> the batch (a synthetic task's
  `Task.split`; by default the next tokens).
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size)
  _check_process(process_index, process_count)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise DataError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
  window = seq_len + 1
  n = epoch_windows(len(tokens), seq_len, process_count)
  if aligned:
    n = (len(tokens) // window // process_count) * process_count
  if n == 0:
    raise DataError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {window} tokens for"
                    f" each of {process_count} processes: lower seq_len or use a larger split")
  offset_seed, shuffle_seed = _derive_seed(seed, 0), _derive_seed(seed, 1)

  @functools.lru_cache(maxsize=64)
  def epoch_offset(epoch: int) -> int:
    if aligned:
      return 0
    return int(np.random.default_rng([offset_seed, epoch]).integers(0, seq_len + 1))

  # Index g of the (infinite) epoch-major order carries its epoch: g = epoch * n + window.
  ds = grain.MapDataset.range(n).map_with_index(lambda g, j: (g // n, j))
  ds = ds.shuffle(seed=shuffle_seed)  # a different permutation each epoch
  ds = ds[process_index::process_count]  # n / P windows per process and epoch, disjoint
  # (window start, epoch, window index): the last two name the window for the passkey mix
  ds = ds.map(lambda ej: (epoch_offset(ej[0]) + ej[1] * window, ej[0], ej[1]))
  ds = ds.repeat()  # forever; batches may span epochs
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=lambda rows: np.asarray(rows, dtype=np.int64))  # [batch, 3]
  columns = np.arange(window)
  tokens32 = tokens.astype(np.int32, copy=False)
  mix_seed = _derive_seed(seed, 2)

  def gather(rows: np.ndarray) -> dict[str, np.ndarray]:
    windows = tokens32[rows[:, :1] + columns[None, :]]  # [batch, seq_len + 1]
    if mix is not None:
      for r, (_, epoch, index) in enumerate(rows):
        replaced = mix.window(tokens32, window, mix_seed, int(epoch), int(index))
        if replaced is not None:
          windows[r] = replaced
    return split(windows)

  settings = dict(seq_len=seq_len, batch_size=batch_size, seed=int(seed), num_tokens=len(tokens),
                  process_index=process_index, process_count=process_count)
  if aligned:  # only when set, so text runs' saved iterator states still match
    settings["aligned"] = True
  if mix is not None and mix.rate > 0:
    if aligned:
      raise DataError("data.passkey_mix needs a text corpus, not a synthetic task")
    mix.check(tokens32, window)
    settings.update(mix.settings())
  else:
    mix = None
  return TrainIterator(ds.map(gather), settings, epoch_offset, lambda k: ds[k][:, 0])


# ----------------------------------------------------------------------------- valid batches


def validation_batches(config, num_batches: int | None = None
                       ) -> list[dict[str, np.ndarray]]:
  """The fixed validation batches a run's config defines (what its training log evaluates):
  the first `num_batches` of them (default `eval.batches`), split as its corpus splits."""
  corpus = load_tokenized(config.data)
  if num_batches is None:
    num_batches = config.eval.batches
  return make_valid_batches(corpus.valid, seq_len=config.data.seq_len,
                            batch_size=config.eval.batch_size, num_batches=num_batches,
                            split=corpus.split)


def make_valid_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                       num_batches: int | None, process_index: int = 0,
                       process_count: int = 1,
                       split: Callable[[np.ndarray], dict] = next_tokens
                       ) -> list[dict[str, np.ndarray]]:
  """Fixed valid batches: non-overlapping windows of seq_len + 1 spread evenly over `tokens`.

  `num_batches` per process; 0 or None takes every full window (as many whole batches per process
  as fit). Process p takes windows p, p + P, ... of the chosen ones, so processes are disjoint.
  `split` as in make_train_iterator.
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size)
  _check_process(process_index, process_count)
  tokens = np.asarray(tokens, dtype=np.int32)
  window = seq_len + 1
  total = len(tokens) // window  # non-overlapping windows on the grid starting at 0
  per_step = batch_size * process_count  # windows per batch index over all processes
  if not num_batches:
    num_batches = total // per_step
  needed = num_batches * per_step
  if num_batches == 0 or needed > total:
    fit = total // per_step
    raise DataError(f"the valid split holds {total} windows of {window} tokens, fewer than"
                    f" {max(needed, per_step)} for {max(num_batches, 1)} batch(es) of"
                    f" {batch_size} x {process_count} process(es): "
                    + (f"set eval.batches to at most {fit} (0: every window that fits)" if fit
                       else f"set eval.batch_size to at most {total // process_count}")
                    + ", or lower data.seq_len")
  chosen = (np.arange(needed) * total) // needed  # distinct, evenly spread grid indices
  starts = chosen[process_index::process_count].reshape(num_batches, batch_size) * window
  windows = tokens[starts[..., None] + np.arange(window)]  # [batches, batch, window]
  return [split(w) for w in windows]
