"""FlexPrefill: context-aware block-sparse attention for long prefill (Lai et al., ICLR 2025).

  from kernels_pallas.sparse_prefill import (flexprefill_attention, select_blocks,
      block_sparse_attention, dense_causal_attention)

select_blocks decides each query head's pattern (query-aware vs vertical-slash by the JS
distance against tau) and lists the key blocks each query block attends (cumulative attention
gamma, min/max budget); block_sparse_attention computes causal attention over those blocks
only; flexprefill_attention does both. Inference only: there is no backward.

impl: "xla" (reference.py), "pallas" (the kernel of the current backend: gpu.py on GPU,
tpu.py on TPU, the GPU-style kernel in interpret mode on CPU), "pallas_gpu" / "pallas_tpu"
(force a style; interpret mode off its own backend), "auto" (kernel on GPU/TPU, reference on
CPU). The selection itself is XLA (estimate_impl="xla") or uses the Pallas estimate kernel
(estimate_impl="pallas", the two-pass estimate kernel in gpu.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.sparse_prefill import gpu, reference, tpu
from kernels_pallas.sparse_prefill.reference import (BlockSelection, full_causal_selection,
                                                     indices_to_mask, mask_to_indices)

IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")
DENSE_IMPLS = ("auto", "xla", "jax_nn", "cudnn")
ESTIMATE_IMPLS = ("xla", "pallas")

__all__ = ["BlockSelection", "block_sparse_attention", "dense_causal_attention",
           "flexprefill_attention", "full_causal_selection", "indices_to_mask",
           "mask_to_indices", "select_blocks", "IMPLS"]


# The reference under jit: one compilation instead of op-by-op dispatch.
_SELECT_STATIC = ("block_size", "min_budget", "max_budget", "mode", "budget", "count_rule",
                  "max_blocks", "sm_scale", "with_query_aware")
_select_xla = jax.jit(reference.select_blocks_traced, static_argnames=_SELECT_STATIC)
_block_sparse_xla = jax.jit(reference.block_sparse_attention,
                            static_argnames=("block_size", "sm_scale"))
_dense_xla = jax.jit(reference.dense_causal_attention, static_argnames=("sm_scale",))


def _backend() -> str:
  return jax.default_backend()


def _gpu_fits(d: int) -> bool:
  return d >= 16 and not d & (d - 1)


def resolve_impl(impl: str, head_dim: int) -> tuple[str, bool]:
  """Maps impl to ("xla" | "gpu" | "tpu", interpret)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
  backend = _backend()
  if impl == "auto":
    if backend == "gpu" and _gpu_fits(head_dim):
      return "gpu", False
    if backend == "tpu":
      return "tpu", False
    return "xla", False
  if impl == "xla":
    return "xla", False
  if impl == "pallas":
    impl = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
  if impl == "pallas_gpu":
    if not _gpu_fits(head_dim):
      raise ValueError(f"the GPU kernel needs head_dim a power of two >= 16, got {head_dim}")
    return "gpu", backend != "gpu"
  return "tpu", backend != "tpu"


