"""Memory lookup (UltraMem value gather + weighted sum): kernels vs the fp32 reference.

Both kernel styles run in interpret mode on CPU. Oracle: reference.lookup in fp32 at precision
HIGHEST, differentiated by autodiff. Tolerances, the same on every backend (fp32 dots run at
full precision in these tests, conftest.py): fp32 atol = rtol = 1e-5 (values and gradients);
bf16 inputs atol = 5e-2, rtol = 2e-2 against the fp32 oracle on the same (bf16-rounded) inputs:
the output, d_values and d_weights are rounded to bf16 once. The sharded cases need 8 devices
and skip where there are fewer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.memory_lookup import memory_lookup, reference, resolve_impl
from kernels_pallas.memory_lookup import sharded_memory_lookup
from backends import needs_devices, tolerance

# (backend, dtype) -> tolerance of values and gradients; "any": every backend
TOL = {("any", jnp.float32): dict(atol=1e-5, rtol=1e-5),
       ("any", jnp.bfloat16): dict(atol=5e-2, rtol=2e-2)}
# GPU style: dim 45 over blocks of 16 and 21 tokens over blocks of 16 are both ragged. TPU style
# keeps dim whole (its block must be dim or a multiple of 128); 21 tokens over blocks of 8.
BLOCKS = {"pallas_gpu": dict(block_tokens=16, block_dim=16), "pallas_tpu": dict(block_tokens=8)}


def _inputs(num_slots, dim, lead, k, dtype, seed=0):
  """Random inputs with the hard cases built in: a hot slot hit by every token (several sort
  chunks in one slot tile when k >= 6), the same slot twice within each token's k list, and one
  index below and one above the table (clamped)."""
  rng = np.random.default_rng(seed)
  tokens = int(np.prod(lead))
  values = rng.standard_normal((num_slots, dim), np.float32)
  indices = rng.integers(0, num_slots, (tokens, k), np.int32)
  indices[:, :6] = 4                                       # hot slot 4
  if k >= 9:
    indices[:, 7] = indices[:, 8]                          # a slot twice in one token
  indices[1, -1], indices[2, -1] = -5, num_slots + 9
  weights = rng.standard_normal((tokens, k), np.float32) / np.sqrt(k)
  dout = rng.standard_normal((tokens, dim), np.float32)
  values, weights, dout = (jnp.asarray(x, dtype) for x in (values, weights, dout))
  indices = jnp.asarray(indices)
  shape = (*lead, k)
  return (values, indices.reshape(shape), weights.reshape(shape),
          dout.reshape(*lead, dim))


def _oracle(values, indices, weights, dout):
  """fp32 reference.lookup (precision HIGHEST) and its autodiff gradients, on flat tokens."""
  f32 = lambda x: x.astype(jnp.float32)
  k, dim = indices.shape[-1], values.shape[1]
  idx, w, g = indices.reshape(-1, k), f32(weights).reshape(-1, k), f32(dout).reshape(-1, dim)
  out, vjp = jax.vjp(lambda v, w: reference.lookup(v, idx, w), f32(values), w)
  dv, dw = vjp(g)
  return out.reshape(dout.shape), dv, dw.reshape(weights.shape)


@functools.lru_cache(maxsize=None)
def _fwd_bwd(impl, blocks):
  """(out, d_values, d_weights), jitted once per impl so interpret mode compiles once."""

  @jax.jit
  def fwd_bwd(values, indices, weights, dout):
    out, vjp = jax.vjp(lambda v, w: memory_lookup(v, indices, w, impl=impl, **dict(blocks)),
                       values, weights)
    return (out, *vjp(dout))

  return fwd_bwd


def _run(impl, values, indices, weights, dout, **blocks):
  return _fwd_bwd(impl, tuple(sorted(blocks.items())))(values, indices, weights, dout)


def _assert_close(got, want, dtype):
  for name, g, w in zip(("out", "d_values", "d_weights"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=name, **tolerance(TOL, dtype))


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("k", [1, 16, 64])
def test_kernel_matches_reference_fp32(impl, k):
  args = _inputs(37, 45, (3, 7), k, jnp.float32, seed=k)
  got = _run(impl, *args, **BLOCKS[impl])
  assert got[0].shape == (3, 7, 45) and got[0].dtype == jnp.float32
  _assert_close(got, _oracle(*args), jnp.float32)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu", "xla"])
def test_kernel_matches_reference_bf16(impl):
  args = _inputs(37, 45, (3, 7), 16, jnp.bfloat16, seed=3)
  got = _run(impl, *args, **BLOCKS.get(impl, {}))
  assert all(g.dtype == jnp.bfloat16 for g in got)
  _assert_close(got, _oracle(*args), jnp.bfloat16)


def test_xla_impl_backward_and_determinism():
  """impl="xla" has its own VJP (gather-dot, `.at[].add`); kernels' dV is bit-reproducible."""
  args = _inputs(37, 45, (3, 7), 16, jnp.float32, seed=1)
  _assert_close(_run("xla", *args), _oracle(*args), jnp.float32)
  first = _run("pallas_gpu", *args, **BLOCKS["pallas_gpu"])[1]
  np.testing.assert_array_equal(np.asarray(first),
                                np.asarray(_run("pallas_gpu", *args, **BLOCKS["pallas_gpu"])[1]))


