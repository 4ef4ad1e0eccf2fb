"""The inference engine: KV-cache decoding == the full forward, ragged batches == one by one,
greedy / top-p sampling, FlexPrefill prefill with every block == dense, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import run_config
from research import sharding
from research.infer import Engine, KVCache, Sampling, pad_prompts, top_p_mask, with_overrides
from flax import nnx

from research.model import create_model, param_shardings
from research.model.attention import SEQUENCE_MIXERS

VOCAB = 61
ATOL = 2e-5  # fp32; observed ~2e-7


def small_config(**overrides):
  c = run_config.default_config()
  c.model.vocab_size = VOCAB
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.data.seq_len = 64
  config_lib.apply_overrides(c, {f"model.{k}": v for k, v in overrides.items()})
  return run_config.resolve(c).model


@pytest.fixture(scope="module")
def model():
  return create_model(small_config())


@pytest.fixture(scope="module")
def engine(model):
  """One engine for the tests of the default model: its compilations are shared."""
  return Engine(model, max_len=24)


_forward = nnx.jit(lambda model, x: model(x))


def tokens(batch, seq, seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB), np.int32)


def full_logits(model, x):
  return np.asarray(_forward(model, jnp.asarray(x)))


def decode_one_by_one(engine, x):
  """Prefill of the first token, then each next token by a decode step: [batch, seq, vocab]."""
  pre = engine.prefill(x[:, :1])
  out, cache = [np.asarray(pre.logits)], pre.cache
  for i in range(1, x.shape[1]):
    logits, cache, _ = engine.step(cache, x[:, i])
    out.append(np.asarray(logits))
  return np.stack(out, axis=1)


def test_token_by_token_equals_full_forward(model, engine):
  x = tokens(2, 12)
  np.testing.assert_allclose(decode_one_by_one(engine, x), full_logits(model, x), atol=ATOL,
                             rtol=0)


@pytest.mark.parametrize("overrides", [
    {"attention.norms": "qk", "remat": "block"},  # the cache threads through remat
    {"attention.kind": "moda"},  # a mixer built on DenseAttention reuses the cache path
])
def test_token_by_token_equals_full_forward_variants(overrides):
  if overrides.get("attention.kind", "dense") not in SEQUENCE_MIXERS:
    pytest.skip(f"sequence mixer {overrides['attention.kind']} is not registered")
  model = create_model(small_config(**overrides))
  x = tokens(2, 12)
  got = decode_one_by_one(Engine(model, max_len=16), x)
  np.testing.assert_allclose(got, full_logits(model, x), atol=ATOL, rtol=0)


def test_prefill_then_continuation_equals_full_forward(model, engine):
  """A prefill of 7 tokens, a continuation chunk of 4, then single steps."""
  x = tokens(2, 14, seed=1)
  pre = engine.prefill(x[:, :7])
  chunk, cache = engine.extend(pre.cache, x[:, 7:11])
  got = [np.asarray(pre.logits)[:, None], np.asarray(chunk)]
  for i in range(11, 14):
    logits, cache, _ = engine.step(cache, x[:, i])
    got.append(np.asarray(logits)[:, None])
  full = full_logits(model, x)
  np.testing.assert_allclose(np.concatenate(got, axis=1), full[:, 6:], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 14])


def test_ragged_batch_equals_one_by_one(engine):
  prompts = [tokens(1, n, seed=n)[0] for n in (3, 9, 6)]
  x, lengths = pad_prompts(prompts, pad_id=VOCAB - 1)
  batch = engine.prefill(x, lengths)
  cache, step_tokens = batch.cache, np.array([5, 7, 11], np.int32)
  logits_batch = [np.asarray(batch.logits)]
  for _ in range(3):
    logits, cache, _ = engine.step(cache, step_tokens)
    logits_batch.append(np.asarray(logits))
  for b, p in enumerate(prompts):
    alone = engine.prefill(p[None])
    got, c = [np.asarray(alone.logits)[0]], alone.cache
    for _ in range(3):
      logits, c, _ = engine.step(c, step_tokens[b:b + 1])
      got.append(np.asarray(logits)[0])
    np.testing.assert_allclose(np.stack([l[b] for l in logits_batch]), np.stack(got),
                               atol=ATOL, rtol=0)
  # and the generated tokens agree row by row
  together = engine.generate(x, lengths, max_new_tokens=5).tokens
  for b, p in enumerate(prompts):
    np.testing.assert_array_equal(together[b], engine.generate(p[None], max_new_tokens=5).tokens[0])


def test_greedy_is_deterministic_and_argmax_of_full_forward(model, engine):
  x = tokens(2, 5, seed=3)
  a = engine.generate(x, max_new_tokens=6).tokens
  np.testing.assert_array_equal(a, engine.generate(x, max_new_tokens=6).tokens)
  # each generated token is the argmax of the full forward over the prompt and the tokens
  # generated before it
  full = full_logits(model, np.concatenate([x, a[:, :-1]], axis=1))
  np.testing.assert_array_equal(a, full[:, 4:].argmax(-1))


def test_top_p_to_zero_equals_greedy(engine):
  x = tokens(2, 5, seed=4)
  greedy = engine.generate(x, max_new_tokens=5).tokens
  nucleus = engine.generate(x, max_new_tokens=5, sampling=Sampling(temperature=1.0, top_p=1e-6),
                            key=jax.random.key(0)).tokens
  np.testing.assert_array_equal(greedy, nucleus)
  # temperature sampling is reproducible from its key and differs from greedy somewhere
  hot = Sampling(temperature=2.0)
  s1 = engine.generate(x, max_new_tokens=5, sampling=hot, key=jax.random.key(1)).tokens
  s2 = engine.generate(x, max_new_tokens=5, sampling=hot, key=jax.random.key(1)).tokens
  np.testing.assert_array_equal(s1, s2)
  assert (s1 != greedy).any()


def test_sharded_engine_equals_unsharded(model, engine):
  """Parameters sharded over a 2 x 2 (fsdp, tensor) mesh, activations pinned by the model's
  logical axes: the same logits and tokens."""
  mesh = sharding.make_mesh("fsdp_tp", devices=jax.devices()[:4], tensor=2)
  state = nnx.state(model)
  sharded = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
  x = tokens(2, 6, seed=7)
  sharded_engine = Engine(sharded, max_len=24, mesh=mesh)
  np.testing.assert_allclose(np.asarray(sharded_engine.prefill(x).logits),
                             np.asarray(engine.prefill(x).logits), atol=ATOL, rtol=0)
  np.testing.assert_array_equal(sharded_engine.generate(x, max_new_tokens=3).tokens,
                                engine.generate(x, max_new_tokens=3).tokens)


def test_top_p_mask_reaches_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
  np.testing.assert_array_equal(top_p_mask(logits, 0.5), [[1, 0, 0], [0, 1, 0]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.7), [[1, 1, 0], [0, 1, 1]])
  np.testing.assert_array_equal(top_p_mask(logits, 1.0), [[1, 1, 1], [1, 1, 1]])


def test_stop_token_ends_rows(engine):
  x = tokens(2, 5, seed=3)
  free = engine.generate(x, max_new_tokens=6).tokens
  stop = int(free[0, 2])
  out = engine.generate(x, max_new_tokens=6, stop_token=stop)
  first = int(np.argmax(free[0] == stop))
  assert out.lengths[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, first:], stop)


FLEX = {"attention.flexprefill.block_size": 16, "attention.flexprefill.min_budget": 16}


def test_flexprefill_with_every_block_equals_dense(model):
  """gamma = 1 and a minimum budget of the whole prompt select every causal block."""
  x = tokens(2, 64, seed=5)
  sparse = with_overrides(model, {"model.attention.prefill": "flexprefill",
                                  "model.attention.flexprefill.gamma": 1.0,
                                  "model.attention.flexprefill.block_size": 16,
                                  "model.attention.flexprefill.min_budget": 64})
  dense_engine, sparse_engine = Engine(model, max_len=72), Engine(sparse, max_len=72)
  d, s = dense_engine.generate(x, max_new_tokens=4), sparse_engine.generate(x, max_new_tokens=4)
  np.testing.assert_array_equal(d.tokens, s.tokens)
  np.testing.assert_allclose(s.density(), 1.0)
  assert d.density() is None
  pd, ps = dense_engine.prefill(x), sparse_engine.prefill(x)
  np.testing.assert_allclose(np.asarray(ps.logits), np.asarray(pd.logits), atol=ATOL, rtol=0)
  for name in ("k", "v"):  # the prefix KV of the top layer too
    np.testing.assert_allclose(np.asarray(ps.cache.entries[f"layer1/{name}"]),
                               np.asarray(pd.cache.entries[f"layer1/{name}"]), atol=ATOL, rtol=0)


def test_flexprefill_sparse_prefill_runs_and_reports_density(model):
  x = tokens(2, 128, seed=6)
  sparse = with_overrides(model, {"model.attention.prefill": "flexprefill",
                                  "model.attention.flexprefill.gamma": 0.5,
                                  "model.attention.flexprefill.tau": 0.0,
                                  "model.attention.flexprefill.block_size": 16,
                                  "model.attention.flexprefill.min_budget": 16})
  out = Engine(sparse, max_len=136).generate(x, max_new_tokens=3)
  density = out.density()
  assert density.shape == (2,) and np.all(density > 0) and np.all(density < 1)
  assert set(out.stats) == {f"flexprefill/{s}/layer{i}" for s in ("density", "query_aware")
                            for i in range(2)}
  # a training forward of the same model is unaffected by the prefill setting
  np.testing.assert_array_equal(full_logits(sparse, x), full_logits(model, x))


def test_flexprefill_refuses_padded_rows(model):
  sparse = with_overrides(model, {"model.attention.prefill": "flexprefill"})
  x, lengths = pad_prompts([[1, 2, 3], [4, 5]])
  with pytest.raises(ValueError, match="equal length"):
    Engine(sparse, max_len=8).prefill(x, lengths)


@pytest.mark.parametrize("key,value,match", [
    ("attention.prefill", "sparse", "model.attention.prefill='sparse' is not one of dense, "
                                    "flexprefill"),
    ("attention.flexprefill.gamma", 1.5, "model.attention.flexprefill: gamma"),
    ("attention.flexprefill.tau", -0.1, "model.attention.flexprefill: tau"),
    ("attention.flexprefill.block_size", 24, "model.attention.flexprefill: block_size"),
    ("attention.flexprefill.mode", "diagonal", "model.attention.flexprefill: mode"),
    ("attention.flexprefill.mode", "fixed_budget", "needs budget"),
    ("attention.flexprefill.impl", "cuda", "model.attention.flexprefill.impl='cuda'"),
])
def test_config_errors(key, value, match):
  """Checked when a model that reads them is built: a resolved config holds the FlexPrefill
  settings only when it selects that prefill."""
  with pytest.raises(config_lib.ConfigError, match=match):
    create_model(small_config(**{"attention.prefill": "flexprefill", key: value}))


def test_unknown_prefill_key_is_an_error():
  c = run_config.default_config()
  with pytest.raises(config_lib.ConfigError, match="unknown config key"):
    config_lib.apply_overrides(c, {"model.attention.flexprefill.gama": 0.9})


def test_with_overrides_refuses_parameter_changes(model):
  with pytest.raises(config_lib.ConfigError, match="change the model's parameters"):
    with_overrides(model, {"model.num_kv_heads": 4})


def test_capacity_and_argument_errors(model):
  engine = Engine(model, max_len=8)
  with pytest.raises(ValueError, match="do not fit the cache"):
    engine.generate(tokens(1, 6), max_new_tokens=4)
  with pytest.raises(ValueError, match="needs key"):
    engine.generate(tokens(1, 3), max_new_tokens=2, sampling=Sampling(temperature=1.0))
  with pytest.raises(ValueError, match="lengths"):
    engine.prefill(tokens(2, 4), np.array([0, 4]))
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0.0)


def test_cache_appends_at_each_rows_offset():
  cache = KVCache.empty(2, 6)
  cache, buf = cache.append("x", jnp.ones((2, 3, 1)))
  cache = cache.advance(jnp.array([1, 3]))
  cache, buf = cache.append("x", jnp.full((2, 2, 1), 2.0))
  np.testing.assert_array_equal(np.asarray(buf)[..., 0], [[1, 2, 2, 0, 0, 0], [1, 1, 1, 2, 2, 0]])
  positions, valid = cache.key_positions(2)
  np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(positions)[1], np.arange(6))
  np.testing.assert_array_equal(np.asarray(cache.query_positions(2)), [[1, 2], [3, 4]])
