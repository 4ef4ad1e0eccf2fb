"""The linear-recurrence core (research/model/recurrence.py), the recurrent sequence mixers on
it (research/model/recurrent.py: retention, gla, deltaproduct, mlgru), BitLinear, their
constant-memory decoding and the length-extrapolation evaluator.

Tolerances: fp32 on CPU; the forms differ only in summation order (measured <= 6e-6 on these
shapes), so values are compared at 5e-5 absolute and gradients at 1e-4 relative. References
compute at HIGHEST precision (the core's einsums do), so the same bounds hold on GPUs, where
fp32 matmuls otherwise run in TF32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import run_config
from research.errors import ConfigError
from research.eval import extrapolation
from research.infer.engine import Engine
from research.model import linear, recurrence as core, recurrent
from research.model.lm import DecoderLM

ATOL, GRAD_RTOL = 5e-5, 1e-4


def _inputs(t=37, b=2, h=3, dk=5, dv=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk))
  v = jax.random.normal(ks[2], (b, t, h, dv))
  s0 = jax.random.normal(ks[3], (b, h, dk, dv))
  return q, k, v, s0


@pytest.mark.parametrize("vector,t,chunk", [(False, 37, 8), (True, 37, 8), (False, 16, 16),
                                            (True, 5, 8)])
def test_diagonal_forms_agree_values_and_gradients(vector, t, chunk):
  q, k, v, s0 = _inputs(t)
  shape = q.shape if vector else q.shape[:3]
  log_a = 0.5 * jax.nn.log_sigmoid(jax.random.normal(jax.random.key(9), shape))
  ref_o, ref_s = jax.jit(core.diagonal_recurrent)(q, k, v, log_a, s0)
  for fn in (lambda *a: core.diagonal_chunkwise(*a[:4], chunk=chunk, initial_state=a[4]),
             core.diagonal_parallel, core.diagonal_scan):
    o, s = jax.jit(fn)(q, k, v, log_a, s0)
    np.testing.assert_allclose(o, ref_o, atol=ATOL)
    np.testing.assert_allclose(s, ref_s, atol=ATOL)

  def loss(fn, q, k, v, log_a):
    o, s = fn(q, k, v, log_a, s0)
    return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2) * 1e-2

  grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3)))
  ref = grad(core.diagonal_recurrent)(q, k, v, log_a)
  got = grad(lambda *a: core.diagonal_chunkwise(*a[:4], chunk=chunk, initial_state=a[4]))(
      q, k, v, log_a)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=GRAD_RTOL, atol=GRAD_RTOL)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_chunkwise_equals_recurrent_values_and_gradients(gated):
  q, k, v, s0 = _inputs(29)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = 2 * jax.nn.sigmoid(jax.random.normal(jax.random.key(3), q.shape[:3]))
  log_g = (jax.nn.log_sigmoid(jax.random.normal(jax.random.key(4), q.shape[:3]) + 2)
           if gated else None)
  o1, s1 = jax.jit(core.delta_recurrent)(q, k, v, beta, log_g, s0)
  o2, s2 = jax.jit(lambda *a: core.delta_chunkwise(*a, chunk=8, initial_state=s0))(
      q, k, v, beta, log_g)
  np.testing.assert_allclose(o2, o1, atol=ATOL)
  np.testing.assert_allclose(s2, s1, atol=ATOL)

  def loss(chunked, q, k, v, beta):
    if chunked:
      o, _ = core.delta_chunkwise(q, k, v, beta, log_g, chunk=8, initial_state=s0)
    else:
      o, _ = core.delta_recurrent(q, k, v, beta, log_g, s0)
    return jnp.sum(jnp.sin(o))

  g1 = jax.jit(jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2, 3)))(q, k, v, beta)
  g2 = jax.jit(jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2, 3)))(q, k, v, beta)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_householder_product_definition_equals_interleaved_chunkwise():
  q, _, _, s0 = _inputs(11)
  b, t, h, dk = q.shape
  nh = 3
  ks = jax.random.split(jax.random.key(5), 4)
  k = jax.random.normal(ks[0], (b, t, nh, h, dk))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[1], (b, t, nh, h, 4))
  beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[2], (b, t, nh, h)))
  log_g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 2)
  o1, s1 = jax.jit(core.householder_recurrent)(q, k, v, beta, log_g, s0)
  long = core.interleave_householder(q, k, v, beta, log_g)
  o2, s2 = jax.jit(lambda *a: core.delta_chunkwise(*a, chunk=8, initial_state=s0))(*long)
  np.testing.assert_allclose(core.every_last(o2, nh), o1, atol=ATOL)
  np.testing.assert_allclose(s2, s1, atol=ATOL)
  # n_h = 1 is DeltaNet
  o3, _ = jax.jit(core.householder_recurrent)(q, k[:, :, :1], v[:, :, :1], beta[:, :, :1],
                                              log_g, s0)
  o4, _ = jax.jit(core.delta_recurrent)(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], log_g, s0)
  np.testing.assert_allclose(o3, o4, atol=1e-6)


def test_retention_decay_by_hand():
  """One head, d_k = d_v = 1, q = k = v = 1: o_n = sum_{m<=n} gamma^(n-m) (eq. 5)."""
  gamma, t = 0.9, 6
  ones = jnp.ones((1, t, 1, 1))
  log_a = jnp.full((1, t, 1), math.log(gamma))
  for fn in (core.diagonal_recurrent, core.diagonal_parallel, core.diagonal_scan,
             lambda *a: core.diagonal_chunkwise(*a[:4], chunk=4)):
    o, s = fn(ones, ones, ones, log_a, None)
    expected = [(1 - gamma ** (n + 1)) / (1 - gamma) for n in range(t)]
    np.testing.assert_allclose(o[0, :, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(s[0, 0, 0, 0], expected[-1], rtol=1e-6)


def test_delta_rule_reflection_swaps_two_rows():
  """beta = 2 and k = (e0 - e1)/sqrt(2), v = 0 after a zero write: I - 2 k^T k swaps rows 0 and
  1 of the state (a transposition is a Householder reflection; DeltaProduct sec. 3.5)."""
  s0 = jnp.arange(12, dtype=jnp.float32).reshape(1, 1, 3, 4)
  k = jnp.array([1.0, -1.0, 0.0]).reshape(1, 1, 1, 3) / math.sqrt(2)
  v = jnp.einsum("bthd,bhde->bthe", k, s0)  # v = k S: the delta rule writes nothing new ...
  _, s = core.delta_recurrent(jnp.zeros_like(k), k, 0.0 * v, jnp.full((1, 1, 1), 2.0), None, s0)
  np.testing.assert_allclose(s[0, 0], np.asarray(s0[0, 0])[[1, 0, 2]], atol=1e-6)
  _, s = core.delta_recurrent(jnp.zeros_like(k), k, v, jnp.full((1, 1, 1), 2.0), None, s0)
  np.testing.assert_allclose(s, s0, atol=1e-6)  # ... and with v = k S it keeps S


def _model_cfg(kind, form="chunkwise", **settings):
  c = run_config.default_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.vocab_size = 2, 32, 2, 50
  m.attention.kind = kind
  if kind != "dense":
    m.attention.form, m.attention.chunk = form, 4
  for key, value in settings.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return run_config.resolve(c).model


MIXERS = [("retention", ("recurrent", "chunkwise", "parallel"), {}),
          ("retention", ("recurrent", "chunkwise", "parallel"),
           {"model.attention.retention.head_norm": False}),
          ("gla", ("recurrent", "chunkwise", "parallel", "scan"), {}),
          ("gla", ("recurrent", "chunkwise"), {"model.attention.gla.gate": "scalar"}),
          ("deltaproduct", ("recurrent", "chunkwise"), {}),
          ("deltaproduct", ("recurrent", "chunkwise"), {"model.attention.deltaproduct.gate": True}),
          ("mlgru", ("recurrent", "chunkwise", "parallel", "scan"), {})]
IDS = ["retention", "retention-nonorm", "gla", "gla-scalar", "deltaproduct", "gated-dp", "mlgru"]


@pytest.mark.parametrize("kind,forms,settings", MIXERS, ids=IDS)
def test_mixer_forms_give_the_same_model(kind, forms, settings):
  tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 50)

  @nnx.jit
  def loss_and_grad(model):
    return nnx.value_and_grad(lambda m: jnp.mean(jnp.sin(m(tokens))))(model)

  results = []
  for form in forms:
    model = DecoderLM(_model_cfg(kind, form, **settings), rngs=nnx.Rngs(0))
    value, grad = loss_and_grad(model)
    results.append((float(value), jax.tree.leaves(grad)))
  for value, grad in results[1:]:
    assert value == pytest.approx(results[0][0], abs=1e-6)
    for a, b in zip(grad, results[0][1]):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind,forms,settings", MIXERS[::2] + [MIXERS[5]],
                         ids=IDS[::2] + [IDS[5]])
def test_incremental_decoding_equals_the_full_forward(kind, forms, settings):
  """A ragged prefill (rows of 13, 9, 5 tokens, right-padded) then two decode steps equal the
  full forward of each row (causal: the logits at a row's position p are those of its prefix
  of p + 1 tokens); the cache holds only per-row states (no per-token entries), whose size
  does not grow with the tokens decoded."""
  del forms
  model = DecoderLM(_model_cfg(kind, **settings), rngs=nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 15), 0, 50))
  lengths = np.array([13, 9, 5], np.int32)
  steps = [np.array([3, 4, 5], np.int32), np.array([10, 11, 12], np.int32)]
  final = tokens.copy()
  for i, n in enumerate(lengths):
    final[i, n], final[i, n + 1] = steps[0][i], steps[1][i]
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(final)))
  rows = np.arange(3)
  engine = Engine(model, max_len=24)
  pre = engine.prefill(tokens[:, :13], lengths)
  assert not pre.cache.entries and pre.cache.states
  size = pre.cache.state_bytes()
  np.testing.assert_allclose(np.asarray(pre.logits), full[rows, lengths - 1], atol=ATOL)
  cache = pre.cache
  for j, nxt in enumerate(steps):
    logits, cache, _ = engine.step(cache, jnp.asarray(nxt))
    np.testing.assert_allclose(np.asarray(logits), full[rows, lengths + j], atol=ATOL)
  assert cache.state_bytes() == size


def test_continuation_over_a_carried_state():
  model = DecoderLM(_model_cfg("gla"), rngs=nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 19), 0, 50))
  engine = Engine(model, max_len=32)
  pre = engine.prefill(tokens[:, :7])
  logits, _ = engine.extend(pre.cache, tokens[:, 7:])
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
  np.testing.assert_allclose(np.asarray(logits), full[:, 7:], atol=ATOL)


@pytest.mark.parametrize("kind", ["retention", "gla", "deltaproduct", "mlgru"])
def test_mixers_compose_with_hyper_connections_and_moe(kind):
  tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 50)
  for settings in ({"model.residual.kind": "hyper"}, {"model.channel.kind": "moe"}):
    model = DecoderLM(_model_cfg(kind, **settings), rngs=nnx.Rngs(0))
    assert np.isfinite(np.asarray(nnx.jit(lambda m: m(tokens))(model))).all()


def test_gla_gate_is_sigmoid_to_the_one_over_tau():
  cfg = _model_cfg("gla")
  mixer = recurrent.GatedLinearAttention(cfg, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (1, 3, 32))
  z = mixer.gate_up(mixer.gate_down(x)) + mixer.gate_bias[...].reshape(1, 1, -1)
  log_alpha = mixer._log_alpha(x, 1, 3)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.exp(log_alpha).reshape(1, 3, -1),
                             np.asarray(jax.nn.sigmoid(z)) ** (1 / 16), rtol=1e-5)
  assert recurrent.log_spaced_gammas(4)[0] == pytest.approx(1 - 1 / 32)
  assert recurrent.log_spaced_gammas(4)[-1] == pytest.approx(1 - 1 / 512)
  assert recurrent.eq8_gammas(2).tolist() == [1 - 2 ** -5, 1 - 2 ** -6]


def test_mlgru_gates_and_lower_bounds_by_hand():
  """h_t = f h_{t-1} + (1 - f) c with f = lb + (1 - lb) sigmoid(x W_f): at init (P = 0, two
  layers) lb = (0, 1/2); layer 1's forget gate is 1/2 + sigmoid / 2."""
  cfg = _model_cfg("mlgru", **{"model.attention.mlgru.output": "paper"})
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (1, 4, 32))
  from research.model.context import ForwardContext  # pylint: disable=import-outside-toplevel
  ctx = ForwardContext(positions=jnp.arange(4)[None])
  model.blocks[0].attn(x, ctx)  # block 0 writes the bounds
  lb = np.asarray(ctx.read(recurrent.LOWER_BOUNDS))
  np.testing.assert_allclose(lb, [[0.0] * 32, [0.5] * 32], atol=1e-7)
  m1 = model.blocks[1].attn
  out = m1(x, ctx)
  f = 0.5 + 0.5 * jax.nn.sigmoid(m1.f(x))
  c = jax.nn.silu(m1.c(x))
  h, hs = jnp.zeros((1, 32)), []
  for t in range(4):
    h = f[:, t] * h + (1 - f[:, t]) * c[:, t]
    hs.append(h)
  expected = m1.o(jax.nn.sigmoid(m1.g(x)) * jnp.stack(hs, axis=1))
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bitlinear_quantizes_weights_and_activations_with_straight_through_gradients():
  w = jnp.array([[0.3, -0.05], [-0.9, 0.2]])
  gamma = float(np.mean(np.abs(w)))  # 0.3625
  np.testing.assert_allclose(linear.ternarize(w), np.array([[1, 0], [-1, 1]]) * gamma, rtol=1e-6)
  x = jnp.array([[1.0, -0.5, 0.25, 2.0]])
  q = linear.quantize_activations(x, 8)
  np.testing.assert_allclose(q, np.round(np.asarray(x) * 127 / 2) / (127 / 2), rtol=1e-6)
  assert len(np.unique(np.asarray(linear.quantize_activations(x, 2)))) <= 4
  cfg = _model_cfg("dense", **{"model.linear.kind": "bitlinear"})
  layer = linear.BitLinear(4, 3, axes=("embed", "mlp"), std=0.5, use_bias=False,
                           dtype=jnp.float32, rngs=nnx.Rngs(0), cfg=cfg)
  kernel = np.asarray(layer.proj.kernel[...])
  y = np.asarray(layer(jnp.ones((1, 4))))
  xn = np.ones((1, 4))  # RMSNorm of a constant row is itself; 8-bit of ones is exact
  np.testing.assert_allclose(y, xn @ np.asarray(linear.ternarize(jnp.asarray(kernel))), rtol=1e-5)
  # straight-through: the kernel's gradient is that of x W_q with respect to W (x^T dy)
  grad = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 4)))))(layer)
  np.testing.assert_allclose(grad.proj.kernel[...], np.full((4, 3), 2.0), rtol=1e-6)


