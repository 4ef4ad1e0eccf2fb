"""Token repetition (model.phd, PHD-Transformer): the masks by hand, the original stream is a
vanilla Transformer, one copy is the plain model bit for bit, the logits are the final copies',
cached decoding equals the full forward with a vanilla-size KV cache, FLOPs, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import copy_parameters
from research import run_config
from research.errors import ConfigError
from research.eval import lm_eval
from research.infer import Engine, pad_prompts
from research.model import ForwardContext, abstract_model, create_model, phd
from research.model.overhead import overheads
from test_model import small_config as model_small_config

VOCAB = 61
ATOL = 2e-5  # fp32; observed ~2e-7


def small_config(**overrides):
  """test_model's small model (vocab VOCAB, 2 x 32, 4 heads, seq_len 16) with 2 KV heads."""
  return model_small_config(num_kv_heads=2, **overrides)


_forward = nnx.jit(lambda model, x: model(x))
_hidden = nnx.jit(lambda model, x: model.hidden_states(x))


def tokens(batch, seq, seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB), np.int32)


def interleaved_mask(kind, k, t, **settings):
  """The mask in the paper's interleaved order x_1^1 .. x_1^K x_2^1 ..: flat index n K + s - 1."""
  s = phd.Settings(kind=kind, repeats=k, **settings)
  n, j = np.divmod(np.arange(k * t), k)
  return phd.allowed(s, n[:, None], j[:, None] + 1, n[None, :], j[None, :] + 1).astype(int)


# Order of rows and columns: (n, s) = (0,1) (0,2) (1,1) (1,2) (2,1) (2,2); row = query.
PHD_K2_T3 = [[1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0],
             [1, 0, 1, 0, 0, 0],  # an original sees earlier originals and itself
             [1, 0, 1, 1, 0, 0],  # a hidden copy: earlier originals and its position's copies
             [1, 0, 1, 0, 1, 0],
             [1, 0, 1, 0, 1, 1]]
SWA_K2_T3_W1 = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 0, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],  # + the one preceding hidden token (0,2)
                [1, 0, 1, 0, 1, 0],
                [1, 0, 1, 1, 1, 1]]  # + (1,2), not (0,2): the window is one token
CSWA_K2_T3_W1_C2 = [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 0, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],  # (0,2) is in chunk 0 with position 1
                    [1, 0, 1, 0, 1, 0],
                    [1, 0, 1, 0, 1, 1]]  # (1,2) is in chunk 0, position 2 in chunk 1
NAIVE_K2_T3 = np.tril(np.ones((6, 6), int)).tolist()
# K = 3, T = 2: (0,1) (0,2) (0,3) (1,1) (1,2) (1,3); swa, window of 1 position (all copies)
SWA_K3_T2_POSITIONS = [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 0, 0, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 1, 1]]
SWA_K3_T2_W1 = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 0, 0, 1, 0, 0],
                [1, 0, 1, 1, 1, 0],  # one hidden token back: (0,3)
                [1, 0, 0, 1, 1, 1]]  # one back is (1,2), its own position's


@pytest.mark.parametrize("kind, k, t, settings, expected", [
    ("phd", 2, 3, {}, PHD_K2_T3),
    ("swa", 2, 3, dict(window=1), SWA_K2_T3_W1),
    ("cswa", 2, 3, dict(window=1, chunk=2), CSWA_K2_T3_W1_C2),
    ("naive", 2, 3, {}, NAIVE_K2_T3),
    ("swa", 3, 2, dict(window=1, window_unit="positions"), SWA_K3_T2_POSITIONS),
    ("swa", 3, 2, dict(window=1), SWA_K3_T2_W1),
])
def test_mask_by_hand(kind, k, t, settings, expected):
  np.testing.assert_array_equal(interleaved_mask(kind, k, t, **settings), expected)


def test_swa_with_a_long_window_sees_every_earlier_hidden_token():
  mask = interleaved_mask("swa", 3, 4, window=100)
  hidden = np.arange(12) % 3 > 0
  n = np.arange(12) // 3
  earlier = n[None, :] < n[:, None]
  np.testing.assert_array_equal(mask[np.ix_(hidden, hidden)],
                                (earlier | (np.arange(12)[None] <= np.arange(12)[:, None])
                                 & (n[None] == n[:, None]))[np.ix_(hidden, hidden)])


@pytest.mark.parametrize("settings", [
    dict(kind="naive", repeats=3), dict(kind="phd", repeats=2), dict(kind="phd", repeats=4),
    dict(kind="swa", repeats=2, window=1), dict(kind="swa", repeats=3, window=4),
    dict(kind="swa", repeats=3, window=2, window_unit="positions"),
    dict(kind="cswa", repeats=2, window=16, chunk=4),
    dict(kind="cswa", repeats=3, window=3, chunk=5),
    dict(kind="cswa", repeats=3, window=2, chunk=3, window_unit="positions")])
