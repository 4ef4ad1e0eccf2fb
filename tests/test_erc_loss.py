"""The ERC loss (research/model/moe.py) against the paper's equations on hand-checkable cases,
its proxies' noise bound, and its place in the MoE layer's objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import run_config
from research.model import ForwardContext, create_model, moe


def test_erc_loss_on_a_hand_checked_case():
  """E = 2, d = 2, D = 1, R = I. Expert 0's gate reads feature 0, expert 1's reads 2 x feature
  0: M = [[1, 2], [0, 0]]. At alpha = 1 the sum over i, j != i of relu(M[i,j] - M[i,i]) +
  relu(M[j,i] - M[i,i]) is (relu(2 - 1) + relu(0 - 1)) + (relu(0 - 0) + relu(2 - 0)) = 3,
  over E^2 = 4 entries."""
  rows = jnp.eye(2)
  gate = jnp.array([[[1.0], [0.0]], [[2.0], [0.0]]])  # [E, d, D]
  assert float(moe.erc_loss(rows, gate, 1.0)) == pytest.approx(0.75)
  # alpha scales only the diagonal: at alpha = 0 every off-diagonal M entry counts twice over
  # its two constraints, (2 + 0) + (0 + 2) = 4
  assert float(moe.erc_loss(rows, gate, 0.0)) == pytest.approx(1.0)
  # experts that each read their own row: nothing to penalise
  assert float(moe.erc_loss(rows, jnp.eye(2)[:, :, None], 1.0)) == 0.0


def test_erc_loss_matches_a_loop_over_the_equation():
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(5, 6))
  gate = rng.normal(size=(5, 6, 3))
  m = np.array([[np.linalg.norm(rows[i] @ gate[j]) for j in range(5)] for i in range(5)])
  alpha = 0.75
  total = sum(max(m[i, j] - alpha * m[i, i], 0) + max(m[j, i] - alpha * m[i, i], 0)
              for i in range(5) for j in range(5) if j != i)
  got = moe.erc_loss(jnp.asarray(rows, jnp.float32), jnp.asarray(gate, jnp.float32), alpha)
  np.testing.assert_allclose(float(got), total / 25, rtol=1e-5)


def test_proxies_stay_nearest_their_own_row_and_carry_no_noise_gradient():
  """eps_i = min_j |R_i - R_j| / (2 |R_i|): every element of R~_i / R_i lies in [1 - eps_i,
  1 + eps_i], so R~_i stays nearer R_i than any other row (App. B); d R~ / d R = delta."""
  rows = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
  r = np.asarray(rows, np.float64)
  dist = np.linalg.norm(r[:, None] - r[None], axis=-1) + np.diag([np.inf] * 8)
  for seed in range(20):
    proxies, eps = moe.erc_proxies(rows, jax.random.key(seed))
    np.testing.assert_allclose(np.asarray(eps), dist.min(1) / (2 * np.linalg.norm(r, axis=1)),
                               rtol=1e-5)
    ratio = np.asarray(proxies) / r
    assert np.all(np.abs(ratio - 1) <= np.asarray(eps)[:, None] + 1e-6)
    to_rows = np.linalg.norm(np.asarray(proxies, np.float64)[:, None] - r[None], axis=-1)
    assert np.all(np.argmin(to_rows, axis=1) == np.arange(8))
  grad = jax.grad(lambda x: jnp.sum(moe.erc_proxies(x, jax.random.key(3))[0]))(rows)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(proxies_ratio(rows, 3)), rtol=1e-6)


def proxies_ratio(rows, seed):
  proxies, _ = moe.erc_proxies(rows, jax.random.key(seed))
  return proxies / rows


def _model(**moe_settings):
  c = run_config.default_config()
  c.model.vocab_size, c.model.num_layers, c.model.d_model, c.model.num_heads = 40, 2, 32, 2
  c.model.channel.kind = "moe"
  for k, v in {"num_experts": 4, "top_k": 2, "aux_coef": 0.0, **moe_settings}.items():
    c.model.channel.moe[k] = v
  return create_model(run_config.resolve(c).model, seed=0)


def _forward(model, key=None):
  x = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 40
  ctx = ForwardContext(positions=jnp.broadcast_to(jnp.arange(16), (2, 16)), dropout_key=key)
  model(x, ctx)
  return ctx


def test_the_layer_adds_erc_on_training_forwards_only():
  model = _model(erc_coef=0.5, erc_alpha=1.0, erc_noise=False)
  assert "moe_erc" not in _forward(model).aux_losses  # no step key: evaluation, inference
  ctx = _forward(model, jax.random.key(0))
  expected = sum(moe.erc_loss(b.channel.router.kernel[...].T, b.channel.experts.gate[...], 1.0)
                 for b in model.blocks)
  np.testing.assert_allclose(float(ctx.aux_losses["moe_erc"]), 0.5 * float(expected), rtol=1e-6)
  np.testing.assert_allclose(float(ctx.stats()["erc"]), float(expected) / 2, rtol=1e-6)
  assert "moe_erc" not in _forward(_model(), jax.random.key(0)).aux_losses  # erc_coef 0: off


def test_erc_gradients_reach_the_router_and_the_gate_projections():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = _model(erc_coef=1.0, erc_alpha=0.5)

  def loss(m):
    return _forward(m, jax.random.key(1)).aux_losses["moe_erc"]

  grads = nnx.grad(loss)(model)
  block = grads["blocks"][0]["channel"]
  assert float(jnp.abs(block["router"]["kernel"][...]).sum()) > 0
  assert float(jnp.abs(block["experts"]["gate"][...]).sum()) > 0
  assert float(jnp.abs(block["experts"]["down"][...]).sum()) == 0  # ERC reads W_g only


def test_a_blocked_router_gradient_trains_the_gate_projections_only():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = _model(erc_coef=1.0, erc_alpha=0.5, erc_router_grad=False)
  grads = nnx.grad(lambda m: _forward(m, jax.random.key(1)).aux_losses["moe_erc"])(model)
  block = grads["blocks"][0]["channel"]
  assert float(jnp.abs(block["router"]["kernel"][...]).sum()) == 0
  assert float(jnp.abs(block["experts"]["gate"][...]).sum()) > 0
