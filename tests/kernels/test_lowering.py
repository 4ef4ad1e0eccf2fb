"""The kernels lower for the devices they are written for, from any machine.

Interpret mode (the other kernel tests on CPU) runs a kernel's jaxpr with XLA and never meets
the Triton or Mosaic lowering, so a kernel can pass every CPU test and still fail to compile on
its device: the first GPU run found the MoDA backward failing for non-causal attention (a
boolean reaching integer arithmetic in Triton's lowering, `AssertionError: ('i1', 'i32')`).
`jit(...).trace(...).lower(lowering_platforms=(...))` runs that lowering on this machine: each
GPU kernel (forward and backward, each mask mode, fp32 and bf16) lowers for CUDA, and the MoDA
TPU kernel for TPU. The TPU kernels of sparse prefill and memory lookup query the TPU
generation while lowering, so they lower only on a TPU. Lowering is not compiling: Triton's
own compile to PTX still happens on the GPU (bench/kernel_check.sh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kernels_pallas.memory_lookup as memory_lookup
from kernels_pallas.moda import gpu as moda_gpu
from kernels_pallas.moda import tpu as moda_tpu
from kernels_pallas.sparse_prefill import gpu as prefill_gpu


def _lowers(fn, args, platform: str) -> None:
  jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def _grads(fn, n: int):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(n)))


def _moda_args(dtype, slots=8):
  z = lambda *shape: jnp.zeros(shape, dtype)
  # 2 query heads per KV head, 40 positions over 8-position tiles and 16-key blocks: ragged
  return z(2, 40, 2, 16), z(2, 40, 1, 16), z(2, 40, 1, 16), z(2, 40, slots, 1, 16), \
      z(2, 40, slots, 1, 16)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("platform,kernel", [("cuda", moda_gpu.moda_attention_gpu),
                                             ("tpu", moda_tpu.moda_attention_tpu)])
def test_moda_lowers_forward_and_backward(platform, kernel, dtype, causal):
  fn = lambda *a: kernel(*a, causal=causal, block_q=8, block_k=16, interpret=False)
  args = _moda_args(dtype)
  _lowers(fn, args, platform)
  _lowers(_grads(fn, 5), args, platform)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_lowers_for_cuda(causal):
  """No depth slots: the plain flash attention path of the same kernels."""
  fn = lambda q, k, v: moda_gpu.moda_attention_gpu(q, k, v, None, None, causal=causal,
                                                    block_q=8, block_k=16, interpret=False)
  args = _moda_args(jnp.bfloat16)[:3]
  _lowers(fn, args, "cuda")
  _lowers(_grads(fn, 3), args, "cuda")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_prefill_kernels_lower_for_cuda(dtype):
  q, k = jnp.zeros((1, 200, 4, 64), dtype), jnp.zeros((1, 200, 2, 64), dtype)
  nb = 4                                                     # 200 tokens in blocks of 64
  idx, cnt = jnp.zeros((1, 4, nb, nb), jnp.int32), jnp.ones((1, 4, nb), jnp.int32)
  _lowers(lambda q, k, v, i, c: prefill_gpu.block_sparse_attention(
      q, k, v, i, c, block_size=64, sm_scale=0.125, interpret=False), (q, k, k, idx, cnt), "cuda")
  _lowers(lambda q, k: prefill_gpu.estimate_scores(q, k, block_size=64, sm_scale=0.125,
                                                   interpret=False), (q, k), "cuda")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_memory_lookup_lowers_forward_and_backward_for_cuda(dtype):
  values, weights = jnp.zeros((1000, 96), dtype), jnp.zeros((50, 9), dtype)
  indices = jnp.zeros((50, 9), jnp.int32)
  fn = lambda v, w: memory_lookup._kernel_lookup(v, indices, w, "gpu", (None, None), False)
  _lowers(fn, (values, weights), "cuda")
  _lowers(_grads(fn, 2), (values, weights), "cuda")


def test_the_tests_precision_reaches_the_kernels_dots():
  """conftest.py's premise: under the tests' matmul precision, a kernel's fp32 dots are traced
  at HIGHEST (Triton lowers that to IEEE fp32, not TF32); outside it they are not."""
  args = _moda_args(jnp.float32)[:3]
  fn = lambda q, k, v: moda_gpu.moda_attention_gpu(q, k, v, None, None, causal=True,
                                                    block_q=8, block_k=16, interpret=False)

  def dot_precisions(jaxpr):
    found = set()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(eqn.params["precision"])
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            found |= dot_precisions(inner)
    return found

  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr) == {highest}
  with jax.default_matmul_precision(None):
    assert highest not in dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)
