"""n-gram ids for hashed n-gram embeddings (Over-Tokenized Transformer, arXiv:2501.16975 §3.1).

The i-gram ending at position t is the base-V number whose least significant digit is the
current token (eq. 1 of the paper, f with p = V):

    x_t^(-i) = sum_{j=1..i} x_{t-j+1} V^(j-1)          (positions before the start read id 0)

and a hashed table of M rows reads row x_t^(-i) mod M. V^3 overflows int32 for any real
vocabulary (and JAX computes in int32 unless x64 is on), so the ids are computed already
reduced: each term x * (V^(j-1) mod M) mod M by a shift-and-add multiplication in uint32 over
4-bit digits of the constant, every intermediate below 2^32. This is exact for V < 2^17 and
M < 2^27 (a 131k vocabulary, 134M rows per table), the bounds `check_ngram_bounds` enforces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.errors import ConfigError

MAX_VOCAB = 1 << 17
MAX_ROWS = 1 << 27
_DIGIT_BITS = 4


def check_ngram_bounds(vocab: int, rows: int, what: str) -> None:
  """ConfigError unless the uint32 arithmetic of `ngram_id` is exact for (vocab, rows)."""
  if vocab >= MAX_VOCAB:
    raise ConfigError(f"{what}: a vocabulary of {vocab} tokens is too large for the n-gram ids "
                      f"(at most {MAX_VOCAB - 1})")
  if not 1 <= rows < MAX_ROWS:
    raise ConfigError(f"{what}: a table of {rows} rows is outside 1..{MAX_ROWS - 1}")


def mulmod(x: jax.Array, c: int, modulus: int) -> jax.Array:
  """(x * c) mod modulus for x uint32 < 2^17 and constants 0 <= c < modulus < 2^27: Horner's
  rule over c's 4-bit digits, r <- (16 r + x d) mod M, where 16 r < 2^31 and x d < 2^21."""
  digits = []
  while c:
    digits.append(c & ((1 << _DIGIT_BITS) - 1))
    c >>= _DIGIT_BITS
  r = jnp.zeros_like(x)
  for d in reversed(digits):
    r = (r * (1 << _DIGIT_BITS) + x * d) % modulus
  return r


def previous_tokens(tokens: jax.Array, n: int) -> list[jax.Array]:
  """[x_t, x_{t-1}, ..., x_{t-n+1}] for a window that starts at the sequence start: tokens
  [b, T] shifted right by 0..n-1 with id 0 before the start (the paper's padding)."""
  t = tokens.shape[1]
  return [tokens] + [jnp.pad(tokens, ((0, 0), (d, 0)))[:, :t] for d in range(1, n)]


def ngram_id(history: list[jax.Array], order: int, vocab: int, modulus: int) -> jax.Array:
  """x_t^(-order) mod modulus, int32 [b, T]; history[d] holds x_{t-d} (previous_tokens)."""
  x = [h.astype(jnp.uint32) for h in history[:order]]
  out = x[0] % modulus
  power = 1
  for d in range(1, order):
    power = power * vocab % modulus  # V^d mod M, a Python int
    out = (out + mulmod(x[d], power, modulus)) % modulus
  return out.astype(jnp.int32)
