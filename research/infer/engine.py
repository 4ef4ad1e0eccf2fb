"""Prefill and incremental decoding of the DecoderLM with a KV cache.

  engine = Engine(model, max_len=1024)
  tokens, lengths = pad_prompts([ids_a, ids_b])            # right-padded, ragged
  out = engine.generate(tokens, lengths, max_new_tokens=16)  # greedy
  out = engine.generate(tokens, lengths, max_new_tokens=16,
                        sampling=Sampling(temperature=0.8, top_p=0.9), key=jax.random.key(0))

Ragged batches are right-padded (cache.py): row b's prompt is tokens[b, :lengths[b]] at
positions 0 .. lengths[b] - 1; the padding after it is written into the cache but never seen
(causal positions), and row b's first new token goes to slot lengths[b]. Each row therefore
computes what it computes alone, up to float summation order.

The prefill and the per-token decode step are jitted with static shapes (a cache of max_len
slots per row): one compilation per (batch, prompt length) for the prefill and one per batch
for the step (each once for greedy and once for sampling at any temperature and top_p).
The prompt's attention follows `model.attention.prefill` (dense or FlexPrefill); decode steps
and continuations (`extend`) are dense over the cache. FlexPrefill takes each row's pattern
from its last block of queries, so it needs rows without padding (equal lengths).

Token repetition (model.phd, research/model/phd.py) runs inside the model: the cache keeps the
plain model's entries (originals only) plus, for swa / cswa, each layer's last B hidden tokens;
a prefill computes the originals and the hidden copies of the last prompt token (phd; about a
plain prefill), of every prompt token (swa; K x) or of the last token's chunk (cswa); a step
runs the new token's K copies. naive repetition has no cached path (refused here).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.errors import InputError
from research.infer.cache import KVCache
from research.infer.sampling import GREEDY, Sampling, draw
from research.model import phd
from research.model.context import ForwardContext
from research.model.prefill import prefill_settings


@dataclasses.dataclass
class Prefill:
  """What a prefill returns: the next-token logits [batch, vocab] at each row's last prompt
  token, the cache holding the prompts, the next token chosen from the logits, and the
  statistics modules recorded (e.g. `flexprefill/density/layer0` [batch])."""
  logits: jax.Array
  cache: KVCache
  next_token: jax.Array
  stats: dict[str, jax.Array]


@dataclasses.dataclass
class Generation:
  """tokens [batch, max_new_tokens] int32 (after a row's stop token: the stop token repeated),
  lengths [batch] (tokens up to and including the stop token), and the prefill's statistics."""
  tokens: np.ndarray
  lengths: np.ndarray
  stats: dict[str, np.ndarray]

  def density(self) -> np.ndarray | None:
    """[batch] fraction of causal blocks the FlexPrefill prefill computed (mean over layers);
    None after a dense prefill."""
    return stat_mean(self.stats, "flexprefill/density")


def stat_mean(stats: dict, prefix: str) -> np.ndarray | None:
  """[batch] mean over layers of the recorded statistic `prefix/layer<i>`; None if absent."""
  values = [np.asarray(v) for k, v in stats.items() if k.startswith(prefix + "/")]
  return np.mean(values, axis=0) if values else None


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists -> (tokens [batch, length] int32, lengths [batch] int32).
  `length` defaults to the longest prompt."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if not len(prompts) or lengths.min() < 1:
    raise ValueError("pad_prompts needs at least one prompt and no empty prompt")
  length = int(lengths.max()) if length is None else length
  if lengths.max() > length:
    raise ValueError(f"a prompt of {lengths.max()} tokens does not fit length={length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = np.asarray(p, np.int32)
  return tokens, lengths


def _sampling_values(sampling: Sampling):
  """Temperature and top_p as traced arguments (one compilation for all of them)."""
  return jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p)


class Engine:
  """Jitted prefill / decode step / continuation of one model; the cache is passed explicitly.

  max_len: cache slots per row (prompt plus generated tokens must fit). mesh: run under this
  device mesh (sharding.use_mesh); None runs where the parameters are.
  """

  def __init__(self, model, *, max_len: int, mesh: jax.sharding.Mesh | None = None):
    if max_len <= 0:
      raise ValueError(f"Engine max_len must be positive, got {max_len}")
    self.max_len = max_len
    self.mesh = mesh
    self.prefill_kind = prefill_settings(model.cfg.attention).kind
    phd.check_inference(model.cfg)  # token repetition: phd, swa, cswa keep a vanilla cache
    self.vocab_size = model.cfg.vocab_size
    self.graphdef, self.state = nnx.split(model)
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("greedy",))
    self._step = jax.jit(self._step_fn, static_argnames=("greedy",), donate_argnames="cache")
    self._extend = jax.jit(self._extend_fn, donate_argnames="cache")

  # ---------------------------------------------------------------- traced functions
  def _prefill_fn(self, state, tokens, lengths, key, temperature, top_p, *, greedy):
    model = nnx.merge(self.graphdef, state)
    cache = KVCache.empty(tokens.shape[0], self.max_len, real=lengths)
    ctx = ForwardContext(positions=cache.query_positions(tokens.shape[1]), cache=cache)
    logits = model(tokens, ctx, logits_at=(lengths - 1)[:, None])[:, 0]
    stats = ctx.cache.stats
    cache = ctx.cache.advance(lengths)
    nxt = draw(logits, key, greedy=greedy, temperature=temperature, top_p=top_p)
    return logits, cache, nxt, stats

  def _step_fn(self, state, cache, tokens, key, temperature, top_p, *, greedy):
    model = nnx.merge(self.graphdef, state)
    ctx = ForwardContext(positions=cache.query_positions(1), cache=cache)
    logits = model(tokens[:, None], ctx)[:, 0]
    nxt = draw(logits, key, greedy=greedy, temperature=temperature, top_p=top_p)
    return logits, ctx.cache.advance(1), nxt

  def _extend_fn(self, state, cache, tokens):
    model = nnx.merge(self.graphdef, state)
    ctx = ForwardContext(positions=cache.query_positions(tokens.shape[1]), cache=cache)
    logits = model(tokens, ctx)
    return logits, ctx.cache.advance(tokens.shape[1])

  def _check_ids(self, tokens) -> None:
    """Token ids given from outside must be in the vocabulary (an id past the embedding table
    would read clamped or undefined rows without an error). Arrays already on the device (the
    engine's own next tokens) are not fetched to check."""
    if isinstance(tokens, jax.Array):
      return
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)]
      raise InputError(f"token ids must be in 0..{self.vocab_size - 1} (the model's vocabulary); "
                       f"got {bad[:5].tolist()}")

  def _mesh(self):
    return sharding.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  # ---------------------------------------------------------------- public calls
  def prefill(self, tokens, lengths=None, *, sampling: Sampling = GREEDY,
              key: jax.Array | None = None) -> Prefill:
    """Runs the prompts tokens [batch, T] (right-padded; lengths [batch], default all T) into
    a fresh cache."""
    self._check_ids(tokens)
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
      raise ValueError(f"prompts must be [batch, length] with length > 0, got {tokens.shape}")
    b, t = tokens.shape
    lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
      raise ValueError(f"lengths must be [{b}] values in 1..{t}, got {lengths.tolist()}")
    if t > self.max_len:
      raise ValueError(f"a prompt of {t} tokens does not fit the cache (max_len={self.max_len})")
    if self.prefill_kind == "flexprefill" and lengths.min() < t:
      raise ValueError("flexprefill prefill needs prompts of equal length (no padding): its "
                       "pattern comes from each row's last block of queries")
    if not sampling.greedy and key is None:
      raise ValueError("sampling with temperature > 0 needs key=")
    with self._mesh():
      logits, cache, nxt, stats = self._prefill(
          self.state, jnp.asarray(tokens), jnp.asarray(lengths), key,
          *_sampling_values(sampling), greedy=sampling.greedy)
    return Prefill(logits=logits, cache=cache, next_token=nxt, stats=stats)

  def step(self, cache: KVCache, tokens, *, sampling: Sampling = GREEDY,
           key: jax.Array | None = None) -> tuple[jax.Array, KVCache, jax.Array]:
    """One decode step: tokens [batch] at each row's next position -> (logits [batch, vocab],
    the new cache, the next token [batch]). The cache passed in is consumed (donated); the
    caller keeps lengths + 1 <= max_len."""
    if not sampling.greedy and key is None:
      raise ValueError("sampling with temperature > 0 needs key=")
    self._check_ids(tokens)
    with self._mesh():
      return self._step(self.state, cache, jnp.asarray(tokens, jnp.int32), key,
                        *_sampling_values(sampling), greedy=sampling.greedy)

  def extend(self, cache: KVCache, tokens) -> tuple[jax.Array, KVCache]:
    """A continuation of t tokens [batch, t] attending densely over the cache and each other
    -> (logits [batch, t, vocab], the new cache). The cache passed in is consumed."""
    self._check_ids(tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or int(jnp.max(cache.lengths)) + tokens.shape[1] > self.max_len:
      raise ValueError(f"a continuation {tokens.shape} does not fit the cache "
                       f"(max_len={self.max_len}, rows hold up to {int(jnp.max(cache.lengths))})")
    with self._mesh():
      return self._extend(self.state, cache, tokens)

  def generate(self, tokens, lengths=None, *, max_new_tokens: int,
               sampling: Sampling = GREEDY, key: jax.Array | None = None,
               stop_token: int | None = None) -> Generation:
    """Prefill, then max_new_tokens - 1 decode steps; returns the max_new_tokens new tokens
    per row. Rows that produced `stop_token` repeat it afterwards (the batch runs on)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t = np.asarray(tokens).shape[-1]
    if t + max_new_tokens - 1 > self.max_len:
      raise ValueError(f"{t} prompt + {max_new_tokens} new tokens do not fit the cache "
                       f"(max_len={self.max_len})")
    keys = (jax.random.split(key, max_new_tokens) if key is not None
            else [None] * max_new_tokens)
    out = self.prefill(tokens, lengths, sampling=sampling, key=keys[0])
    cache, token = out.cache, out.next_token
    produced = [token]
    for i in range(1, max_new_tokens):
      _, cache, token = self.step(cache, token, sampling=sampling, key=keys[i])
      produced.append(token)
    new = np.stack([np.asarray(x) for x in produced], axis=1)
    n = np.full((new.shape[0],), max_new_tokens, np.int32)
    if stop_token is not None:
      hit = new == stop_token
      first = np.where(hit.any(axis=1), hit.argmax(axis=1), max_new_tokens - 1)
      n = np.where(hit.any(axis=1), first + 1, max_new_tokens).astype(np.int32)
      after = np.arange(max_new_tokens)[None, :] > first[:, None]
      new = np.where(after & hit.any(axis=1)[:, None], stop_token, new)
    stats = {k: np.asarray(v) for k, v in out.stats.items()}
    return Generation(tokens=new.astype(np.int32), lengths=n, stats=stats)