def test_keys_per_token_counts_the_mask(settings):
  for t in (1, 7, 13):
    mask = interleaved_mask(t=t, k=settings["repeats"], **{
        k: v for k, v in settings.items() if k != "repeats"})
    assert phd.keys_per_token(phd.Settings(**settings), t) == pytest.approx(mask.sum() / t)


def test_the_original_stream_is_a_vanilla_transformer():
  """PHD §3: an original sees earlier originals and itself only, so with the same parameters
  the originals' hidden states equal a plain decoder's at every layer; naive repetition's do
  not."""
  x = jnp.asarray(tokens(2, 9))
  plain = create_model(small_config(), seed=1)
  want = _hidden(plain, x)
  for kind in ("phd", "swa", "cswa"):
    model = create_model(small_config(**{"phd.kind": kind, "phd.repeats": 3}), seed=1)
    got = _hidden(model, x)
    assert got[-1].shape == (2, 9 + 2 * 9, 32)  # [originals ; hidden copies]
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a[:, :9]), np.asarray(b), atol=1e-5, rtol=0)
  naive = _hidden(create_model(small_config(**{"phd.kind": "naive"}), seed=1), x)
  assert np.abs(np.asarray(naive[-1][:, :9]) - np.asarray(want[-1])).max() > 1e-3


def test_one_copy_is_the_plain_model_bit_for_bit():
  x = jnp.asarray(tokens(2, 10))
  plain = create_model(small_config(), seed=2)
  one = create_model(small_config(**{"phd.kind": "swa", "phd.repeats": 1}), seed=2)
  np.testing.assert_array_equal(np.asarray(_forward(one, x)), np.asarray(_forward(plain, x)))
  assert one.flops_per_token(16) == plain.flops_per_token(16)


def test_logits_are_the_final_copies():
  """One logit row per input token, from its K-th copy (PHD §3: the loss is on the final copy
  only); the trainer's next-token loss applies unchanged."""
  k, t = 3, 8
  model = create_model(small_config(**{"phd.kind": "swa", "phd.repeats": k}), seed=0)
  x = jnp.asarray(tokens(2, t))
  logits = _forward(model, x)
  assert logits.shape == (2, t, VOCAB)
  last = _hidden(model, x)[-1]  # [b, t + (k - 1) t, d]
  final = last[:, t + np.arange(t) * (k - 1) + k - 2]
  want = model.head(model.final_norm(final), model.embed, None)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def plain_entries():
  """The KV entries (name -> shape) of the plain model's cache after the same calls."""
  engine = Engine(create_model(small_config()), max_len=20)
  x = tokens(2, 11)
  cache = engine.extend(engine.prefill(x[:, :6]).cache, x[:, 6:10])[1]
  cache = engine.step(cache, x[:, 10])[1]
  assert not cache.states
  return {k: v.shape for k, v in cache.entries.items()}