def test_bad_arguments_raise():
  v, i, w, _ = _inputs(8, 16, (4,), 2, jnp.float32)
  with pytest.raises(ValueError, match="values must be"):
    memory_lookup(v[0], i, w)
  with pytest.raises(ValueError, match="one shape"):
    memory_lookup(v, i, w[:, :1])
  with pytest.raises(ValueError, match="integers"):
    memory_lookup(v, w, w)
  with pytest.raises(ValueError, match="k >= 1"):
    memory_lookup(v, i[:, :0], w[:, :0])
  with pytest.raises(ValueError, match="unknown memory_lookup impl"):
    memory_lookup(v, i, w, impl="cuda")
  with pytest.raises(ValueError, match="block_dim"):
    memory_lookup(jnp.zeros((8, 256)), i, w, impl="pallas_tpu", block_dim=96)
  on_cpu = jax.default_backend() == "cpu"
  assert resolve_impl("auto") == ("xla" if on_cpu else resolve_impl("pallas"))


def _mesh(kind):
  from research.sharding import MESH_AXES, make_mesh
  if kind == "data2_fsdp4":                      # tokens split over data, slots over fsdp
    return jax.make_mesh((2, 4, 1, 1), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
  return make_mesh("fsdp_tp", tensor=2)          # slots over (fsdp, tensor) = 4 x 2


@needs_devices(8)
@pytest.mark.parametrize("mesh_kind,impl", [("fsdp_tp", "xla"), ("data2_fsdp4", "pallas")])
def test_sharded_equals_unsharded(mesh_kind, impl):
  mesh = _mesh(mesh_kind)
  args = _inputs(64, 24, (2, 6), 9, jnp.float32, seed=4)   # hot slot 4: one device owns it
  f = jax.jit(lambda v, i, w: sharded_memory_lookup(v, i, w, mesh=mesh, impl=impl))
  out, vjp = jax.vjp(lambda v, w: f(v, args[1], w), args[0], args[2])
  _assert_close((out, *vjp(args[3])), _oracle(*args), jnp.float32)
  values, indices, weights, _ = args
  with pytest.raises(ValueError, match="does not divide"):
    sharded_memory_lookup(values[:62], indices, weights, mesh=mesh)


def test_bench_quick_runs():
  from kernels_pallas.memory_lookup import bench
  rows = bench.run(quick=True, impls=("pallas_gpu",), repeats=1)
  assert rows and all(r["ms"] > 0 for r in rows)
  assert "GB/s" in bench.table(rows)
