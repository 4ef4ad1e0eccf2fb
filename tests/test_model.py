"""The decoder: causality, the equations of its parts, counts, remat, dropout, registries."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import run_config
from research.model import ForwardContext, attention, create_model, model_summary
from research.model.norms import RMSNorm
from research.model.registry import Registry


def small_config(**model_overrides):
  c = run_config.default_config()
  c.model.vocab_size = 61
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.data.seq_len = 16
  for k, v in model_overrides.items():
    config_lib.apply_overrides(c, {f"model.{k}": v})
  return run_config.resolve(c).model


forward = nnx.jit(lambda model, x: model(x))


def tokens(batch=2, seq=16, vocab=61, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


@pytest.mark.parametrize("kv_heads,qk_norm,tied", [(4, False, True), (2, True, False), (1, False, True)])
def test_causality(kv_heads, qk_norm, tied):
  """Logits at position t do not change when tokens after t change."""
  cfg = small_config(num_kv_heads=kv_heads, **{"attention.norms": "qk" if qk_norm else "",
                                               "head.tie_embeddings": tied})
  model = create_model(cfg)
  x = tokens()
  t = 7
  y = x.at[:, t + 1:].set((x[:, t + 1:] + 5) % cfg.vocab_size)
  a, b = forward(model, x), forward(model, y)
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(np.asarray(a[:, t + 1:]), np.asarray(b[:, t + 1:]))


def test_rmsnorm_matches_formula():
  x = jnp.array([[3.0, -4.0, 0.0, 12.0]])
  norm = RMSNorm(4, eps=0.0, dtype=jnp.float32)
  norm.scale[...] = jnp.array([1.0, 2.0, 0.5, 1.0])
  rms = math.sqrt((9 + 16 + 0 + 144) / 4)  # = 6.5
  expected = np.array([[3 / rms, -8 / rms, 0.0, 12 / rms]])
  np.testing.assert_allclose(np.asarray(norm(x)), expected, rtol=1e-6)


def test_rope_is_relative_and_identity_at_zero():
  """RoPE: q_m . k_n depends only on m - n (RoFormer eq. 16); position 0 is the identity."""
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, 8))
  def dot(m, n):
    qm = attention.rope(q, jnp.array([[m]]), 10000.0)
    kn = attention.rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(qm * kn))
  assert dot(5, 3) == pytest.approx(dot(12, 10), rel=1e-5)
  assert dot(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-6)
  np.testing.assert_allclose(np.asarray(attention.rope(q, jnp.array([[0]]), 10000.0)),
                             np.asarray(q), rtol=1e-6)
  # a hand-checked rotation: head_dim 2 at position 1 rotates (1, 0) by 1 radian
  x = jnp.array([[[[1.0, 0.0]]]])
  np.testing.assert_allclose(np.asarray(attention.rope(x, jnp.array([[1]]), 10000.0))[0, 0, 0],
                             [math.cos(1.0), math.sin(1.0)], rtol=1e-6)


def naive_attention(q, k, v):
  """Per-head loop with explicit GQA head mapping and a causal mask: the definition."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  for bi in range(b):
    for hi in range(h):
      kv = hi // g
      s = q[bi, :, hi] @ k[bi, :, kv].T / math.sqrt(d)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, kv]
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (3, 1)])
def test_attention_matches_definition(heads, kv_heads):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 9, heads, 8))
  k = jax.random.normal(ks[1], (2, 9, kv_heads, 8))
  v = jax.random.normal(ks[2], (2, 9, kv_heads, 8))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  out = jax.jit(attention.attention)(q, k, v, q_positions=pos, k_positions=pos)
  np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_counts_match_hand_formula():
  cfg = small_config(num_kv_heads=2, **{"head.tie_embeddings": False})
  model = create_model(cfg)
  v, d, h, kv, hd, f, n = 61, 32, 4, 2, 8, cfg.channel.d_ff, 2
  per_block = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
  expected = v * d * 2 + n * per_block + d
  seq = 16
  fwd = n * (2 * (d * h * hd * 2 + d * kv * hd * 2) + 2 * 2 * h * hd * (seq + 1) / 2
             + 2 * 3 * d * f) + 2 * d * v
  s = model_summary(model, seq)
  assert s["params"] == expected
  assert s["flops_per_token_fwd"] == pytest.approx(fwd)
  assert s["flops_per_token_train"] == pytest.approx(3 * fwd)
  assert f == 96  # 8/3 * 32 = 85.3, rounded up to a multiple of 32


def test_remat_equals_no_remat():
  x = tokens()
  grads = {}
  for remat in ("none", "block"):
    cfg = small_config(remat=remat)
    model = create_model(cfg, seed=3)
    def loss(m):
      return jnp.mean(m(x) ** 2)
    grads[remat] = nnx.jit(nnx.grad(loss))(model)
  for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["block"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_dropout_is_keyed_and_off_by_default():
  cfg = small_config(dropout=0.5)
  model = create_model(cfg)
  x = tokens()
  pos = jnp.broadcast_to(jnp.arange(16), x.shape)
  det = forward(model, x)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(forward(model, x)))

  @nnx.jit
  def noisy(model, key):
    return model(x, ForwardContext(positions=pos, deterministic=False, dropout_key=key))
  a, b, c = (noisy(model, jax.random.key(i)) for i in (1, 1, 2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert not np.allclose(np.asarray(a), np.asarray(det))


def test_every_parameter_has_logical_axes():
  model = create_model(small_config(**{"head.tie_embeddings": False, "attention.norms": "qk"}))
  for path, var in jax.tree.leaves_with_path(nnx.state(model, nnx.Param),
                                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, jax.tree_util.keystr(path)


def test_unknown_option_names_the_registered_ones():
  with pytest.raises(config_lib.ConfigError, match=r"unknown model.attention.kind 'dense2'.*did you mean dense"):
    create_model(small_config(**{"attention.kind": "dense2"}))
  reg = Registry("model.x.kind")
  reg.register("a")(object)
  with pytest.raises(ValueError, match="registered twice"):
    reg.register("a")(object)


def test_unavailable_attention_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="model.attention.impl='flash' is not available"):
    create_model(small_config(**{"attention.impl": "flash"}))