def test_bad_recurrent_settings_are_config_errors():
  with pytest.raises(ConfigError, match="form='parallel' is not available for deltaproduct"):
    DecoderLM(_model_cfg("deltaproduct", "parallel"), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="gla.gate='diag'"):
    DecoderLM(_model_cfg("gla", **{"model.attention.gla.gate": "diag"}), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="retention.decay='linear'"):
    DecoderLM(_model_cfg("retention", **{"model.attention.retention.decay": "linear"}),
              rngs=nnx.Rngs(0))


def test_length_extrapolation_windows_and_losses():
  valid = np.arange(1000, dtype=np.int32) % 50
  w = extrapolation.windows(valid, 64, count=5)
  assert w.shape == (5, 65) and w[0, 0] == 0 and w[-1, -1] == valid[-1]
  with pytest.raises(ValueError, match="shorter than one extrapolation window"):
    extrapolation.windows(valid[:10], 64)
  model = DecoderLM(_model_cfg("retention"), rngs=nnx.Rngs(0))
  out = extrapolation.length_extrapolation(model, valid, 16, multiples=(1, 2), count=3)
  assert set(out) == {"16", "32"}
  assert out["16"]["loss"] == pytest.approx(out["16"]["tail"])
  assert all(np.isfinite(v["loss"]) and np.isfinite(v["tail"]) for v in out.values())


