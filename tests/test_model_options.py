"""Norm placements (HybridNorm family), activations (PolyCom) and linear layers (SDD) against
their papers' equations on small hand-checkable cases, and their composition."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research.eval import layer_cosine as layer_cosine_eval
from research.train.trainer import block_grad_norms
from research.model import ForwardContext, attention, create_model, ffn, linear, norms

from test_model import naive_attention, small_config, tokens


def rms(x, axis=-1, eps=1e-5):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=axis, keepdims=True) + eps)


def ctx_for(x):
  return ForwardContext(positions=jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))


# ------------------------------------------------------------------ norm placements

PLACEMENT_MODES = {  # kind: (attention mode, channel mode) of a block after the first
    "pre": ("pre", "pre"), "post": ("post", "post"), "pre_post": ("pre", "normskip"),
    "post_pre": ("normskip", "pre"), "hybrid_post": ("none", "normskip"),
    "hybrid_pre": ("none", "pre"), "hybridnorm": ("none", "normskip"),
    "hybridnorm_star": ("none", "normskip"),
}


def test_every_registered_placement_is_covered():
  assert set(norms.NORM_PLACEMENTS.names()) == set(PLACEMENT_MODES)


@pytest.mark.parametrize("mode", norms.MODES)
def test_placement_modes_match_their_formulas(mode):
  cls = type("One", (norms.Placement,), {"modes": classmethod(lambda c, l: (mode, mode))})
  cfg = small_config()
  p = cls(4, cfg=cfg, layer=0, sublayer="attn", dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.array([[[1.0, -2.0, 3.0, 0.5]]])
  f = lambda h: 2.0 * h + 1.0  # noqa: E731
  residual = lambda s, g: s + g(s)  # noqa: E731
  got = np.asarray(p(x, f, residual))
  xn = rms(x)
  expected = {"none": x + f(x), "pre": x + f(xn), "post": rms(x + f(x)),
              "normskip": xn + f(xn)}[mode]
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(PLACEMENT_MODES))
def test_placement_modes_per_block(kind):
  model = create_model(small_config(**{"norm.kind": kind}))
  first, second = model.blocks
  assert (second.attn_norm.mode, second.channel_norm.mode) == PLACEMENT_MODES[kind]
  if kind == "hybridnorm_star":  # eq. (7): block 0 is pre-norm in both sublayers
    assert (first.attn_norm.mode, first.channel_norm.mode) == ("pre", "pre")
  else:
    assert (first.attn_norm.mode, first.channel_norm.mode) == PLACEMENT_MODES[kind]
  assert (model.final_norm is None) == (kind == "post")


@pytest.mark.parametrize("kind,norms_in,expected", [
    ("hybridnorm", "", "qkv"), ("hybridnorm_star", "c", "qkvc"), ("hybrid_post", "kq", "qk"),
    ("pre", "", ""), ("pre", "cq", "qc")])
def test_placements_resolve_their_attention_norms(kind, norms_in, expected):
  cfg = small_config(**{"norm.kind": kind, "attention.norms": norms_in})
  assert cfg.attention.norms == expected
  model = create_model(cfg)
  a = model.blocks[0].attn
  assert [n is not None for n in (a.q_norm, a.k_norm, a.v_norm, a.c_norm)] == [
      x in expected for x in "qkvc"]


def test_unknown_attention_norm_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="unknown letters x"):
    small_config(**{"attention.norms": "qx"})


def test_hybridnorm_block_term_by_term():
  """HybridNorm eqs. (4)-(6): Y = X + W_O attn(N_q(Q), N_k(K), N_v(V)) with RoPE after the
  norms; X' = N(Y) + FFN(N(Y)). Checked against a hand assembly of the block's own weights."""
  cfg = small_config(**{"norm.kind": "hybridnorm", "num_kv_heads": 2})
  model = create_model(cfg, seed=1)
  block = model.blocks[1]
  a = block.attn
  for n in (a.q_norm, a.k_norm, a.v_norm, block.channel_norm.norm):  # non-trivial gains
    n.scale[...] = jax.random.uniform(jax.random.key(7), n.scale.shape, minval=0.5, maxval=1.5)
  x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
  got = np.asarray(block(x, ctx_for(x)))

  b, t, _ = x.shape
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  def head_norm(z, n):  # RMSNorm over head_dim, one gain shared by the heads
    return rms(z) * np.asarray(n.scale[...])
  q = head_norm(a.q(x).reshape(b, t, h, hd), a.q_norm)
  k = head_norm(a.k(x).reshape(b, t, kv, hd), a.k_norm)
  v = head_norm(a.v(x).reshape(b, t, kv, hd), a.v_norm)
  q = attention.rope(jnp.asarray(q, jnp.float32), pos, cfg.attention.rope_theta)
  k = attention.rope(jnp.asarray(k, jnp.float32), pos, cfg.attention.rope_theta)
  ctx = naive_attention(q, k, v).reshape(b, t, h * hd)
  y = np.asarray(x, np.float64) + np.asarray(a.o(jnp.asarray(ctx, jnp.float32)), np.float64)
  y_hat = rms(y) * np.asarray(block.channel_norm.norm.scale[...])
  expected = y_hat + np.asarray(block.channel(jnp.asarray(y_hat, jnp.float32), None))
  assert block.attn_norm.norm is None  # no norm on the attention input
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_attention_context_norm_is_over_the_concatenated_heads():
  cfg = small_config(**{"attention.norms": "c"})
  a = create_model(cfg).blocks[0].attn
  assert a.c_norm.scale.shape == (cfg.num_heads * cfg.head_dim,)


# ------------------------------------------------------------------ activations

def test_polyrelu_hand_values():
  """PolyReLU r=3 at the official init (a_i = 1/3, a_0 = 0): (u^3 + u^2 + u) / 3, u = relu(x)."""
  act = ffn.PolyReLU(small_config(**{"channel.activation": "polyrelu"}), dtype=jnp.float32)
  got = np.asarray(act(jnp.array([-1.0, 0.5, 2.0])))
  np.testing.assert_allclose(got, [0.0, (0.125 + 0.25 + 0.5) / 3, (8 + 4 + 2) / 3], rtol=1e-6)


def test_polynorm_reduces_to_its_terms():
  cfg = small_config(**{"channel.activation": "polynorm"})
  act = ffn.PolyNorm(cfg, dtype=jnp.float32)
  x = jnp.array([[1.0, -1.0, 2.0, -2.0]])
  def n(z):
    return rms(z, eps=1e-6)
  xs = np.asarray(x, np.float64)
  # official init: (N(x^3) + N(x^2) + N(x)) / 3
  np.testing.assert_allclose(np.asarray(act(x)), (n(xs ** 3) + n(xs ** 2) + n(xs)) / 3,
                             rtol=1e-5)
  # identity coefficients on the linear term: N(x); here x^2 = [1, 1, 4, 4] has rms sqrt(8.5)
  act.coeffs[...] = jnp.array([0.0, 0.0, 1.0])
  np.testing.assert_allclose(np.asarray(act(x)), n(xs), rtol=1e-5)
  act.coeffs[...] = jnp.array([0.0, 1.0, 0.0])
  act.bias[...] = jnp.array(0.25)
  np.testing.assert_allclose(np.asarray(act(x)),
                             np.array([[1, 1, 4, 4]]) / math.sqrt(8.5) + 0.25, rtol=1e-5)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_poly_order_sets_the_coefficients(order):
  act = ffn.PolyNorm(small_config(**{"channel.poly_order": order}), dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(act.coeffs[...]), np.full(order, 1 / order))


def test_plain_activations():
  x = jnp.array([-2.0, -0.5, 0.0, 1.5])
  np.testing.assert_allclose(np.asarray(ffn.ACTIVATIONS.get("relu2")(x)), [0, 0, 0, 2.25])
  g = np.asarray(ffn.ACTIVATIONS.get("gelu")(x))
  xs = np.asarray(x, np.float64)
  tanh_gelu = 0.5 * xs * (1 + np.tanh(math.sqrt(2 / math.pi) * (xs + 0.044715 * xs ** 3)))
  np.testing.assert_allclose(g, tanh_gelu, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("act", ["gelu", "relu", "relu2", "polyrelu", "polynorm"])
def test_plain_ffn_is_parameter_matched_to_swiglu(act):
  """A two-matrix FFN gets 1.5x SwiGLU's width, so the matrices match exactly (PolyCom)."""
  def ffn_params(activation):
    model = create_model(small_config(**{"channel.activation": activation}))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks[0].channel, nnx.Param)))
  extra = 4 if act.startswith("poly") else 0  # a_1..a_3 and a_0
  assert ffn_params(act) == ffn_params("swiglu") + extra


