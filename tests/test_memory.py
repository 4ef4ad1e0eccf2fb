"""UltraMem / UltraMemV2 memory layers: retrieval against brute force, TDQKR rank 1 against
plain product keys, the layer against the explicit computation over its selected slots, the
skip-layer placement, init calibration, FLOP matching, the value-lr rule, bytes read per token,
and sharded == unsharded on the 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import assert_same_step
from research import config as config_lib
from research import run_config
from research import sharding
from research.config import ConfigError
from research.model import (ForwardContext, abstract_model, accounting, create_model,
                            lr_multipliers, memory, model_summary)
from research.train.optim import make_optimizer, scale_by_path
from research.train.trainer import make_train_step


def mem_config(kind="ultramem", num_layers=2, d_model=32, **fields):
  c = run_config.default_config()
  c.model.vocab_size = 61
  c.model.num_layers = num_layers
  c.model.d_model = d_model
  c.model.num_heads = 4
  c.model.channel.kind = kind
  c.data.seq_len = 16
  c.train.batch_size = 8
  c.train.warmup_steps = 0
  base = dict(num_keys=8, top_k=4)
  for k, v in {**base, **fields}.items():
    config_lib.apply_overrides(c, {f"model.channel.{kind}.{k}": v})
  return run_config.resolve(c)


def layer_for(kind="ultramem", **fields):
  cfg = mem_config(kind, **fields).model
  spec = memory.spec_from_config(cfg, kind)
  return memory.MemoryLayer(spec, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(4)), spec


def rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def topk_set(scores, k):
  return set(np.argsort(-scores)[:k].tolist())


# ------------------------------------------------------------------------------ retrieval

def test_product_keys_equal_brute_force_topk():
  t, h, n, m = 5, 2, 12, 7
  s_row, s_col = rand(0, (t, h, 1, n)), rand(1, (t, h, 1, n))
  virtual, w = memory.retrieve(s_row, s_col, None, retrieval="product", top_k=m, side_top_k=m)
  for a in range(t):
    for b in range(h):
      grid = (np.asarray(s_row[a, b, 0])[:, None] + np.asarray(s_col[a, b, 0])[None, :]).ravel()
      assert set(np.asarray(virtual[a, b]).tolist()) == topk_set(grid, m)
      np.testing.assert_allclose(np.asarray(w[a, b, 0]), grid[np.asarray(virtual[a, b])],
                                 rtol=1e-6)


def test_tucker_with_full_candidates_equals_brute_force_topk():
  t, h, r, cores, n, m = 4, 2, 2, 2, 6, 9
  s_row, s_col = rand(2, (t, h, r, n)), rand(3, (t, h, r, n))
  core = jax.random.uniform(jax.random.key(4), (h, cores, r, r))
  virtual, w = memory.retrieve(s_row, s_col, core, retrieval="tucker", top_k=m, side_top_k=n)
  for a in range(t):
    for b in range(h):
      per_core = np.einsum("ri,crs,sj->cij", np.asarray(s_row[a, b]), np.asarray(core[b]),
                           np.asarray(s_col[a, b])).reshape(cores, -1)
      v = np.asarray(virtual[a, b])
      assert set(v.tolist()) == topk_set(per_core.sum(0), m)
      np.testing.assert_allclose(np.asarray(w[a, b]), per_core[:, v], rtol=1e-5, atol=1e-6)


def test_tdqkr_rank_one_reduces_to_plain_product_keys():
  """r = 1, one core c: the proxy is (u, t) = (1, sign c), so retrieval is product-key retrieval
  (per-side top-k, then the top-k of the candidate grid) with grid score c s_row[i] s_col[j]."""
  t, n, ms, m = 6, 10, 4, 5
  s_row, s_col = rand(5, (t, 1, 1, n)), rand(6, (t, 1, 1, n))
  for c in (0.7, -1.3):
    core = jnp.full((1, 1, 1, 1), c)
    virtual, w = memory.retrieve(s_row, s_col, core, retrieval="tucker", top_k=m, side_top_k=ms)
    for a in range(t):
      sr, sc = np.asarray(s_row[a, 0, 0]), np.asarray(s_col[a, 0, 0])
      rows = np.argsort(-sr)[:ms]
      cols = np.argsort(-np.sign(c) * sc)[:ms]
      grid = c * sr[rows][:, None] * sc[cols][None, :]
      best = np.argsort(-grid.ravel())[:m]
      expected = rows[best // ms] * n + cols[best % ms]
      np.testing.assert_array_equal(np.asarray(virtual[a, 0]), expected)
      np.testing.assert_allclose(np.asarray(w[a, 0, 0]), grid.ravel()[best], rtol=1e-5)


def test_rank_one_proxy_sign_and_tucker_penalty():
  core = jnp.array([[[[2.0, 0.5], [0.1, 1.0]], [[-0.5, 0.0], [0.3, 0.4]]]])  # [1 head, 2 cores]
  u, t = memory.rank_one_proxy(core)
  total = np.asarray(core[0].sum(0))
  uu, ss, vv = np.linalg.svd(total)
  assert float(u.sum()) >= 0
  np.testing.assert_allclose(np.outer(np.asarray(u[0]), np.asarray(t[0])) * ss[0],
                             np.outer(uu[:, 0], vv[0]) * ss[0], rtol=1e-5)
  expected = max(ss[1] - 0.15, 0) ** 2 / (2 - 1)
  assert float(memory.tucker_aux_loss(core, 0.15)) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- the layer, explicitly

def _np_scores(layer, spec, x):
  """Row / column scores [T, H, r, n'] recomputed in numpy."""
  rms = lambda v: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6)  # noqa: E731
  q = (x @ np.asarray(layer.query[...])).reshape(len(x), 2, spec.query_ranks, spec.d_key)
  q = rms(q) * np.asarray(layer.query_gain[...])[None, :, None, :]
  k = rms(np.asarray(layer.keys[...])) * np.asarray(layer.key_gain[...])[:, :, None, None, :]
  if not spec.per_rank_query:
    q = np.broadcast_to(q, (len(x), 2, spec.rank, spec.d_key))
  s = np.einsum("tprk,hprnk->thprn", q, k)
  return s[:, :, 0], s[:, :, 1]