def test_mixer_table_rows_from_results(tmp_path):
  from research import mixer_table  # pylint: disable=import-outside-toplevel
  decode = tmp_path / "decode.json"
  decode.write_text('{"device": "cpu", "jax": "x", "date": "d", "kinds": {"retention": '
                    '{"4096": {"ms": 1.5, "cache_bytes": 2048}}}}')
  ext = {n: {"loss": 1.0, "tail": float(n) / 1000} for n in ("64", "128", "256", "512")}
  groups = [{"group": "table6", "arg": "scale=tiny,corpus=tinyshakespeare", "arms": [
      {"arm": "no_gate", "valid_loss": {"mean": 1.8, "std": 0.01, "values": [1.79, 1.81]},
       "extrapolation": ext, "overrides": {"model.attention.retention.gate": False},
       "step_time_s": 0.3},
      {"arm": "retnet", "valid_loss": {"mean": 1.7, "std": 0.01, "values": [1.69, 1.71]},
       "extrapolation": ext, "overrides": {}, "step_time_s": 0.3},
      {"arm": "unfinished", "valid_loss": {}, "overrides": {}}]}]
  md = mixer_table.markdown("retnet", groups, results_root=tmp_path, decode_json=decode)
  lines = [x for x in md.splitlines() if x.startswith("| tinyshakespeare")]
  assert [x.split(" | ")[2] for x in lines] == ["retnet", "no_gate"]  # sorted by loss
  assert "retention (log_spaced, no gate)" in lines[1]
  assert "| 0.128 | 0.256 | 0.512 |" in lines[0] and "| 1.50 | 2 |" in lines[0]