def _trim_width(indices, counts):
  """With concrete counts, drop list columns past max(counts) (rounded up to 8): the TPU grid
  has one step per column. Under jit the full width is kept."""
  if isinstance(counts, jax.core.Tracer) or isinstance(indices, jax.core.Tracer):
    return indices
  width = max(1, int(jnp.max(counts)))
  width = min(indices.shape[-1], -(-width // 8) * 8)
  return indices[..., :width]


def block_sparse_attention(q, k, v, indices, counts, *, block_size: int, sm_scale=None,
                           impl: str = "auto"):
  """Causal attention of each query block over only its listed key blocks (§3.5).

  q [B, T, Hq, d]; k, v [B, T, Hk, d]; indices [B, Hq, ceil(T / block_size), m] int32 key
  block ids (entries past counts are ignored); counts [B, Hq, nQB]. The elementwise causal
  mask is applied inside each block; rows with no visible listed key return 0. Returns
  [B, T, Hq, d] in q's dtype. Forward only.
  """
  reference.check_qkv(q, k, v)
  reference.check_block_size(block_size)
  reference.check_indices(q, indices, counts, block_size)
  kind, interpret = resolve_impl(impl, q.shape[-1])
  if kind == "xla":
    return _block_sparse_xla(q, k, v, indices, counts, block_size=block_size,
                             sm_scale=sm_scale)
  scale = reference._scale(q.shape[-1], sm_scale)
  if kind == "gpu":
    return gpu.block_sparse_attention(q, k, v, indices, counts, block_size=block_size,
                                      sm_scale=scale, interpret=interpret)
  return tpu.block_sparse_attention(q, k, v, _trim_width(indices, counts), counts,
                                    block_size=block_size, sm_scale=scale, interpret=interpret)


def select_blocks(q, k, *, gamma: float = 0.9, tau: float = 0.1, block_size: int = 64,
                  min_budget: int = 1024, max_budget: int | None = None, mode: str = "flex",
                  budget: int | None = None, count_rule: str = "block",
                  max_blocks: int | None = None, sm_scale=None,
                  estimate_impl: str = "xla") -> BlockSelection:
  """Pattern decision and block lists per query head; see reference.select_blocks.

  estimate_impl: "xla" computes the representative attention in fused XLA; "pallas" uses the
  Pallas estimate kernel (gpu.estimate_scores, interpret mode off GPU), which pools inside
  the kernel and does not support count_rule="token".
  """
  if estimate_impl not in ESTIMATE_IMPLS:
    raise ValueError(f"estimate_impl must be one of {', '.join(ESTIMATE_IMPLS)}; "
                     f"got {estimate_impl!r}")
  estimate = None
  if estimate_impl == "pallas":
    reference.check_qkv(q, k)
    reference.check_block_size(block_size)
    if count_rule == "token":
      raise ValueError("count_rule='token' needs token-level scores; use estimate_impl='xla'")
    if not _gpu_fits(q.shape[-1]):
      raise ValueError(f"the estimate kernel needs head_dim a power of two >= 16, "
                       f"got {q.shape[-1]}")
    estimate = gpu.estimate_scores(q, k, block_size=block_size,
                                   sm_scale=reference._scale(q.shape[-1], sm_scale),
                                   interpret=_backend() != "gpu")
  reference.check_selection_args(gamma, tau, min_budget, max_budget, mode, budget, count_rule,
                                 max_blocks)
  reference.check_qkv(q, k)
  reference.check_block_size(block_size)
  return _select_xla(q, k, jnp.float32(gamma), jnp.float32(tau), block_size=block_size,
                     min_budget=min_budget, max_budget=max_budget, mode=mode, budget=budget,
                     count_rule=count_rule, max_blocks=max_blocks, sm_scale=sm_scale,
                     with_query_aware=mode == "query_aware" or (mode == "flex" and tau > 0.0),
                     estimate=estimate)


def flexprefill_attention(q, k, v, *, gamma: float = 0.9, tau: float = 0.1,
                          block_size: int = 64, min_budget: int = 1024,
                          max_budget: int | None = None, mode: str = "flex",
                          budget: int | None = None, count_rule: str = "block",
                          max_blocks: int | None = None, sm_scale=None, impl: str = "auto",
                          estimate_impl: str = "xla", return_selection: bool = False):
  """FlexPrefill causal prefill attention: select_blocks, then block_sparse_attention.

  q [B, T, Hq, d] (after RoPE); k, v [B, T, Hk, d]. Returns out [B, T, Hq, d], or
  (out, BlockSelection) with return_selection=True. No silent dense fallback for short
  prompts (pitfall 10): a short prompt simply selects (nearly) every block.
  """
  reference.check_qkv(q, k, v)
  resolve_impl(impl, q.shape[-1])  # reject a bad impl before the selection work
  sel = select_blocks(q, k, gamma=gamma, tau=tau, block_size=block_size,
                      min_budget=min_budget, max_budget=max_budget, mode=mode, budget=budget,
                      count_rule=count_rule, max_blocks=max_blocks, sm_scale=sm_scale,
                      estimate_impl=estimate_impl)
  out = block_sparse_attention(q, k, v, sel.indices, sel.counts, block_size=block_size,
                               sm_scale=sm_scale, impl=impl)
  return (out, sel) if return_selection else out


def dense_causal_attention(q, k, v, *, sm_scale=None, impl: str = "auto"):
  """Dense causal attention, the comparison baseline. impl: "xla" (reference.py, fp32
  softmax), "jax_nn" (jax.nn.dot_product_attention with is_causal=True, jax's choice of
  implementation), "cudnn" (the same forced to cuDNN's flash attention: NVIDIA GPUs, bf16 /
  fp16 only), "auto" (jax_nn on GPU/TPU, xla on CPU)."""
  reference.check_qkv(q, k, v)
  if impl not in DENSE_IMPLS:
    raise ValueError(f"impl must be one of {', '.join(DENSE_IMPLS)}; got {impl!r}")
  if impl == "xla" or (impl == "auto" and _backend() == "cpu"):
    return _dense_xla(q, k, v, sm_scale=sm_scale)
  return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True,
                                      implementation="cudnn" if impl == "cudnn" else None)
