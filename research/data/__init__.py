"""Data: corpora by name, tokenizers, and the grain pipelines that make LM batches."""

from research.data.corpora import (
    CACHE_DIR_ENV, DATA_DIR_ENV, ChecksumError, Corpus, CorpusInfo, CorpusNotFoundError,
    DataError, cache_dir, fetch_corpus, list_corpora, load_corpus, normalise_title,
    resolve_data_dir, shakespeare_manifest)
from research.data.pipeline import (
    PasskeyMix, TokenizedCorpus, TrainIterator, epoch_windows, load_tokenized, make_train_iterator,
    make_valid_batches, validation_batches)
from research.data.tokenizers import (
    TOKENIZERS, ByteTokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer)

__all__ = [
    "CACHE_DIR_ENV", "DATA_DIR_ENV", "ChecksumError", "Corpus", "CorpusInfo",
    "CorpusNotFoundError", "DataError", "cache_dir", "fetch_corpus", "list_corpora",
    "load_corpus", "normalise_title", "resolve_data_dir", "shakespeare_manifest",
    "PasskeyMix", "TokenizedCorpus", "TrainIterator", "epoch_windows", "load_tokenized", "make_train_iterator",
    "make_valid_batches", "validation_batches", "TOKENIZERS", "ByteTokenizer", "CharTokenizer",
    "GPT2Tokenizer", "Tokenizer", "get_tokenizer",
]