@pytest.mark.parametrize("kind,linear_kind", [("gla", "plain"), ("deltaproduct", "plain"),
                                              ("mlgru", "bitlinear")])
def test_recurrent_mixers_sharded_equal_unsharded(kind, linear_kind):
  """Forward, loss and one training step on the 8-device fsdp x tensor mesh equal one device
  (the convolution's channels and the heads split over `tensor`; BitLinear's per-tensor scale
  is a mean over the whole sharded kernel)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  from research import sharding  # pylint: disable=import-outside-toplevel
  from equivalence import assert_same_logits, assert_same_step  # pylint: disable=import-outside-toplevel
  from test_sharding import make_config, one_step  # pylint: disable=import-outside-toplevel
  c = run_config.expand(make_config().to_dict())  # the sharding tests' setting, every option
  c.model.attention.kind, c.model.linear.kind = kind, linear_kind
  c.model.attention.chunk = 4
  c = run_config.resolve(c)
  one = sharding.make_mesh("dp", devices=jax.devices()[:1])
  ref_logits, ref_params, ref_loss, _ = one_step(c, one)
  logits, params, loss, _ = one_step(c, sharding.make_mesh("fsdp_tp", tensor=2))
  # BitLinear rounds its inputs: an ulp of the mesh's sum order can flip one token's code
  # (tests/equivalence.py); a per-shard scale would move every token and most parameters
  quantized = linear_kind == "bitlinear"
  assert_same_logits(logits, ref_logits, flipped_tokens=2 if quantized else 0)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_same_step(params, ref_params, lr=c.train.lr, outliers=1e-3 if quantized else 1e-4)


@pytest.mark.parametrize("kind", ["retention", "gla", "deltaproduct", "mlgru"])
def test_bf16_compute_stays_near_fp32(kind):
  """The projections run in bf16 (the accelerators' compute dtype) while the recurrence, its
  state and the norms stay fp32: logits within bf16's rounding of the fp32 model's."""
  cfg = _model_cfg(kind)
  tokens = jax.random.randint(jax.random.key(7), (2, 11), 0, 50)
  f32 = DecoderLM(cfg, rngs=nnx.Rngs(0))
  b16 = DecoderLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  run = nnx.jit(lambda m: m(tokens))
  want, got = np.asarray(run(f32)), np.asarray(run(b16), np.float32)
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 0.05
