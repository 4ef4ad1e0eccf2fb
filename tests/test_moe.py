"""MoE channel mixer: router, Switch loss and dispatch against hand computation; dropless output
equals the explicit per-token expert sum; capacity drops are counted; expert-sharded == unsharded
on the 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import assert_same_logits, assert_same_step
from research import config as config_lib
from research import run_config
from research import sharding
from research.config import ConfigError
from research.model import ForwardContext, abstract_model, create_model, model_summary, moe
from research.train.optim import make_optimizer
from research.train.trainer import make_train_step


def moe_config(num_layers=2, **moe_overrides):
  c = run_config.default_config()
  c.model.vocab_size = 61
  c.model.num_layers = num_layers
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.channel.kind = "moe"
  c.data.seq_len = 16
  c.train.batch_size = 8
  c.train.warmup_steps = 0
  for k, v in moe_overrides.items():
    config_lib.apply_overrides(c, {f"model.channel.moe.{k}": v})
  return run_config.resolve(c)


def make_moe(**overrides):
  cfg = moe_config(**overrides).model
  return moe.MoE(cfg, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(3)), cfg


def ctx_for(x):
  return ForwardContext(positions=jnp.zeros(x.shape[:2], jnp.int32))


# ------------------------------------------------------------------------------ router

def test_router_probs_topk_and_switch_loss_by_hand():
  router = moe.Router(2, 3, 2, std=1.0, norm_topk=False, rngs=nnx.Rngs(0))
  router.kernel[...] = jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
  x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
  r = router(x)
  logits = np.array([[1, 0, -1], [0, 2, 0], [1, 2, -1], [-1, 0, 1]], np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(r.probs), probs, rtol=1e-6)
  experts = np.argsort(-probs, axis=1)[:, :2]
  np.testing.assert_array_equal(np.asarray(r.experts), experts)
  np.testing.assert_allclose(np.asarray(r.gates), np.take_along_axis(probs, experts, 1), rtol=1e-6)
  # Switch: E * sum_i f_i P_i, f over the 8 assignments
  f = np.bincount(experts.reshape(-1), minlength=3) / experts.size
  expected = 3 * np.sum(f * probs.mean(0))
  assert float(moe.switch_balance_loss(r)) == pytest.approx(expected, rel=1e-6)
  # z-loss: mean logsumexp^2
  lse = np.log(np.exp(logits).sum(1))
  assert float(moe.router_z_loss(r)) == pytest.approx(np.mean(lse ** 2), rel=1e-6)


def test_balanced_switch_loss_is_one_and_norm_topk_sums_to_one():
  router = moe.Router(4, 4, 2, std=0.5, norm_topk=True, rngs=nnx.Rngs(1))
  r = router(jax.random.normal(jax.random.key(0), (64, 4)))
  np.testing.assert_allclose(np.asarray(r.gates.sum(-1)), 1.0, rtol=1e-6)
  uniform = moe.Routing(logits=jnp.zeros((8, 4)), probs=jnp.full((8, 4), 0.25),
                        experts=jnp.array([[0, 1], [2, 3]] * 4), gates=jnp.full((8, 2), 0.25))
  assert float(moe.switch_balance_loss(uniform)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- dispatch

def test_plan_dispatch_priority_and_drops_by_hand():
  # one group of 4 tokens, 3 experts, top-2, capacity 2
  experts = jnp.array([[[0, 1], [0, 2], [0, 1], [1, 0]]])
  plan = moe.plan_dispatch(experts, 3, capacity=2)
  # choice 0 first: tokens 0, 1 take expert 0's slots 0, 1; token 2's expert 0 overflows;
  # token 3 takes expert 1 slot 0; then choice 1: token 0 -> expert 1 slot 1, token 1 -> expert 2
  # slot 0, token 2 -> expert 1 (full: dropped), token 3 -> expert 0 (full: dropped)
  np.testing.assert_array_equal(np.asarray(plan.position[0]), [[0, 1], [1, 0], [2, 2], [0, 3]])
  np.testing.assert_array_equal(np.asarray(plan.kept[0]),
                                [[True, True], [True, True], [False, False], [True, False]])
  assert int(plan.dropped) == 3
  np.testing.assert_array_equal(np.asarray(plan.slot_token[0]), [[0, 1], [3, 0], [1, 4]])


def test_dropless_equals_explicit_per_token_expert_sum():
  layer, cfg = make_moe(dispatch="dropless", num_experts=4, top_k=2)
  x = jax.random.normal(jax.random.key(1), (3, 16, cfg.d_model))
  ctx = ctx_for(x)
  y = np.asarray(layer(x, ctx), np.float64)
  assert float(ctx.stats()["moe_dropped"]) == 0.0
  r = layer.router(x)
  w_up, w_gate, w_down = (np.asarray(p[...], np.float64)
                          for p in (layer.experts.up, layer.experts.gate, layer.experts.down))
  xs = np.asarray(x, np.float64)
  expected = np.zeros_like(xs)
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  for b in range(3):
    for s in range(16):
      for e, g in zip(np.asarray(r.experts[b, s]), np.asarray(r.gates[b, s])):
        h = silu(xs[b, s] @ w_gate[e]) * (xs[b, s] @ w_up[e])
        expected[b, s] += g * (h @ w_down[e])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-6)


def test_capacity_drops_are_counted_and_zero_the_output():
  layer, cfg = make_moe(dispatch="capacity", capacity_factor=0.25, num_experts=4, top_k=2)
  x = jax.random.normal(jax.random.key(2), (2, 16, cfg.d_model))
  capacity = moe.capacity_for("capacity", 16, 4, 2, 0.25)
  assert capacity == 2
  r = layer.router(x)
  # count by hand: per group, expert e keeps its first `capacity` assignments in choice-major order
  expected = 0
  for g in np.asarray(r.experts):
    used = np.zeros(4, int)
    for choice in range(2):
      for e in g[:, choice]:
        expected += used[e] >= capacity
        used[e] += 1
  ctx = ctx_for(x)
  y = layer(x, ctx)
  assert expected > 0
  np.testing.assert_allclose(float(ctx.stats()["moe_dropped"]), expected / (2 * 16 * 2))
  plan = moe.plan_dispatch(r.experts, 4, capacity)
  fully_dropped = ~np.asarray(plan.kept).any(-1)
  assert fully_dropped.any()
  np.testing.assert_array_equal(np.asarray(y)[fully_dropped], 0.0)


def test_balance_loss_enters_the_context_and_flops_count_active_experts():
  layer, cfg = make_moe(aux_coef=0.5, z_coef=0.1)
  x = jax.random.normal(jax.random.key(3), (2, 16, cfg.d_model))
  ctx = ctx_for(x)
  layer(x, ctx)
  r = layer.router(x)
  assert float(ctx.aux_losses["moe_balance"]) == pytest.approx(
      0.5 * float(moe.switch_balance_loss(r)), rel=1e-6)
  assert float(ctx.aux_losses["moe_z"]) == pytest.approx(0.1 * float(moe.router_z_loss(r)),
                                                         rel=1e-6)
  d, f = cfg.d_model, cfg.channel.moe.d_expert
  assert f == cfg.channel.d_ff // 2
  assert layer.flops_per_token(16) == 2 * d * 8 + 2 * 2 * d * f * 3


def test_activated_params_and_config_errors():
  cfg = moe_config().model
  s = model_summary(abstract_model(cfg), 16)  # shapes only: no init
  per_expert = 3 * cfg.d_model * cfg.channel.moe.d_expert
  assert s["params"] - s["params_activated"] == cfg.num_layers * 6 * per_expert
  assert s["param_bytes_per_token"] == 4 * s["params_activated"]
  with pytest.raises(ConfigError, match="top_k=9"):
    moe_config(top_k=9)
  with pytest.raises(ConfigError, match="dispatch='all'"):
    moe_config(dispatch="all")


# ---------------------------------------------------------------------------- sharding

def _one_step(c, mesh):
  model = create_model(c.model, mesh=mesh, seed=1)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(c.train)
  step = jax.jit(make_train_step(graphdef, tx, schedule, c), donate_argnums=0)
  x = jax.random.randint(jax.random.key(0), (c.train.batch_size, c.data.seq_len + 1), 0, 61)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  with sharding.use_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.named_sharding(("batch", "seq"), v.shape, mesh))
             for k, v in batch.items()}
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p, other)(t))(params, batch["inputs"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": jax.jit(tx.init)(params)}
    state, metrics = step(state, batch)
  spec = model.blocks[0].channel.experts.up[...].sharding.spec
  return np.asarray(logits), jax.tree.map(np.asarray, state["params"]), metrics, spec


@pytest.mark.parametrize("dispatch,router,preset,expert", [
    ("dropless", "topk", "dp", 8), ("capacity", "topk", "dp", 8),
    ("capacity", "topk", "ep", 1), ("capacity", "gatepro", "ep", 4),
    ("capacity", "maxscore", "fsdp_ep", 4), ("dropless", "topk", "fsdp_ep", 2)])
def test_expert_sharded_equals_unsharded(dispatch, router, preset, expert):
  """Expert parallelism (experts on the `expert` axis, tokens moved by all-to-all in
  shard_map) gives the unsharded forward, loss, statistics and one training step, for every
  router; the capacity semantics (dropped fraction) are those of the one-device run."""
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                f"has {jax.device_count()}")
  c = moe_config(num_layers=1, dispatch=dispatch, capacity_factor=0.5 if router != "maxscore"
                 else 1.0, router=router)
  ref = _one_step(c, sharding.make_mesh("dp", devices=jax.devices()[:1]))
  mesh = sharding.make_mesh(preset, expert=expert)
  got = _one_step(c, mesh)
  assert mesh.shape["expert"] == (8 if preset == "ep" and expert == 1 else expert)
  assert got[3][0] == "expert"
  assert_same_logits(got[0], ref[0])
  assert float(got[2]["loss"]) == pytest.approx(float(ref[2]["loss"]), rel=1e-5)
  assert float(got[2]["aux/moe_balance"]) == pytest.approx(float(ref[2]["aux/moe_balance"]),
                                                           rel=1e-5)
  assert_same_step(got[1], ref[1], lr=c.train.lr)
  assert float(got[2]["stat/moe_dropped"]) == pytest.approx(float(ref[2]["stat/moe_dropped"]))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_logs_the_dropped_fraction_outside_the_objective(grad_accum):
  """The step logs `stat/moe_dropped` (mean over layers of the dropped fraction of assignments),
  and it is a measurement: the parameters after the step do not depend on it."""
  c = moe_config(num_layers=2, dispatch="capacity", capacity_factor=0.25)
  c.train.grad_accum = grad_accum
  mesh = sharding.make_mesh("dp", devices=jax.devices()[:1])
  _, params, metrics, _ = _one_step(c, mesh)
  dropped = float(metrics["stat/moe_dropped"])
  assert 0.0 < dropped < 1.0
  assert "aux/moe_dropped" not in metrics and "aux/stat/moe_dropped" not in metrics
  # the same fraction, counted by hand from the first step's routing of each layer
  model = create_model(c.model, mesh=mesh, seed=1)
  x = jax.random.randint(jax.random.key(0), (c.train.batch_size, c.data.seq_len + 1), 0, 61)
  ctx = ForwardContext(positions=jnp.broadcast_to(jnp.arange(c.data.seq_len), x[:, :-1].shape))
  model(x[:, :-1], ctx)
  if grad_accum == 1:
    assert dropped == pytest.approx(float(ctx.stats()["moe_dropped"]), rel=1e-6)
  c.train.grad_accum = 1
  c.model.channel.moe.dispatch = "dropless"
  assert float(_one_step(c, mesh)[2]["stat/moe_dropped"]) == 0.0
