"""Tokenizers by name: `bytes` (UTF-8, 256), `char` (the corpus' characters) and `gpt2` (BPE).

Every tokenizer has `name`, `vocab_size`, `encode(text) -> int32 array`, `decode(ids) -> str`, and
`fingerprint`, a short hash of everything that determines its ids (the pipeline keys its token
cache on it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from research.data.corpora import (
    DATA_DIR_ENV, ChecksumError, Corpus, CorpusNotFoundError, DataError, resolve_data_dir,
    sha256_file, unknown_name_message)


@runtime_checkable
class Tokenizer(Protocol):
  name: str
  vocab_size: int
  fingerprint: str

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def _as_ids(ids) -> np.ndarray:
  return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
  """UTF-8 bytes: ids 0..255. Decoding replaces invalid byte sequences with U+FFFD."""

  name = "bytes"
  vocab_size = 256
  fingerprint = "bytes-utf8"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return _as_ids(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class CharTokenizer:
  """nanoGPT's char level: the vocabulary is the sorted set of characters in `text`.

  Built from all splits of a corpus, so every split encodes (Tiny Shakespeare: 65 characters).
  """

  name = "char"

  def __init__(self, text: str):
    # Code points through UTF-32, which numpy handles without a Python loop.
    codes = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
    self._codes = codes  # sorted code points; id i <-> chr(codes[i])
    self._chars = np.array([chr(c) for c in codes.tolist()], dtype=object)
    self.vocab_size = int(len(codes))
    self.fingerprint = "char-" + hashlib.sha256(codes.tobytes()).hexdigest()[:16]

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(self._codes, codes)
    ids_clipped = np.minimum(ids, self.vocab_size - 1)
    bad = self._codes[ids_clipped] != codes
    if bad.any():
      missing = sorted({chr(c) for c in codes[bad].tolist()})
      raise DataError(
          f"char tokenizer: characters {missing[:10]!r} are not in its {self.vocab_size}-character"
          " vocabulary: build it from text that contains them"
      )
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return "".join(self._chars[_as_ids(ids)].tolist())


GPT2_FILES = {
    # Hashes from the data directory's SOURCES.md (equal to OpenAI's GPT-2 files).
    "gpt2_bpe/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2_bpe/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class GPT2Tokenizer:
  """GPT-2's byte-level BPE (50257 ids) from OpenAI's `encoder.json` and `vocab.bpe`.

  `<|endoftext|>` (50256) is not treated as special in text: encode() never produces it.
  """

  name = "gpt2"

  def __init__(self, data_dir: str | os.PathLike | None = None):
    from tokenizers import ByteLevelBPETokenizer  # imported here: only this tokenizer needs it

    encoder, merges = (_gpt2_file(data_dir, rel) for rel in GPT2_FILES)
    self._tok = ByteLevelBPETokenizer(str(encoder), str(merges))
    self.vocab_size = int(self._tok.get_vocab_size())
    self.fingerprint = "gpt2-" + GPT2_FILES["gpt2_bpe/vocab.bpe"][:16]

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(_as_ids(ids).tolist())


def _gpt2_file(data_dir, relpath: str) -> Path:
  root = resolve_data_dir(data_dir)
  hint = (f"pass --data_dir or set {DATA_DIR_ENV} to a directory holding gpt2_bpe/{{encoder.json,"
          "vocab.bpe}} (OpenAI's GPT-2 files), or use tokenizer 'bytes' or 'char'")
  if root is None:
    raise CorpusNotFoundError(f"tokenizer 'gpt2' needs {relpath} from a data directory, but none"
                              f" is set: {hint}")
  path = root / relpath
  if not path.is_file():
    raise CorpusNotFoundError(f"tokenizer 'gpt2' needs {path}, which does not exist: {hint}")
  want, got = GPT2_FILES[relpath], sha256_file(path)
  if got != want:
    raise ChecksumError(f"{path} has sha256 {got} but {want} was expected: replace it with"
                        " OpenAI's GPT-2 file")
  return path


TOKENIZERS = ("bytes", "char", "gpt2")


def get_tokenizer(name: str, corpus: Corpus | None = None,
                  data_dir: str | os.PathLike | None = None) -> Tokenizer:
  """The tokenizer `name`; `char` builds its vocabulary from all of `corpus`' splits."""
  if name == "bytes":
    return ByteTokenizer()
  if name == "char":
    if corpus is None:
      raise DataError("tokenizer 'char' builds its vocabulary from a corpus: pass corpus=")
    return CharTokenizer("".join(corpus.splits[s] for s in sorted(corpus.splits)))
  if name == "gpt2":
    return GPT2Tokenizer(data_dir)
  raise DataError(unknown_name_message("tokenizer", name, list(TOKENIZERS)))