# ------------------------------------------------------------------ linear layers and init

def test_sdd_linear_formula():
  """SDD eq. (3): y = alpha * z / rms(z), z = x V, rms over the output features per token."""
  cfg = small_config(**{"linear.kind": "sdd"})
  lin = linear.make_linear(cfg, 8, 6, axes=("embed", "mlp"), role="in", layer=0,
                           dtype=jnp.float32, rngs=nnx.Rngs(0))
  lin.alpha[...] = jnp.arange(1.0, 7.0)
  x = 30.0 * jax.random.normal(jax.random.key(0), (3, 8))  # |z| >> eps
  z = np.asarray(x, np.float64) @ np.asarray(lin.proj.kernel[...], np.float64)
  y = np.asarray(lin(x))
  np.testing.assert_allclose(y, rms(z, eps=cfg.norm_eps) * np.arange(1.0, 7.0), rtol=1e-5)
  # the distribution is normalized: y / alpha has unit RMS per token
  np.testing.assert_allclose(np.sqrt(np.mean((y / np.arange(1.0, 7.0)) ** 2, -1)), 1.0, rtol=1e-4)


def test_init_rules():
  d, layers = 256, 8
  cfg = small_config(d_model=d, num_layers=layers, init_std=0.0)
  sigma = 1 / math.sqrt(2.5 * d)

  def std(cfg, role):
    lin = linear.make_linear(cfg, d, 4 * d, axes=("embed", "mlp"), role=role, layer=3,
                             dtype=jnp.float32, rngs=nnx.Rngs(0))
    kernel = lin.proj.kernel if hasattr(lin, "proj") else lin.kernel
    return float(jnp.std(kernel[...])), lin
  assert std(cfg, "in")[0] == pytest.approx(sigma, rel=0.02)
  assert std(cfg, "out")[0] == pytest.approx(sigma / math.sqrt(2 * layers), rel=0.02)
  assert std(small_config(d_model=d, num_layers=layers, init_std=0.0, init_out_scaling="none"),
             "out")[0] == pytest.approx(sigma, rel=0.02)
  assert std(small_config(d_model=d, num_layers=layers, init_std=0.0,
                          init_out_scaling="layer_depth"), "out")[0] == pytest.approx(
                              sigma / math.sqrt(2 * 4), rel=0.02)
  # SDD: the depth factor moves from the weights to the output gain alpha
  s, lin = std(small_config(d_model=d, num_layers=layers, init_std=0.0,
                            **{"linear.kind": "sdd"}), "out")
  assert s == pytest.approx(sigma, rel=0.02)
  np.testing.assert_allclose(np.asarray(lin.alpha[...]), 1 / math.sqrt(2 * layers), rtol=1e-6)


