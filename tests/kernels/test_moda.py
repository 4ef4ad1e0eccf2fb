"""MoDA attention kernels (kernels_pallas/moda) against the jnp reference, in interpret mode.

Interpret-mode compiles cost a few seconds per configuration on CPU, so the kernels run a
covering subset rather than the full product:
  GPU style (Triton), fp32: G=1 S=0 T=24 causal; G=3 S=5 T=40 causal; G=2 S=8 T=40 non-causal
    (batch 2, 8-position tiles). bf16: G=3 S=1 T=24 causal with the default blocks.
  TPU style (Mosaic), fp32: G=3 S=5 T=40 causal; G=2 S=8 T=24 non-causal. bf16: G=1 S=0 T=40.
Block sizes are 16 positions x 16 keys unless stated, so T = 24 and 40 are ragged.
Every kernel case checks the output and the gradients w.r.t. q, k, v, depth_k and depth_v.

Tolerances (max abs error; inputs ~N(0, 1), d = 16), the same on every backend because fp32
dots run at full precision in these tests, kernels' included (conftest.py): fp32 kernels vs the
fp32 reference at Precision.HIGHEST: 1e-5 (values) and 5e-5 (gradients). bf16 kernels vs the
same fp32 oracle on the bf16-rounded inputs: 3e-2 (values) and 8e-2 (gradients), i.e. a few bf16
ulps of O(1) values. Reference-against-reference checks: 1e-5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.moda import IMPLS, flash_attention, moda_attention, moda_reference
from kernels_pallas.moda import bench
from backends import tolerance

HIGHEST = jax.lax.Precision.HIGHEST
# (backend, dtype) -> (values, gradients) max abs error; "any": every backend
TOL = {("any", jnp.float32): (1e-5, 5e-5), ("any", jnp.bfloat16): (3e-2, 8e-2)}


def _inputs(b, t, hk, g, s, d, dtype, seed=0):
  """Host-side N(0, 1) inputs (numpy: no per-op compiles), cast to dtype, and a cotangent."""
  rng = np.random.default_rng(seed)
  shapes = [(b, t, hk * g, d), (b, t, hk, d), (b, t, hk, d), (b, t, s, hk, d), (b, t, s, hk, d)]
  args = [jnp.asarray(rng.standard_normal(x, np.float32).astype(dtype)) for x in shapes]
  return args, jnp.asarray(rng.standard_normal(shapes[0], np.float32))


def _value_and_grads(fn, args, do):
  """One jitted forward + VJP: (out, (dq, dk, dv, d depth_k, d depth_v))."""
  def run(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(do.astype(out.dtype))
  return jax.jit(run)(*args)


def _oracle(args, do, causal):
  args32 = [x.astype(jnp.float32) for x in args]
  fn = lambda *a: moda_reference(*a, causal=causal, precision=HIGHEST)
  return _value_and_grads(fn, args32, do)


def _check(got, want, dtype):
  atol_v, atol_g = tolerance(TOL, dtype)
  (o, grads), (o_ref, grads_ref) = got, want
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref), atol=atol_v, rtol=0)
  for name, g, g_ref in zip(("dq", "dk", "dv", "d depth_k", "d depth_v"), grads, grads_ref):
    assert g.shape == g_ref.shape, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref), atol=atol_g, rtol=0,
                               err_msg=name)


KERNEL_CASES = [
    # impl, b, t, hk, g, s, d, causal, block_q, block_k, dtype
    ("pallas_gpu", 1, 24, 2, 1, 0, 16, True, 16, 16, jnp.float32),
    ("pallas_gpu", 1, 40, 2, 3, 5, 16, True, 16, 16, jnp.float32),
    ("pallas_gpu", 2, 40, 1, 2, 8, 16, False, 8, 16, jnp.float32),
    ("pallas_gpu", 1, 24, 2, 3, 1, 16, True, None, None, jnp.bfloat16),
    ("pallas_tpu", 1, 40, 2, 3, 5, 16, True, 16, 16, jnp.float32),
    ("pallas_tpu", 1, 24, 2, 2, 8, 16, False, 16, 16, jnp.float32),
    ("pallas_tpu", 1, 40, 2, 1, 0, 16, True, 16, 16, jnp.bfloat16),
]


@pytest.mark.parametrize("impl,b,t,hk,g,s,d,causal,block_q,block_k,dtype", KERNEL_CASES)
def test_kernel_matches_reference(impl, b, t, hk, g, s, d, causal, block_q, block_k, dtype):
  args, do = _inputs(b, t, hk, g, s, d, dtype)
  fn = lambda *a: moda_attention(*a, causal=causal, impl=impl, block_q=block_q, block_k=block_k)
  got = _value_and_grads(fn, args, do)
  _check(got, _oracle(args, do, causal), dtype)
  assert got[0].dtype == dtype


def test_kernel_without_depth_is_causal_flash_attention():
  """S = 0 (zero-size depth arrays) equals jax.nn.dot_product_attention on repeated KV heads."""
  args, _ = _inputs(1, 24, 2, 3, 0, 16, jnp.float32)
  q, k, v, kd, vd = args
  want, got, flash = jax.jit(lambda q, k, v, kd, vd: (
      jax.nn.dot_product_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2),
                                   is_causal=True),
      moda_attention(q, k, v, kd, vd, impl="pallas", block_q=16, block_k=16),
      flash_attention(q, k, v, impl="pallas", block_q=16, block_k=16)))(q, k, v, kd, vd)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(flash, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_reference_without_depth_is_causal_attention(g):
  args, _ = _inputs(2, 12, 2, g, 0, 8, jnp.float32)
  q, k, v, _, _ = args
  want, ref, xla = jax.jit(lambda q, k, v: (
      jax.nn.dot_product_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2),
                                   is_causal=True),
      moda_reference(q, k, v, precision=HIGHEST),
      moda_attention(q, k, v, impl="xla")))(q, k, v)
  np.testing.assert_allclose(ref, want, atol=1e-5)
  np.testing.assert_allclose(xla, want, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_attention_over_union_of_keys(causal):
  """Brute force (digest 7, test 2): full attention over [t sequence keys; t*S depth keys] with
  a mask that shows query t the keys u <= t and the depth keys of position t only."""
  b, t, hk, g, s, d = 1, 7, 2, 2, 3, 8
  (q, k, v, kd, vd), _ = _inputs(b, t, hk, g, s, d, jnp.float32)
  tq, u = np.arange(t)[:, None], np.arange(t)[None, :]
  seq_mask = (u <= tq) if causal else np.ones((t, t), bool)
  depth_mask = np.arange(t * s)[None, :] // s == tq
  mask = jnp.asarray(np.concatenate([seq_mask, depth_mask], axis=1))[None, None]

  @jax.jit
  def both(q, k, v, kd, vd):
    keys = jnp.concatenate([k, kd.reshape(b, t * s, hk, d)], axis=1)      # [b, t + t*s, hk, d]
    vals = jnp.concatenate([v, vd.reshape(b, t * s, hk, d)], axis=1)
    want = jax.nn.dot_product_attention(q, jnp.repeat(keys, g, axis=2),
                                        jnp.repeat(vals, g, axis=2), mask=mask)
    return want, moda_reference(q, k, v, kd, vd, causal=causal, precision=HIGHEST)

  want, got = both(q, k, v, kd, vd)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_depth_kv_reaches_only_its_own_position():
  """Changing one position's depth KV changes only that position's outputs (digest 7, test 5)."""
  (q, k, v, kd, vd), _ = _inputs(1, 9, 1, 2, 4, 8, jnp.float32)
  base, moved = jax.jit(lambda q, k, v, kd, vd: (
      moda_reference(q, k, v, kd, vd),
      moda_reference(q, k, v, kd.at[:, 5].add(1.0), vd.at[:, 5].add(1.0))))(q, k, v, kd, vd)
  changed = np.any(np.asarray(base != moved), axis=(0, 2, 3))
  assert changed.tolist() == [i == 5 for i in range(9)]


def test_default_scale_and_explicit_scale_agree():
  (q, k, v, kd, vd), _ = _inputs(1, 5, 1, 1, 2, 16, jnp.float32)
  a, b = jax.jit(lambda *x: (moda_reference(*x),
                             moda_reference(*x, sm_scale=1 / math.sqrt(16))))(q, k, v, kd, vd)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shapes,match", [
    (((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16), None), "multiple of KV heads"),
    (((1, 8, 4, 16), (1, 6, 2, 16), (1, 6, 2, 16), None), "does not match"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 8), None), "shapes differ"),
    (((8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), None), "must be"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 3, 4, 16)), "depth_k/depth_v"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), (1, 7, 3, 2, 16)), "depth_k/depth_v"),
])
def test_bad_shapes_raise(shapes, match):
  qs, ks, vs, ds = shapes
  z = lambda shape: jnp.zeros(shape, jnp.float32)
  depth = (z(ds), z(ds)) if ds else (None, None)
  for impl in ("xla", "pallas"):
    with pytest.raises(ValueError, match=match):
      moda_attention(z(qs), z(ks), z(vs), *depth, impl=impl)


def test_bad_arguments_raise():
  z = lambda shape: jnp.zeros(shape, jnp.float32)
  q, k, d = z((1, 8, 2, 16)), z((1, 8, 1, 16)), z((1, 8, 2, 1, 16))
  with pytest.raises(ValueError, match="both be given"):
    moda_attention(q, k, k, d, None)
  with pytest.raises(ValueError, match="valid: " + ", ".join(IMPLS)):
    moda_attention(q, k, k, impl="triton")
  with pytest.raises(ValueError, match="one dtype"):
    moda_attention(q, k, k.astype(jnp.bfloat16), impl="pallas")
  with pytest.raises(ValueError, match="power of two"):
    moda_attention(q, k, k, impl="pallas_gpu", block_k=24)
  with pytest.raises(ValueError, match="multiple of 8"):
    moda_attention(q, k, k, impl="pallas_tpu", block_k=12)


def test_bench_runs():
  """The bench's code path at a tiny size, with the reference standing in for the kernels (the
  interpret-mode kernels would make this test slow; `bench --quick` runs them)."""
  args = ["--seq", "16", "--heads", "2", "--kv_heads", "1", "--head_dim", "8", "--slots", "2",
          "--dtype", "float32", "--runs", "1", "--impl", "xla"]
  rows = {line.split(" | ")[1]: line for line in bench.main(args).splitlines()
          if line.startswith("| 16 |")}
  assert sorted(rows) == ["cudnn", "flash", "moda", "xla_dpa", "xla_ref"]
  assert all("unavailable" not in rows[name] for name in ("moda", "flash", "xla_dpa", "xla_ref"))
  # cuDNN takes no fp32 (nor any CPU): the row says why, and the bench went on
  assert "unavailable: " in rows["cudnn"]
  # XLA rows whose [t, t] logits exceed the budget are skipped with the reason
  rows = bench.main(args + ["--ref_budget_gib", "1e-9"]).splitlines()
  assert sum("skipped: its [t, t] logits need" in line for line in rows) == 2