@pytest.mark.parametrize("overrides", [
    {"phd.kind": "phd"},
    {"phd.kind": "phd", "phd.repeats": 3, "phd.positions": "flat"},
    {"phd.kind": "swa", "phd.window": 3},
    {"phd.kind": "swa", "phd.repeats": 3, "phd.window": 2, "phd.window_unit": "positions"},
    {"phd.kind": "cswa", "phd.window": 4, "phd.chunk": 3, "remat": "block"},
    {"phd.kind": "cswa", "phd.repeats": 3, "phd.window": 5, "phd.chunk": 4},
])
def test_cached_decoding_equals_the_full_forward(overrides, plain_entries):
  """Prefill (ragged), decode steps and a continuation over the cache give the full forward's
  logits; the persistent KV entries per layer are the plain model's, and swa / cswa keep
  B hidden tokens per layer besides."""
  model = create_model(small_config(**overrides))
  engine = Engine(model, max_len=20)
  x = tokens(2, 14, seed=3)
  full = np.asarray(_forward(model, jnp.asarray(x)))
  # ragged prompts of 7 and 10 tokens, then 3 decode steps per row
  lens = np.array([7, 10], np.int32)
  prompts, lengths = pad_prompts([x[0, :7], x[1, :10]], pad_id=VOCAB - 1)
  pre = engine.prefill(prompts, lengths)
  rows = np.arange(2)
  np.testing.assert_allclose(np.asarray(pre.logits), full[rows, lens - 1], atol=ATOL, rtol=0)
  cache = pre.cache
  for i in range(3):
    logits, cache, _ = engine.step(cache, x[rows, lens + i])
    np.testing.assert_allclose(np.asarray(logits), full[rows, lens + i], atol=ATOL, rtol=0)
  # a prefill of 6, a continuation of 4, a step
  pre = engine.prefill(x[:, :6])
  chunk, cache = engine.extend(pre.cache, x[:, 6:10])
  np.testing.assert_allclose(np.asarray(chunk), full[:, 6:10], atol=ATOL, rtol=0)
  logits, cache, _ = engine.step(cache, x[:, 10])
  np.testing.assert_allclose(np.asarray(logits), full[:, 10], atol=ATOL, rtol=0)

  assert {k: v.shape for k, v in cache.entries.items()} == plain_entries
  np.testing.assert_array_equal(np.asarray(cache.lengths), [11, 11])
  s = phd.settings(model.cfg)
  # swa: W hidden tokens, or W positions' K - 1; cswa: at most (C - 1)(K - 1), its chunk's
  assert s.buffer == {("phd", 2): 0, ("phd", 3): 0, ("swa", 2): 3, ("swa", 3): 2 * 2,
                      ("cswa", 2): min(4, 2 * 1), ("cswa", 3): min(5, 3 * 2)}[s.kind, s.repeats]
  assert sorted(cache.states) == sorted(
      f"layer{i}/hidden_{kv}" for i in range(2) for kv in "kv" if s.buffer)
  for state in cache.states.values():
    assert state.shape == (2, s.buffer, 2, 8)


def test_the_sliding_window_changes_what_hidden_tokens_see():
  """The decoding test above is not vacuous: the window and the chunks change the logits."""
  x = jnp.asarray(tokens(2, 12))
  outs = [np.asarray(_forward(create_model(small_config(**o), seed=4), x)) for o in (
      {"phd.kind": "phd"}, {"phd.kind": "swa", "phd.window": 3},
      {"phd.kind": "cswa", "phd.window": 3, "phd.chunk": 4})]
  assert np.abs(outs[0] - outs[1]).max() > 1e-4 and np.abs(outs[1] - outs[2]).max() > 1e-4
  # cswa's first chunk is swa's
  np.testing.assert_allclose(outs[1][:, :4], outs[2][:, :4], atol=1e-6, rtol=0)


def test_scanned_blocks_and_remat_compute_the_same():
  x = jnp.asarray(tokens(2, 8))
  base = dict(**{"phd.kind": "swa", "phd.window": 2, "phd.repeats": 3})
  unrolled = create_model(small_config(**base), seed=5)
  remat = create_model(small_config(**base, remat="block"), seed=5)
  np.testing.assert_allclose(np.asarray(_forward(remat, x)), np.asarray(_forward(unrolled, x)),
                             atol=1e-6, rtol=0)
  scanned = copy_parameters(unrolled,
                            create_model(small_config(**base, scan_blocks="on"), seed=5))
  np.testing.assert_allclose(np.asarray(_forward(scanned, x)), np.asarray(_forward(unrolled, x)),
                             atol=1e-5, rtol=0)


def test_flops_count_every_copy():
  t = 16
  plain = abstract_model(small_config())
  head = plain.head.flops_per_token(t)
  # naive repetition is a plain decoder over K t tokens, unembedded at one copy per token
  for k in (2, 3):
    naive = abstract_model(small_config(**{"phd.kind": "naive", "phd.repeats": k}))
    want = k * (plain.flops_per_token(k * t) - head) + head
    assert naive.flops_per_token(t) == pytest.approx(want, rel=1e-12)
  # phd: K x the projections and FFN, attention over the mask's keys
  hd = 32  # heads x head_dim
  core = lambda keys: 2 * 2 * hd * keys  # q k^T and p v over `keys` keys  # noqa: E731
  rest = plain.flops_per_token(t) - head - 2 * core((t + 1) / 2)  # per copy, 2 layers
  for overrides in ({"phd.kind": "phd", "phd.repeats": 3},
                    {"phd.kind": "cswa", "phd.window": 16, "phd.chunk": 8}):
    m = abstract_model(small_config(**overrides))
    keys = phd.keys_per_token(m.phd, t)
    assert m.flops_per_token(t) == pytest.approx(m.phd.repeats * rest + 2 * core(keys) + head,
                                                 rel=1e-12)
  # phd K = 2 at T = 16: originals 136 keys, hidden 120 + 32 -> 288 / 16 = 18 per token
  assert phd.keys_per_token(phd.Settings(kind="phd", repeats=2), 16) == 18.0
  # the trainer's overhead line names it
  c = small_config(**{"phd.kind": "phd"})
  (line,) = overheads(c, t)
  assert line["point"] == "phd" and line["baseline"] == "none" and line["params"] == 0
  assert line["flops_frac"] == pytest.approx(abstract_model(c).flops_per_token(t)
                                             / plain.flops_per_token(t) - 1)


