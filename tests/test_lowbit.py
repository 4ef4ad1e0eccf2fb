"""Low-bit optimizer states (SOLO, arXiv:2505.00347): level grids, packing, rounding, the EMA
swamping toy of the digest, the optimizer against optax's Adam, and a training run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import experiments
from research.errors import ConfigError
from research.train import lowbit
from research.train.trainer import Trainer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_has_two_to_the_bits_levels(bits, signed):
  levels = lowbit.dynamic_map(bits, signed)
  assert len(levels) == 2 ** bits and np.all(np.diff(levels) > 0)
  assert 0.0 in levels and levels[-1] == 1.0 and levels[0] >= -1.0
  assert (levels[0] < 0) == signed
  if bits == 4 and not signed:  # exponents 10^-2, 10^-1, 10^0: small values get many levels
    assert (levels < 0.01).sum() == 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_and_unpack(bits):
  codes = jax.random.randint(jax.random.key(0), (256,), 0, 2 ** bits).astype(jnp.uint8)
  storage = 2 if bits == 2 else 4 if bits <= 4 else 8
  packed = lowbit._pack(codes, storage)  # pylint: disable=protected-access
  assert packed.size == 256 * storage // 8
  np.testing.assert_array_equal(lowbit._unpack(packed, storage, 256), codes)  # pylint: disable=protected-access


def test_values_on_the_grid_decode_exactly():
  codec = lowbit.Codec(3, "linear", "nearest", signed=True, block=8)
  levels = lowbit.linear_map(3, True)
  x = jnp.asarray(np.concatenate([levels, levels * 0.5]), jnp.float32)  # block max 1, then 0.5
  np.testing.assert_allclose(codec.decode(codec.encode(x, jax.random.key(0)), x.shape), x,
                             atol=1e-7)
  # qema: a block holding its own levels alpha^k (x_p = the smallest) decodes to them
  q = lowbit.Codec(2, "qema", "nearest", signed=False, block=8, quantile=0.01)
  alpha = 0.5
  u = jnp.asarray([1.0, alpha, alpha ** 2, alpha ** 3] * 2, jnp.float32) * 3.0
  np.testing.assert_allclose(q.decode(q.encode(u, jax.random.key(0)), u.shape), u, rtol=1e-5)


def test_stochastic_rounding_is_unbiased():
  codec = lowbit.Codec(2, "linear", "stochastic", signed=False, block=8)
  x = jnp.asarray([1.0, 0.1, 0.2, 0.5, 0.9, 0.0, 0.45, 0.7], jnp.float32)
  keys = jax.random.split(jax.random.key(0), 4000)
  decoded = jax.vmap(lambda k: codec.decode(codec.encode(x, k), x.shape))(keys)
  np.testing.assert_allclose(decoded.mean(axis=0), x, atol=0.01)


def _ema_error(codec, steps=1000, beta=0.99, init=0.2):
  """The digest's toy: 128 EMA states of z ~ U[0, 1] with beta 0.99, requantized every step;
  RMS distance of the decoded states from the exact EMA of the same draws."""
  v0 = jnp.full((128,), init)

  def body(carry, key):
    state, exact = carry
    k1, k2 = jax.random.split(key)
    z = jax.random.uniform(k1, (128,))
    v = beta * codec.decode(state, (128,)) + (1 - beta) * z
    return (codec.encode(v, k2), beta * exact + (1 - beta) * z), None

  key = jax.random.key(0)
  (state, exact), _ = jax.jit(lambda: jax.lax.scan(
      body, (codec.encode(v0, key), v0), jax.random.split(key, steps)))()
  return float(jnp.sqrt(jnp.mean((codec.decode(state, (128,)) - exact) ** 2)))


def test_ema_swamping_toy():
  """3 bits: the linear grid with nearest rounding swamps (every state is rounded to the block
  max and climbs to ~1 while the EMA is ~0.5); stochastic rounding tracks it noisily; SOLO's
  log grid with stochastic rounding tracks it best."""
  nearest = _ema_error(lowbit.Codec(3, "linear", "nearest", signed=False))
  stochastic = _ema_error(lowbit.Codec(3, "linear", "stochastic", signed=False))
  solo = _ema_error(lowbit.Codec(3, "qema", "stochastic", signed=False))
  assert nearest > 0.4  # measured 0.49
  assert solo < 0.08 and solo < stochastic < nearest  # measured 0.05 < 0.13


def _quadratic_updates(tx, steps=20):
  params = {"w": jnp.linspace(-1.0, 1.0, 512).reshape(4, 128), "b": jnp.ones((3,))}
  state = tx.init(params)
  out = []
  for i in range(steps):
    grads = jax.tree.map(lambda p: p * (1.0 + 0.1 * i) + 0.01, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -1e-2 * u, updates))
    out.append(updates)
  return out


def test_unquantized_moments_are_adams():
  codec_m = lowbit.Codec(4, "de", "nearest", signed=True)
  codec_v = lowbit.Codec(2, "qema", "stochastic", signed=False)
  ours = _quadratic_updates(lowbit.scale_by_lowbit_adam(0.9, 0.99, 1e-8, codec_m, codec_v,
                                                        min_size=10 ** 9))
  ref = _quadratic_updates(optax.scale_by_adam(0.9, 0.99, 1e-8))
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # fp32 rounding near g = 0


def test_eight_bit_moments_stay_close_to_adam():
  ours = _quadratic_updates(lowbit.scale_by_lowbit_adam(
      0.9, 0.99, 1e-8, lowbit.Codec(8, "de", "nearest", signed=True),
      lowbit.Codec(8, "de", "nearest", signed=False), min_size=128))
  ref = _quadratic_updates(optax.scale_by_adam(0.9, 0.99, 1e-8))
  rel = [float(jnp.linalg.norm(a["w"] - b["w"]) / jnp.linalg.norm(b["w"]))
         for a, b in zip(ours, ref)]
  assert max(rel) < 0.05, rel  # the 3-element bias stays fp32 (min_size)


def test_state_bytes_and_the_beta_rule():
  codec_m = lowbit.Codec(4, "de", "nearest", signed=True)
  codec_v = lowbit.Codec(2, "qema", "stochastic", signed=False)
  tx = lowbit.scale_by_lowbit_adam(0.9, 0.99, 1e-8, codec_m, codec_v)
  params = {"w": jnp.zeros((256, 128))}
  size = 256 * 128
  # m: half a byte per value + a scale per block; v: a quarter byte + scale and alpha per block
  want = size // 2 + 4 * size // 128 + size // 4 + 8 * size // 128 + 4 + 8 + 12  # + count,
  # key and the three fp32 diagnostics
  assert lowbit.state_bytes(tx.init(params)) == want
  assert codec_m.state_bytes(size) + codec_v.state_bytes(size) == want - 24
  ref = lowbit.Codec(8, "de", "nearest", signed=True)
  assert lowbit.relative_error(lowbit.Codec(2, "de", "nearest", signed=True)) > \
      lowbit.relative_error(codec_m) > lowbit.relative_error(ref)
  b4, b2 = (lowbit.solo_beta1(lowbit.Codec(b, "de", "nearest", signed=True), ref)
            for b in (4, 2))
  assert 0 < b2 < b4 < 0.9  # fewer bits, smaller beta1


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5, grid="de", rounding="nearest", signed=True), "m_bits=5 is not one of 2, 3"),
    (dict(bits=4, grid="log", rounding="nearest", signed=False), "v_grid='log'"),
    (dict(bits=4, grid="qema", rounding="nearest", signed=True), "m_grid='qema' is the unsig"),
    (dict(bits=4, grid="de", rounding="up", signed=True), "m_rounding='up'"),
])
def test_codec_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    lowbit.Codec(**kwargs)


@pytest.mark.needs_data
def test_lowbit_adamw_trains_checkpoints_and_reports_its_state(tmp_path):
  overrides = {"train.optimizer": "lowbit_adamw", "train.steps": 8, "train.checkpoint_every": 4,
               "train.progress": False, "mesh.num_devices": 1}
  spec = "baseline:scale=smoke,corpus=tinyshakespeare"
  summary = Trainer(experiments.get_config(spec, overrides), tmp_path, log=lambda *_: None).run()
  assert summary["step"] == 8 and np.isfinite(summary["valid_loss"])
  assert summary["opt_state_bytes"] < 0.4 * summary["opt_state_bytes_fp32_adam"]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert all(0 <= r["stat/opt_v_codes_unchanged"] <= 1 and r["stat/opt_update_rms"] > 0
             for r in train)
  config = json.loads((tmp_path / "config.json").read_text())["config"]
  assert config["train"]["lowbit"]["v_grid"] == "qema"
  # the codes and the rounding key round-trip through a checkpoint: a run resumed from step 4
  # (a fork of the same config) ends with the uninterrupted run's parameters, bit for bit
  resumed = tmp_path.parent / (tmp_path.name + "_resumed")
  Trainer(experiments.get_config(spec, overrides), resumed, log=lambda *_: None,
          fork=(tmp_path, 4)).run()
  from research.infer.load import load_run
  a, b = (jax.tree.leaves(nnx.state(load_run(w, step=8).model, nnx.Param))
          for w in (tmp_path, resumed))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_sweeps_two_bit_beta1_is_the_rules():
  sweep = experiments._load_module("lowbit_optimizer", "sweep.py")  # pylint: disable=protected-access
  rule = lowbit.solo_beta1(lowbit.Codec(2, "de", "nearest", signed=True),
                           lowbit.Codec(4, "de", "nearest", signed=True), 0.8)
  assert sweep.SOLO_2_2_BETA1 == pytest.approx(rule, abs=0.005)
  from research import report
  assert report.confounds("lowbit_optimizer", sweep.get_sweep().arg,
                          sweep.get_sweep().groups["main"],
                          sweep.get_sweep().varies["main"]) == []


@pytest.mark.parametrize("key, value, match", [
    ("train.lowbit.v_bits", 5, "train.lowbit.v_bits"),
    ("train.lowbit.m_grid", "qema", "train.lowbit.m_grid"),
    ("train.lowbit.quantile", 1.0, "train.lowbit.quantile"),
])
def test_bad_lowbit_settings_fail_when_the_config_resolves(key, value, match):
  from research import run_config
  c = experiments.get_config("lowbit_optimizer:scale=smoke", {key: value})
  with pytest.raises(ConfigError, match=match):
    run_config.resolve(c)
