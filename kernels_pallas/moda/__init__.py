"""Mixture-of-depths attention (MoDA; Zhu et al. 2026, arXiv 2603.15619).

  from kernels_pallas.moda import moda_attention
  out = moda_attention(q, k, v, depth_k, depth_v, causal=True)

q: [b, t, hq, d]; k, v: [b, t, hk, d] with hq = hk * g (query head h uses KV head h // g);
depth_k, depth_v: [b, t, s, hk, d]. Query (t, h) attends with one softmax over the sequence keys
k[u, h // g] (u <= t when causal) and the s depth keys depth_k[t, :, h // g] of its own position
(reference.py has the equations). Returns [b, t, hq, d] in q.dtype.
"""

from __future__ import annotations

import jax

from kernels_pallas.moda.reference import check_shapes, moda_reference

IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")

__all__ = ["IMPLS", "flash_attention", "moda_attention", "moda_reference"]


def _backend() -> str:
  return jax.default_backend()


def moda_attention(q, k, v, depth_k=None, depth_v=None, *, causal: bool = True,
                   sm_scale: float | None = None, impl: str = "auto", block_q: int | None = None,
                   block_k: int | None = None) -> jax.Array:
  """MoDA attention: one softmax over causal sequence keys and same-position depth keys.

  impl: "xla" the jnp reference; "pallas" the kernel of the current backend (gpu.py on GPU,
  tpu.py on TPU, the GPU-style kernel in interpret mode on CPU); "pallas_gpu" / "pallas_tpu"
  force one kernel style (interpret mode off its device); "auto" the kernel on GPU/TPU and the
  reference on CPU. block_q counts query positions per tile (a tile holds block_q * g folded
  rows), block_k keys per block; the defaults are untuned (no GPU/TPU was available to measure).
  depth_k=None or s == 0 is plain (causal) GQA attention.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown impl '{impl}' (valid: {', '.join(IMPLS)})")
  check_shapes(q, k, v, depth_k, depth_v)
  backend = _backend()
  if impl == "auto":
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
  elif impl == "pallas":
    impl = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
  if impl == "xla":
    return moda_reference(q, k, v, depth_k, depth_v, causal=causal, sm_scale=sm_scale)
  dtypes = {x.dtype for x in (q, k, v, depth_k, depth_v) if x is not None}
  if len(dtypes) > 1:
    raise ValueError(f"the MoDA kernels need one dtype for q, k, v and the depth cache; got "
                     f"{sorted(str(x) for x in dtypes)}")
  if impl == "pallas_gpu":
    from kernels_pallas.moda import gpu  # pylint: disable=import-outside-toplevel
    return gpu.moda_attention_gpu(q, k, v, depth_k, depth_v, causal=causal, sm_scale=sm_scale,
                                  block_q=block_q, block_k=block_k, interpret=backend != "gpu")
  from kernels_pallas.moda import tpu  # pylint: disable=import-outside-toplevel
  return tpu.moda_attention_tpu(q, k, v, depth_k, depth_v, causal=causal, sm_scale=sm_scale,
                                block_q=block_q, block_k=block_k, interpret=backend != "tpu")


def flash_attention(q, k, v, *, causal: bool = True, sm_scale: float | None = None,
                    impl: str = "auto", block_q: int | None = None,
                    block_k: int | None = None) -> jax.Array:
  """Plain (causal) GQA flash attention: the same kernels with no depth slots (s = 0)."""
  return moda_attention(q, k, v, None, None, causal=causal, sm_scale=sm_scale, impl=impl,
                        block_q=block_q, block_k=block_k)
