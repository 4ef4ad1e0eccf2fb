"""Blocks as one scan (model.scan_blocks): the same function as the unrolled blocks given the
same parameters, in values and gradients, with and without remat; trains through the trainer;
refused with a reason for the options that need the unrolled form."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import copy_parameters
from research import config as config_lib
from research import run_config
from research import experiments
from research.eval import lm_eval
from research.model import ForwardContext, create_model
from research.train import optim


def _config(scan: bool, **overrides):
  c = run_config.resolve(experiments.get_config("baseline:scale=smoke", {
      "model.num_layers": 3, "model.scan_blocks": "on" if scan else "off", **overrides}))
  c.model.vocab_size = 65
  return c


def _loss(model, x):
  logits = model(x, ForwardContext(positions=lm_eval.positions_for(x)))
  return lm_eval.cross_entropy(logits, jnp.roll(x, -1, axis=1)).mean()


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scan_equals_unrolled_in_values_and_gradients(remat):
  unrolled = create_model(_config(False, **{"model.remat": remat}).model, seed=3)
  scanned = copy_parameters(unrolled,
                            create_model(_config(True, **{"model.remat": remat}).model))
  x = jax.random.randint(jax.random.key(0), (2, 32), 0, 65)
  la, ga = nnx.value_and_grad(_loss)(unrolled, x)
  lb, gb = nnx.value_and_grad(_loss)(scanned, x)
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
  blocks_a = jax.tree.map(lambda *xs: jnp.stack(xs), *[ga.blocks[i] for i in range(3)])
  for a, b in zip(jax.tree.leaves(blocks_a), jax.tree.leaves(gb.blocks)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ga.embed.table[...]), np.asarray(gb.embed.table[...]),
                             rtol=1e-5, atol=1e-7)
  hidden_a, hidden_b = unrolled.hidden_states(x), scanned.hidden_states(x)
  assert len(hidden_a) == len(hidden_b) == 4
  for a, b in zip(hidden_a, hidden_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_stacked_norm_scales_are_not_weight_decayed():
  model = create_model(_config(True).model)
  params = nnx.state(model, nnx.Param)
  mask = optim.decay_mask(params)
  assert mask["blocks"]["attn"]["q"]["kernel"] is True  # [layers, embed, heads]: a matrix
  assert mask["blocks"]["attn_norm"]["norm"]["scale"] is False  # [layers, embed]: vectors


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_step_with_gradient_accumulation_equals_one_batch(remat):
  """The small and paper scales scan their blocks and accumulate gradients: the scan then runs
  inside the accumulation scan (variables traced one level out). Two micro-batches give the
  one-batch step's loss and update."""
  from research.train.trainer import make_train_step  # pylint: disable=import-outside-toplevel
  steps = {}
  for accum in (1, 2):
    c = _config(True, **{"model.remat": remat, "train.grad_accum": accum,
                         "train.batch_size": 4})
    graphdef, params, other = nnx.split(create_model(c.model, seed=3), nnx.Param, ...)
    tx, schedule = optim.make_optimizer(c.train)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
             "opt_state": tx.init(params)}
    x = jax.random.randint(jax.random.key(0), (4, 32), 0, 65)
    batch = {"inputs": x, "targets": jnp.roll(x, -1, axis=1)}
    steps[accum] = jax.jit(make_train_step(graphdef, tx, schedule, c))(state, batch)
  (one, m1), (two, m2) = steps[1], steps[2]
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.needs_data
def test_scanned_model_trains_and_logs_per_block_gradient_norms(tmp_path):
  from research.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  config = experiments.get_config("baseline:scale=smoke,corpus=tinyshakespeare", {
      "model.scan_blocks": "on", "train.log_layer_grad_norms": True, "train.progress": False,
      "mesh.num_devices": 1})
  summary = Trainer(config, tmp_path, log=lambda *_: None).run()
  assert summary["step"] == 12 and summary["valid_loss"] < 4.3
  assert len(summary["layer_cosine"]) == 2
  import json  # pylint: disable=import-outside-toplevel
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"grad_norm/block_00", "grad_norm/block_01"} <= set(rows[0])


@pytest.mark.parametrize("key,value,reason", [
    ("model.attention.kind", "moda", "attention.kind=moda"),
    ("model.residual.kind", "hyper", "residual.kind=hyper"),
    ("model.norm.kind", "hybridnorm_star", "norm.kind=hybridnorm_star (block 0 differs)"),
    ("model.channel.kind", "moe", "channel.kind=moe"),
    ("model.init_out_scaling", "layer_depth", "init_out_scaling=layer_depth"),
])
def test_options_that_need_unrolled_blocks_are_refused(key, value, reason):
  with pytest.raises(config_lib.ConfigError, match=f"model.scan_blocks=on needs identical "
                     f"blocks .*{re.escape(reason)}"):
    run_config.resolve(experiments.get_config("baseline:scale=smoke",
                                               {"model.scan_blocks": "on", key: value}))


def test_auto_scans_where_the_options_allow():
  on = run_config.resolve(experiments.get_config("baseline:scale=small"))
  off = run_config.resolve(experiments.get_config("moda:scale=small"))
  assert on.model.scan_blocks == "on" and off.model.scan_blocks == "off"