@pytest.mark.parametrize("kind,fields", [
    ("ultramem", dict(expansion=4, cores=2, heads=2)),                   # IVE + MCS, 2 heads
    ("ultramem", dict(expansion=1, cores=1, rank=1, retrieval="product")),  # plain PKM
    ("ultramem_v2", dict(cores=2)),                                      # PEER, one projector
    ("ultramem_v2", dict(expansion=4, peer=False, init="code")),         # v2 groups summed
])
def test_layer_equals_explicit_computation_over_selected_slots(kind, fields):
  layer, spec = layer_for(kind, **fields)
  x = rand(7, (10, spec.d_model))
  xs = np.asarray(x, np.float64)
  s_row, s_col = nnx.jit(lambda l, v: l.scores(v))(layer, x)
  r_np, c_np = _np_scores(layer, spec, np.asarray(x))
  np.testing.assert_allclose(np.asarray(s_row), r_np, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s_col), c_np, rtol=1e-4, atol=1e-5)
  phys, block, w = (np.asarray(a) for a in nnx.jit(lambda l, v: l.select(v))(layer, x))
  assert phys.shape == (10, spec.heads * spec.top_k)
  assert phys.min() >= 0 and phys.max() < spec.slots and block.max() < spec.expansion
  values = np.asarray(layer.values[...], np.float64)
  h, dv = spec.cores, spec.d_value
  e_count = spec.expansion if spec.ive_projectors else 1
  out = np.zeros((10, spec.d_model))
  for t in range(10):
    weights = w[t].astype(np.float64)                                   # [h, K]
    if spec.d_pre_value:                                                 # PEER factor
      y = xs[t] @ np.asarray(layer.pre_proj[...], np.float64)
      weights = weights * (np.asarray(layer.pre_values[...], np.float64)[phys[t]] @ y)[None]
    z = np.zeros((e_count, dv))
    for k, p in enumerate(phys[t]):
      e = block[t, k] if e_count > 1 else 0
      for c in range(h):
        sl = slice(c * dv // h, (c + 1) * dv // h)
        z[e, sl] += weights[c, k] * values[p, sl]
    out[t] = z.reshape(-1) @ np.asarray(layer.out_proj[...], np.float64)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda l, v: l(v))(layer, x)), out, rtol=1e-4,
                             atol=1e-6)