def test_sdd_with_bias_is_an_error():
  with pytest.raises(ValueError, match="sdd' has no bias"):
    create_model(small_config(**{"linear.kind": "sdd", "linear.use_bias": True}))


# ------------------------------------------------------------------ composition

ACTS = ["swiglu", "gelu", "relu2", "polyrelu", "polynorm"]


# the other families' options every placement / linear / activation must compose with
STACKS = {"dense": {}, "moda_hyper": {"attention.kind": "moda", "num_kv_heads": 2,
                                      "residual.kind": "hyper", "residual.streams": 2}}


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("i,kind", list(enumerate(PLACEMENT_MODES)))
def test_every_option_composes(i, kind, stack):
  """Every placement, with the linear layers and activations cycled over it, builds, is causal
  and finite, with dense attention and plain residuals and with MoDA and hyper-connections."""
  linear_kind, act = ("plain", "sdd")[i % 2], ACTS[i % len(ACTS)]
  cfg = small_config(**{"norm.kind": kind, "linear.kind": linear_kind,
                        "channel.activation": act, **STACKS[stack]})
  model = create_model(cfg)
  x = tokens()
  y = x.at[:, 9:].set((x[:, 9:] + 3) % cfg.vocab_size)
  fwd = nnx.jit(lambda m, t: m(t))
  a, b = np.asarray(fwd(model, x)), np.asarray(fwd(model, y))
  assert np.all(np.isfinite(a))
  np.testing.assert_array_equal(a[:, :9], b[:, :9])


# ------------------------------------------------------------------ diagnostics

def test_hidden_states_and_layer_cosine():
  cfg = small_config(num_layers=3)
  model = create_model(cfg, seed=2)
  x = tokens()
  hidden = model.hidden_states(x)
  assert len(hidden) == cfg.num_layers + 1
  logits = model.head(model.final_norm(hidden[-1]), model.embed, None)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
  cos = layer_cosine_eval.layer_cosine(model, x)
  h = [np.asarray(v, np.float64) for v in hidden]
  def mean_cos(a, b):
    return np.mean(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(cos, [mean_cos(h[i], h[i + 1]) for i in range(3)], rtol=1e-4)


def test_block_grad_norms_partition_the_global_norm():
  model = create_model(small_config(num_layers=3, **{"head.tie_embeddings": False}))
  x = tokens()
  grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  blocks = block_grad_norms(grads)
  assert list(blocks) == ["grad_norm/block_00", "grad_norm/block_01", "grad_norm/block_02"]
  rest = [grads["embed"], grads["head"], grads["final_norm"]]
  total = sum(float(v) ** 2 for v in blocks.values()) + sum(
      float(jnp.sum(jnp.square(g))) for r in rest for g in jax.tree.leaves(r))
  all_leaves = jax.tree.leaves(grads)
  assert total == pytest.approx(sum(float(jnp.sum(jnp.square(g))) for g in all_leaves), rel=1e-5)
