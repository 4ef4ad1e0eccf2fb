"""The hand-written backward passes and fused projections equal the plain formulations.

Each fast path in research/model is compared, in values and gradients, with the textbook
formula written here with autodiff, on small fp32 shapes: RMSNorm, SwiGLU, RoPE (arange,
arbitrary and trace-time numpy positions, whose sin/cos tables are constants), the shared-input
projections (q/k/v incl. GQA, gate/up), and a whole dense-attention layer with GQA and
non-arange or numpy positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import run_config
from research.model import attention as attention_lib
from research.model import ffn as ffn_lib
from research.model import linear as linear_lib
from research.model import norms as norms_lib
from research.model.context import ForwardContext, positions_for

jax.config.update("jax_numpy_rank_promotion", "raise")

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


def _value_and_grads(f, *args):
  """f's output and the gradients of <f(args), w> for a fixed random cotangent w."""
  out = f(*args)
  w = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=tuple(range(len(args))))(*args)
  return out, grads


def _rand(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_rms_norm_matches_plain():
  def plain(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g[None, None, :]

  x, g = _rand((3, 5, 16), 0), 1.0 + 0.1 * _rand((16,), 1)
  _close(_value_and_grads(lambda x, g: norms_lib.rms_norm(x, g, 1e-5), x, g),
         _value_and_grads(plain, x, g))


def test_swiglu_matches_plain():
  def plain(gate, up):
    return gate / (1.0 + jnp.exp(-gate)) * up

  gate, up = 3.0 * _rand((4, 7, 24), 2), _rand((4, 7, 24), 3)
  _close(_value_and_grads(ffn_lib.swiglu, gate, up), _value_and_grads(plain, gate, up))


def _plain_rope(x, positions, theta):
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs[None, None, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angles) - x2 * jnp.sin(angles),
                          x2 * jnp.cos(angles) + x1 * jnp.sin(angles)], axis=-1)


@pytest.mark.parametrize("arange", [True, False, "numpy", "numpy_rows"])
def test_rope_matches_plain(arange):
  b, t, h, d = 2, 6, 3, 8
  if arange is True:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  elif arange == "numpy":  # known when traced (positions_for): the tables are constants
    positions = positions_for(np.zeros((b, t), np.int32))
  elif arange == "numpy_rows":  # numpy, rows differing: tables per row
    positions = np.array([[5, 6, 7, 8, 9, 10], [0, 3, 1, 40, 2, 17]], np.int32)
  else:  # a decode-like batch: arbitrary, per-row offsets
    positions = jnp.array([[5, 6, 7, 8, 9, 10], [0, 3, 1, 40, 2, 17]], jnp.int32)
  x = _rand((b, t, h, d), 4)
  _close(_value_and_grads(lambda x: attention_lib.rope(x, positions, 100.0), x),
         _value_and_grads(lambda x: _plain_rope(x, jnp.asarray(positions), 100.0), x))


def _model_cfg(**overrides):
  c = run_config.resolve(run_config.default_config())
  m = c.model
  m.vocab_size, m.d_model, m.num_heads, m.head_dim, m.num_layers = 11, 32, 4, 8, 2
  m.num_kv_heads = overrides.pop("num_kv_heads", 4)
  m.channel.d_ff = 48
  for k, v in overrides.items():
    setattr(m.attention, k, v)
  return m


def _plain_attention_layer(layer, x, positions):
  """DenseAttention written out: separate projections, plain RoPE, masked softmax."""
  b, t, _ = x.shape
  h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
  q = (x @ layer.q.kernel[...]).reshape(b, t, h, d)
  k = (x @ layer.k.kernel[...]).reshape(b, t, kv, d)
  v = (x @ layer.v.kernel[...]).reshape(b, t, kv, d)
  q, k = _plain_rope(q, positions, layer.theta), _plain_rope(k, positions, layer.theta)
  k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
  mask = positions[:, None, None, :] <= positions[:, None, :, None]
  p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
  out = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * d)
  return out @ layer.o.kernel[...]


@pytest.mark.parametrize("num_kv_heads,arange", [(4, True), (2, False), (1, True), (2, "numpy")])
def test_dense_attention_layer_matches_plain(num_kv_heads, arange):
  cfg = _model_cfg(num_kv_heads=num_kv_heads)
  layer = attention_lib.DenseAttention(cfg, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  b, t = 2, 7
  if arange == "numpy":  # training's positions_for: constant RoPE tables, traced mask
    positions = positions_for(np.zeros((b, t), np.int32))
  elif arange:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  else:
    positions = jnp.array([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 10, 11, 12, 13]], jnp.int32)
  x = _rand((b, t, 32), 6)
  graphdef, params = nnx.split(layer)

  def fast(x, params):
    return nnx.merge(graphdef, params)(x, ForwardContext(positions=positions))

  def plain(x, params):
    return _plain_attention_layer(nnx.merge(graphdef, params), x, jnp.asarray(positions))

  _close(_value_and_grads(fast, x, params), _value_and_grads(plain, x, params))


def test_swiglu_ffn_matches_plain():
  cfg = _model_cfg()
  layer = ffn_lib.FeedForward(cfg, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  x = _rand((2, 5, 32), 8)

  def fast(x, params):
    return nnx.merge(graphdef, params)(x, None)

  def plain(x, params):
    m = nnx.merge(graphdef, params)
    return (jax.nn.silu(x @ m.gate.kernel[...]) * (x @ m.up.kernel[...])) @ m.down.kernel[...]

  _close(_value_and_grads(fast, x, params), _value_and_grads(plain, x, params))