def test_ive_permutation_is_a_bijection_onto_rows_and_blocks():
  layer, spec = layer_for("ultramem", expansion=4)
  perm = np.asarray(layer.permutation[...])
  assert sorted(perm.tolist()) == list(range(4 * spec.slots))
  assert spec.side == 2 * spec.num_keys


def test_skip_unit_adds_its_output_after_the_target_block():
  cfg = mem_config("ultramem", num_layers=3, layers="0:2,1:1").model
  rngs = nnx.Rngs(0)
  mixers = [memory.UltraMem(cfg, layer=i, dtype=jnp.float32, rngs=rngs) for i in range(3)]
  assert mixers[2].memory is None and mixers[2].incoming == (0,)
  xs = [rand(10 + i, (2, 5, cfg.d_model)) for i in range(3)]
  ctx = ForwardContext(positions=jnp.zeros((2, 5), jnp.int32))
  outs = [m(x, ctx) for m, x in zip(mixers, xs)]
  np.testing.assert_allclose(outs[0], mixers[0].ffn(xs[0], None), rtol=1e-6)
  np.testing.assert_allclose(outs[1], mixers[1].ffn(xs[1], None) + mixers[1].memory(xs[1]),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(outs[2], mixers[2].ffn(xs[2], None) + mixers[0].memory(xs[0]),
                             rtol=1e-5, atol=1e-7)
  assert not ctx.slots


def test_remat_equals_no_remat_with_skip_units():
  c = mem_config("ultramem", num_layers=2, layers="0:1")
  x = jax.random.randint(jax.random.key(0), (2, 16), 0, 61)
  model = create_model(c.model, seed=2)
  a = nnx.jit(lambda m, t: m(t))(model, x)
  model.remat = "block"
  b = nnx.jit(lambda m, t: m(t))(model, x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_train_step_equals_no_remat_with_the_ive_permutation():
  """A jitted train step under remat=block (the paper scale's setting) with UltraMem's IVE
  permutation, an integer buffer: nnx.remat refused to write it back ('Cannot mutate
  MemoryIndex from a different trace level'); the block is now a pure function of its
  variables under jax.checkpoint, with the same loss and gradients as without remat."""
  x = jax.random.randint(jax.random.key(0), (8, 17), 0, 61)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  out = []
  for remat in ("none", "block"):
    c = mem_config("ultramem", num_layers=2, layers="0:1", expansion=4)
    c.model.remat = remat
    model = create_model(c.model, seed=1)
    assert model.blocks[0].channel.memory.permutation is not None
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(c.train)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": tx.init(params)}
    state, metrics = jax.jit(make_train_step(graphdef, tx, schedule, c))(state, batch)
    out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


# ----------------------------------------------------------------------- init, FLOPs, bytes

@pytest.mark.parametrize("kind", ["ultramem", "ultramem_v2"])
def test_paper_init_calibrates_the_mean_selected_score(kind):
  layer, spec = layer_for(kind, init="paper", num_keys=16, top_k=8, d_model=64)
  x = rand(8, (256, spec.d_model))
  _, _, w = nnx.jit(lambda l, v: l.select(v))(layer, x)
  assert 0.6 < float(jnp.mean(jnp.sum(w, axis=1))) < 1.6
  if kind == "ultramem_v2":  # eq. 26 (sigma_V^4 reading)
    mu, m2 = memory.score_stats("tucker", spec.side, spec.rank, spec.cores, spec.top_k)
    k_inner = spec.ffn_width / spec.d_model
    want = (0.2 * k_inner * spec.d_model / (spec.top_k * spec.heads * m2 * spec.d_pre_value
                                            * spec.d_value * spec.num_layers)) ** 0.25
    assert float(jnp.std(layer.values[...])) == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("kind", ["ultramem", "ultramem_v2"])
def test_flops_are_matched_to_the_dense_model(kind):
  dense = run_config.resolve(_dense_config())
  s_dense = model_summary(abstract_model(dense.model), 16)
  c = mem_config(kind, num_layers=4, d_model=64, num_keys=8)
  s = model_summary(abstract_model(c.model), 16)
  spec = memory.spec_from_config(c.model, kind)
  assert spec.ffn_width < c.model.channel.d_ff
  per_width = 6 * c.model.d_model  # SwiGLU FFN FLOPs per unit of width, and rounding to 8
  assert abs(s["flops_per_token_fwd"] - s_dense["flops_per_token_fwd"]) <= 4 * 4 * per_width


def _dense_config():
  c = run_config.default_config()
  c.model.vocab_size, c.model.num_layers, c.model.d_model, c.model.num_heads = 61, 4, 64, 4
  c.data.seq_len = 16
  return c


def test_bytes_read_per_token_by_hand():
  c = mem_config("ultramem_v2", num_layers=2, layers="1:1", num_keys=8, top_k=4)
  s = model_summary(abstract_model(c.model), 16)
  spec = memory.spec_from_config(c.model, "ultramem_v2")
  row = spec.d_value + spec.d_pre_value
  assert s["params"] - s["params_activated"] == (spec.slots - spec.top_k) * row
  assert s["param_bytes_per_token"] == 4 * s["params_activated"]
  c.model.head.tie_embeddings = False
  model = abstract_model(c.model)
  s2 = model_summary(model, 16)
  assert s2["param_bytes_per_token"] == 4 * (s2["params_activated"] - (61 - 1) * c.model.d_model)
  # a batch of B tokens: dense weights once, E[distinct rows] of each table
  n, d, b = spec.slots, c.model.d_model, 64
  dense = s2["params"] - n * row - 61 * d
  rows = n * (1 - (1 - spec.top_k / n) ** b)
  vocab_rows = 61 * (1 - (1 - 1 / 61) ** b)
  assert accounting.param_bytes_per_token(model, batch=b) == pytest.approx(
      4 * (dense + rows * row + vocab_rows * d) / b, rel=1e-9)


def test_value_lr_multiplier_decays_to_one():
  c = mem_config("ultramem", value_lr=4.0, value_lr_decay=True)
  rules = lr_multipliers(c.model, steps=10)
  params = {"blocks": {"0": {"channel": {"memory": {"values": jnp.ones(2), "keys": jnp.ones(2)}}}}}
  tx = scale_by_path(rules)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  seen = []
  for _ in range(11):
    upd, state = tx.update(grads, state)
    mem = upd["blocks"]["0"]["channel"]["memory"]
    seen.append(float(mem["values"][0]))
    assert float(mem["keys"][0]) == 1.0
  assert seen[0] == pytest.approx(4.0) and seen[5] == pytest.approx(2.5)
  assert seen[10] == pytest.approx(1.0)
  c.model.channel.ultramem.value_lr = 1.0
  assert lr_multipliers(c.model, 10) == []
  assert len(make_optimizer(c.train, rules)[0].init(params)) == 3  # clip, adamw, multiplier


def test_config_errors_name_the_problem():
  with pytest.raises(ConfigError, match="perfect square"):
    mem_config(expansion=2)
  with pytest.raises(ConfigError, match="rank=1 and cores=1"):
    mem_config(retrieval="product")
  with pytest.raises(ConfigError, match="same block"):
    mem_config(layers="0:1,0:0")
  with pytest.raises(ConfigError, match="FFN budget"):
    mem_config(num_keys=256)


# ---------------------------------------------------------------------------- sharding

def _step(c, mesh):
  model = create_model(c.model, mesh=mesh, seed=1)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(c.train, lr_multipliers(c.model, c.train.steps))
  step = jax.jit(make_train_step(graphdef, tx, schedule, c), donate_argnums=0)
  x = jax.random.randint(jax.random.key(0), (c.train.batch_size, c.data.seq_len + 1), 0, 61)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
  with sharding.use_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.named_sharding(("batch", "seq"), v.shape, mesh))
             for k, v in batch.items()}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": jax.jit(tx.init)(params)}
    state, metrics = step(state, batch)
  spec = model.blocks[0].channel.memory.values[...].sharding.spec
  return jax.tree.map(np.asarray, state["params"]), float(metrics["loss"]), spec


def test_memory_sharded_over_slots_equals_unsharded():
  assert jax.device_count() == 8
  c = mem_config("ultramem_v2", num_layers=1)
  ref_params, ref_loss, _ = _step(c, sharding.make_mesh("dp", devices=jax.devices()[:1]))
  params, loss, spec = _step(c, sharding.make_mesh("fsdp_tp", tensor=2))
  assert spec == jax.sharding.PartitionSpec(("fsdp", "tensor"), None)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_same_step(params, ref_params, lr=c.train.lr)
