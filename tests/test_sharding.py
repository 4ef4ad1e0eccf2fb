"""Sharded equals unsharded on the 8-device CPU mesh, for every preset; mesh errors are clear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import assert_same_logits, assert_same_step
from research import run_config
from research import sharding
from research.model import create_model
from research.train.optim import make_optimizer
from research.train.trainer import make_train_step

PRESETS = [("dp", 1), ("fsdp", 1), ("fsdp_tp", 2), ("fsdp_tp", 4)]


def make_config():
  c = run_config.default_config()
  c.model.vocab_size = 64
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.channel.d_ff = 128
  c.data.seq_len = 16
  c.train.batch_size = 8
  c.train.warmup_steps = 0
  return run_config.resolve(c)


def batch_for(c, seed=0):
  x = jax.random.randint(jax.random.key(seed), (c.train.batch_size, c.data.seq_len + 1), 0, 64)
  return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def one_step(c, mesh):
  """Builds the model on `mesh`, runs the forward and one training step; returns host arrays."""
  model = create_model(c.model, mesh=mesh, seed=1)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(c.train)
  step = jax.jit(make_train_step(graphdef, tx, schedule, c), donate_argnums=0)
  batch = batch_for(c)
  with sharding.use_mesh(mesh):
    batch = {k: jax.device_put(v, sharding.named_sharding(("batch", "seq"), v.shape, mesh))
             for k, v in batch.items()}
    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p, other)(x))(params, batch["inputs"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": jax.jit(tx.init)(params)}
    state, metrics = step(state, batch)
  return (np.asarray(logits), jax.tree.map(np.asarray, state["params"]),
          float(metrics["loss"]), model)


@pytest.fixture(scope="module")
def unsharded():
  c = make_config()
  return one_step(c, sharding.make_mesh("dp", devices=jax.devices()[:1]))


def test_the_equivalence_checks_reject_what_a_sharding_bug_does():
  """The tolerance of tests/equivalence.py admits a few reduction-order outliers, not a bug:
  every token's logits moved (a per-shard scale), or 1% of the parameters moved by half an
  update (a gradient reduced over one shard), fails."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 16, 64)).astype(np.float32)
  assert_same_logits(logits, logits.copy())
  one_token = logits.copy()
  one_token[3, 15] += 9e-4
  assert_same_logits(one_token, logits, flipped_tokens=2)
  with pytest.raises(AssertionError, match="1 of 64 token positions"):
    assert_same_logits(one_token, logits)
  with pytest.raises(AssertionError, match="64 of 64 token positions"):
    assert_same_logits(logits * 1.001, logits, flipped_tokens=2)
  params = {"w": rng.normal(size=(100, 100)).astype(np.float32), "b": np.zeros(7, np.float32)}
  moved = jax.tree.map(np.copy, params)
  moved["w"].ravel()[0] += 4e-5  # one Adam outlier
  assert_same_step(moved, params, lr=1e-3)
  moved["w"].ravel()[:100] += 5e-4
  with pytest.raises(AssertionError, match="100 of 10007 parameter elements"):
    assert_same_step(moved, params, lr=1e-3)
  moved = jax.tree.map(np.copy, params)
  moved["b"][0] = 2e-3  # one element, but further than a whole update
  with pytest.raises(AssertionError, match="more than one update"):
    assert_same_step(moved, params, lr=1e-3)


@pytest.mark.parametrize("preset,tensor", PRESETS)
def test_sharded_equals_unsharded(unsharded, preset, tensor):
  assert jax.device_count() == 8
  c = make_config()
  mesh = sharding.make_mesh(preset, tensor=tensor)
  logits, params, loss, model = one_step(c, mesh)
  ref_logits, ref_params, ref_loss, _ = unsharded
  assert_same_logits(logits, ref_logits)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert_same_step(params, ref_params, lr=c.train.lr)
  # the parameters really are distributed as the rules say
  q = model.blocks[0].attn.q.kernel[...].sharding.spec
  table = model.embed.table[...].sharding.spec
  if preset == "dp":
    assert q == jax.sharding.PartitionSpec(None, None)
  elif preset == "fsdp":
    assert q == jax.sharding.PartitionSpec("fsdp", None)
    assert table == jax.sharding.PartitionSpec(None, "fsdp")
  else:
    assert q == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert table == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_logical_rules_replicate_what_does_not_divide():
  mesh = sharding.make_mesh("fsdp_tp", tensor=4)
  # 2 KV heads x 8 = 16 columns divide by 4, but a 6-wide dimension does not
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 16), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 6), mesh) == jax.sharding.PartitionSpec("fsdp", None)
  assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == jax.sharding.PartitionSpec("fsdp", None)
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


@pytest.mark.parametrize("preset,tensor,expert,message", [
    ("fsdp_tp", 3, 1, "needs a device count divisible by 3, but 8 devices are present"),
    ("dp", 2, 1, "has no tensor axis"),
    ("tp", 1, 1, "unknown mesh preset 'tp'"),
    ("fsdp", 1, 16, "divisible by 16"),
])
def test_mesh_errors_are_clear(preset, tensor, expert, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.make_mesh(preset, tensor=tensor, expert=expert)


def test_mesh_from_config_checks_device_count():
  c = run_config.default_config()
  c.mesh.num_devices = 16
  with pytest.raises(sharding.MeshError, match="mesh.num_devices=16 but only 8 cpu device"):
    sharding.mesh_from_config(c.mesh)
  c.mesh.num_devices = 2
  assert sharding.mesh_from_config(c.mesh).devices.size == 2


def test_presets_shape():
  assert sharding.mesh_shape("dp", 8) == dict(data=8, fsdp=1, expert=1, tensor=1)
  assert sharding.mesh_shape("fsdp", 8) == dict(data=1, fsdp=8, expert=1, tensor=1)
  assert sharding.mesh_shape("fsdp_tp", 8, tensor=2) == dict(data=1, fsdp=4, expert=1, tensor=2)
  assert sharding.mesh_shape("fsdp", 8, expert=2) == dict(data=1, fsdp=4, expert=2, tensor=1)
