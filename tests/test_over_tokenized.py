"""Over-Tokenized Transformer (arXiv:2501.16975): n-gram ids, over-encoding, over-decoding.

Hand cases of eq. 1 (ids in base V, id 0 before the sequence start), the uint32 arithmetic
against Python's integers where V^3 overflows int32, Alg. 1's sum, cached decoding, row-sharded
tables, and App. C's per-offset cross-entropies.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from equivalence import assert_same_step
from research import config as config_lib
from research import run_config
from research import sharding
from research.errors import ConfigError
from research.infer import Engine
from research.model import create_model, ngram
from research.model.context import ForwardContext
from research.model.lm import DecoderLM
from research.train.optim import make_optimizer
from research.train.trainer import make_train_step

VOCAB = 61
ATOL = 2e-5  # fp32 on CPU; observed ~1e-7


def config(**overrides):
  c = run_config.default_config()
  c.model.vocab_size = VOCAB
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 4
  c.data.seq_len = 16
  c.train.batch_size = 8
  overrides = {"embed.kind": "over_encoding", "embed.over_encoding.rows": 509, **overrides}
  config_lib.apply_overrides(c, {f"model.{k}": v for k, v in overrides.items()})
  return run_config.resolve(c)


def context(b, t):
  return ForwardContext(positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))


# ------------------------------------------------------------------------------ n-gram ids

def _ids(tokens, order, vocab, modulus):
  history = ngram.previous_tokens(jnp.asarray([tokens], jnp.int32), order)
  return np.asarray(ngram.ngram_id(history, order, vocab, modulus))[0].tolist()


def test_ngram_ids_by_hand_in_base_ten():
  """With V = 10 an i-gram id reads as the last i tokens written as a decimal number, oldest
  digit first; before the start the missing tokens are 0."""
  x = [3, 1, 4, 1, 5]
  assert _ids(x, 2, 10, 1000) == [3, 31, 14, 41, 15]
  assert _ids(x, 3, 10, 1000) == [3, 31, 314, 141, 415]
  assert _ids(x, 3, 10, 7) == [v % 7 for v in (3, 31, 314, 141, 415)]


def test_ngram_ids_equal_python_integers_where_int32_overflows():
  vocab, n = 50257, 3
  rng = np.random.default_rng(0)
  x = rng.integers(0, vocab, size=(4, 40))
  for modulus in (12_800_003, 65_537, 3 * vocab, 1):
    history = ngram.previous_tokens(jnp.asarray(x, jnp.int32), n)
    got = np.asarray(ngram.ngram_id(history, n, vocab, modulus))
    padded = np.pad(x, ((0, 0), (n - 1, 0))).astype(object)
    want = (padded[:, 2:] + padded[:, 1:-1] * vocab + padded[:, :-2] * vocab ** 2) % modulus
    np.testing.assert_array_equal(got, want.astype(np.int64))


def test_modulus_a_multiple_of_the_vocabulary_keeps_only_the_previous_token_mod_c():
  """m = c V: the 2-gram id mod m is x_t + V (x_{t-1} mod c), so bigrams whose previous tokens
  agree mod c collide (the structure behind Table 4)."""
  vocab, c = 61, 8
  x = np.random.default_rng(1).integers(0, vocab, size=30)
  got = _ids(x.tolist(), 2, vocab, c * vocab)
  prev = np.concatenate([[0], x[:-1]])
  assert got == (x + vocab * (prev % c)).tolist()


def test_mulmod_matches_python():
  x = jnp.asarray([0, 1, 2, 65_535, 131_071], jnp.uint32)
  for c, m in [(0, 5), (7, 11), (123_456_7, 134_217_689), (134_217_000, 134_217_689)]:
    got = np.asarray(ngram.mulmod(x, c, m)).tolist()
    assert got == [int(v) * c % m for v in np.asarray(x)]


# ------------------------------------------------------------------------------ over-encoding

def test_over_encoding_is_algorithm_one():
  """OE(x) = (E[x] + sum_t W_t T_t[id_t mod (m + 2t)] + b) / (1 + k (n - 1)), by hand in numpy."""
  c = config(**{"embed.over_encoding.slices": 2})
  model = DecoderLM(c.model, rngs=nnx.Rngs(0))
  emb = model.embed
  x = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, VOCAB))
  got = np.asarray(emb(jnp.asarray(x)))
  table, ngrams = np.asarray(emb.table[...]), np.asarray(emb.ngrams[...])
  proj, bias = np.asarray(emb.project.kernel[...]), np.asarray(emb.project.bias[...])
  moduli = [509, 511, 513, 515]  # orders (2, 2, 3, 3) x slices, m + 2 idx
  assert emb.moduli == moduli and emb.width == 8
  want = table[x] + bias
  offset = 0
  pad = np.pad(x, ((0, 0), (2, 0))).astype(np.int64)
  for t, (order, modulus) in enumerate(zip((2, 2, 3, 3), moduli)):
    gid = sum(pad[:, 2 - d:pad.shape[1] - d] * VOCAB ** d for d in range(order)) % modulus
    want = want + ngrams[offset + gid] @ proj[8 * t:8 * (t + 1)]
    offset += modulus
  np.testing.assert_allclose(got, want / 5, atol=1e-6)


def test_without_normalisation_or_unigram():
  c = config(**{"embed.over_encoding.normalize": False, "embed.over_encoding.unigram": False,
                "embed.over_encoding.grams": "2"})
  model = DecoderLM(c.model, rngs=nnx.Rngs(0))
  emb = model.embed
  x = jnp.asarray([[5, 7, 9]])
  rows = np.asarray(emb.ngram_rows(x))[..., 0]
  want = (np.asarray(emb.ngrams[...])[rows] @ np.asarray(emb.project.kernel[...])
          + np.asarray(emb.project.bias[...]))
  np.testing.assert_allclose(np.asarray(emb(x)), want, atol=1e-6)


def test_exact_tables_are_bijective():
  c = config(**{"embed.over_encoding.exact": True, "embed.over_encoding.grams": "2,3"})
  emb = DecoderLM(c.model, rngs=nnx.Rngs(0)).embed
  assert emb.moduli == [VOCAB ** 2, VOCAB ** 3]
  x = np.random.default_rng(2).integers(0, VOCAB, size=(3, 20))
  rows = np.asarray(emb.ngram_rows(jnp.asarray(x)))
  pad = np.pad(x, ((0, 0), (2, 0)))
  trigrams = {(a, b, cc): r for a, b, cc, r in zip(pad[:, :-2].ravel(), pad[:, 1:-1].ravel(),
                                                    pad[:, 2:].ravel(), rows[..., 1].ravel())}
  assert len(set(trigrams.values())) == len(trigrams)  # distinct trigrams, distinct rows
  assert emb.ngrams.shape[0] % 256 == 0 and emb.ngrams.shape[0] >= VOCAB ** 2 + VOCAB ** 3


@pytest.mark.parametrize("overrides, match", [
    ({"embed.over_encoding.grams": "1,2"}, "orders >= 2"),
    ({"embed.over_encoding.grams": "two"}, "orders >= 2"),
    ({"embed.over_encoding.slices": 3}, "does not divide"),
    ({"embed.over_encoding.exact": True, "embed.over_encoding.slices": 2}, "slices=1"),
    ({"embed.over_encoding.exact": True, "embed.over_encoding.grams": "5"}, "rows is outside"),
    ({"embed.over_encoding.rows": 0}, "rows is outside"),
    ({"head.kind": "over_decoding", "head.od_weights": "0.1,x"}, "od_weights"),
    ({"head.kind": "over_decoding", "head.od_rank": -1}, "od_rank"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    DecoderLM(config(**overrides).model, rngs=nnx.Rngs(0))


def test_vocabulary_too_large_for_the_ids():
  c = config()
  c.model.vocab_size = 1 << 17
  with pytest.raises(ConfigError, match="too large"):
    nnx.eval_shape(lambda: DecoderLM(c.model, rngs=nnx.Rngs(0)))


def assert_decoding_equals_forward(model, seed: int) -> None:
  """A prefill of 4 tokens then 6 decode steps give the full forward's logits."""
  x = np.asarray(jax.random.randint(jax.random.key(seed), (2, 10), 0, VOCAB), np.int32)
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  engine = Engine(model, max_len=16)
  pre = engine.prefill(x[:, :4])
  got, cache = [np.asarray(pre.logits)], pre.cache
  for i in range(4, 10):
    logits, cache, _ = engine.step(cache, x[:, i])
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(got, axis=1), full[:, 3:], atol=ATOL, rtol=0)