def test_resolved_config_holds_the_selected_kinds_settings():
  c = run_config.default_config()
  assert run_config.resolve(c).model.phd.to_dict() == {"kind": "none"}
  c.model.phd.kind = "phd"
  assert set(run_config.resolve(c).model.phd) == {"kind", "repeats", "positions"}
  c.model.phd.kind = "cswa"
  assert set(run_config.resolve(c).model.phd) == {"kind", "repeats", "positions", "window",
                                                   "window_unit", "chunk"}


@pytest.mark.parametrize("overrides, match", [
    ({"phd.kind": "phdd"}, "model.phd.kind='phdd' is not one of"),
    ({"phd.kind": "phd", "phd.repeats": 0}, "model.phd.repeats=0 must be"),
    ({"phd.kind": "phd", "phd.positions": "copy"}, "model.phd.positions='copy'"),
    ({"phd.kind": "swa", "phd.window": 0}, "model.phd.window=0"),
    ({"phd.kind": "swa", "phd.window_unit": "chunks"}, "model.phd.window_unit='chunks'"),
    ({"phd.kind": "cswa", "phd.chunk": 0}, "model.phd.chunk=0"),
    ({"phd.kind": "phd", "attention.kind": "moda"}, "attention.kind=moda"),
    ({"phd.kind": "phd", "attention.kind": "retention"}, "attention.kind=retention"),
    ({"phd.kind": "phd", "attention.impl": "pallas"}, "attention.impl=pallas"),
    ({"phd.kind": "swa", "attention.prefill": "flexprefill"}, "attention.prefill=flexprefill"),
    ({"phd.kind": "phd", "head.kind": "mtp"}, "head.kind=mtp"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    small_config(**overrides)


def test_one_copy_runs_with_any_option():
  """repeats = 1 is no repetition, so the combination checks do not apply."""
  small_config(**{"phd.kind": "phd", "phd.repeats": 1, "attention.kind": "moda"})


def test_the_engine_refuses_naive_repetition():
  with pytest.raises(ConfigError, match="kind=naive has no KV-cache path"):
    Engine(create_model(small_config(**{"phd.kind": "naive"})), max_len=8)


def test_a_training_step_reduces_the_loss():
  """The trainer's loss over the final copies trains (one jitted step of SGD)."""
  model = create_model(small_config(**{"phd.kind": "cswa", "phd.chunk": 4}), seed=0)
  x = jnp.asarray(tokens(4, 16, seed=7))

  def loss(m):
    logits = m(x[:, :-1], ForwardContext(positions=lm_eval.positions_for(x[:, :-1])))
    return lm_eval.cross_entropy(logits, x[:, 1:]).mean()

  before, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), grads))
  assert float(nnx.jit(loss)(model)) < float(before)


def test_experiment_costs_are_flop_matched():
  """experiments/phd_transformer: the controls' training FLOPs match the repeated arms' (2x,
  3x), and the KV entries per layer at decode are the plain model's for phd, + B for swa."""
  from research import experiments  # pylint: disable=import-outside-toplevel
  load = experiments._load_module  # pylint: disable=protected-access
  analysis, arms = load("phd_transformer", "analysis.py"), load("phd_transformer", "sweep.py").ARMS
  arg = experiments.get_sweep("phd_transformer").arg
  cost = {n: analysis.costs(arg, arms[n]) for n in (
      "vanilla", "vanilla_2x_steps", "vanilla_2x_layers", "vanilla_3x_steps", "phd_k2", "phd_k3",
      "naive_k3", "swa_k2_w16", "cswa_k2_w16_c16")}
  ratio = {n: c["train_flops"] / cost["vanilla"]["train_flops"] for n, c in cost.items()}
  assert ratio["vanilla_2x_steps"] == 2 and ratio["vanilla_3x_steps"] == 3
  assert abs(ratio["phd_k2"] - 2) < 0.01 and abs(ratio["vanilla_2x_layers"] - 2) < 0.01
  assert abs(ratio["phd_k3"] - 3) < 0.02
  kv = {n: c["kv_entries"] for n, c in cost.items()}
  assert (kv["vanilla"], kv["phd_k3"], kv["naive_k3"], kv["swa_k2_w16"],
          kv["cswa_k2_w16_c16"]) == (128, 128, 384, 144, 143)