def test_cached_decoding_equals_the_full_forward():
  """A decode step reads its n-grams from the tokens the cache has kept."""
  assert_decoding_equals_forward(
      create_model(config(**{"embed.over_encoding.slices": 2}).model), seed=3)


def _train_step(c, mesh):
  model = create_model(c.model, mesh=mesh, seed=1)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(c.train)
  step = jax.jit(make_train_step(graphdef, tx, schedule, c), donate_argnums=0)
  x = jax.random.randint(jax.random.key(0), (c.train.batch_size, c.data.seq_len + 1), 0, VOCAB)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  with sharding.use_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.named_sharding(("batch", "seq"), v.shape, mesh))
             for k, v in batch.items()}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": jax.jit(tx.init)(params)}
    state, metrics = step(state, batch)
  spec = model.embed.ngrams[...].sharding.spec
  return jax.tree.map(np.asarray, state["params"]), float(metrics["loss"]), spec


def test_row_sharded_tables_train_as_unsharded():
  """The n-gram tables' rows over fsdp x tensor (each device reads its own rows): one AdamW step
  gives the unsharded loss and parameters."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (tests force 8 CPU devices)")
  c = config(**{"embed.over_encoding.slices": 2, "head.kind": "over_decoding"})
  ref_params, ref_loss, _ = _train_step(c, sharding.make_mesh("dp", devices=jax.devices()[:1]))
  params, loss, spec = _train_step(c, sharding.make_mesh("fsdp_tp", devices=jax.devices()[:4],
                                                         tensor=2))
  assert spec == jax.sharding.PartitionSpec(("fsdp", "tensor"), None)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_same_step(params, ref_params, lr=c.train.lr)


# ------------------------------------------------------------------------------ heads

def test_over_decoding_adds_the_per_offset_cross_entropies():
  """aux `od` = sum_j lambda_j CE(h_t U_j, x_{t+j}) from the final (normed) hidden state."""
  c = config(**{"embed.kind": "plain", "head.kind": "over_decoding",
                "head.od_weights": "0.5,0.25", "head.od_rank": 8})
  model = DecoderLM(c.model, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(4), (2, 12), 0, VOCAB)
  ctx = context(2, 12)
  logits = model(x, ctx)
  h = model.final_norm(model.hidden_states(x)[-1])
  head = model.head
  want = 0.0
  for i, (weight, offset) in enumerate(zip((0.5, 0.25), (2, 3))):
    z = head.vocabularies[i](head.project[i](h[:, :12 - offset]))
    want += weight * optax.softmax_cross_entropy_with_integer_labels(z, x[:, offset:]).mean()
  assert float(ctx.aux_losses["od"]) == pytest.approx(float(want), rel=1e-5)
  # the next-token logits are the plain head's
  plain = config(**{"embed.kind": "plain"})
  base = DecoderLM(plain.model, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(base(x)), atol=1e-6)
  assert model.flops_per_token(12) - base.flops_per_token(12) == pytest.approx(
      2 * (2 * 32 * 8 + 2 * 8 * VOCAB))


def test_mtp_head_composes_with_over_encoding():
  """OT = OE + MTP (the paper's main-text combination): the MTP module fuses token t+1's
  over-encoded embedding computed in its window (it reads t, t-1), not the embedding of the
  shifted window, whose first position would lose its n-grams. The MTP loss by hand."""
  c = config(**{"head.kind": "mtp", "head.mtp_weight": 0.1})
  model = DecoderLM(c.model, rngs=nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(5), (2, 12), 0, VOCAB)
  ctx = context(2, 12)
  model(x, ctx)
  head, emb = model.head, model.embed
  stream = model.hidden_states(x)[-1][:, :-1]  # plain residual: the stream is the hidden state

  def mtp(nxt):
    z = head.fuse(jnp.concatenate([head.h_norm(stream), head.e_norm(nxt)], axis=-1))
    z = head.block(z, context(2, 11))
    logits = head(model.final_norm(z)[:, :-1], emb, None)
    return 0.1 * optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 2:]).mean()

  in_window, shifted = mtp(emb(x)[:, 1:]), mtp(emb(x[:, 1:]))
  assert float(ctx.aux_losses["mtp"]) == pytest.approx(float(in_window), rel=1e-5)
  assert abs(float(in_window) - float(shifted)) > 1e-6


# ------------------------------------------------------------------------------ the report's fit

def test_log_linear_fit_recovers_a_known_slope():
  from research import experiments
  analysis = experiments._load_module("over_tokenized", "analysis.py")  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  x = np.repeat(np.log10([1021, 4093, 16381, 65521]), 3)
  y = 1.7 - 0.03 * x + rng.normal(0, 0.002, size=x.shape)
  f = analysis.fit(list(zip(x, y)))
  b, a = np.polyfit(x, y, 1)
  assert f["b"] == pytest.approx(b) and f["a"] == pytest.approx(a) and f["n"] == 12
  assert f["lo"] < -0.03 < f["hi"] and f["se"] > 0
  exact = analysis.fit([(1.0, 2.0), (2.0, 1.9), (3.0, 1.8)])
  assert exact["b"] == pytest.approx(-0.1) and exact["se"] == pytest.approx(0.0, abs=1e-12)
  assert analysis.fit([(1.0, 2.0), (1.0, 1.9), (1.0, 1.8)]) is None


def test_over_encoding_composes_with_phd_decoding():
  """OE embeds the tokens once, before PHD lays out their copies: cached decoding of the two
  together (PHD-CSWA's hidden buffer, OE's token history) equals the full forward."""
  assert_decoding_equals_forward(create_model(config(**{"phd.kind": "cswa"}).model), seed=6)
