"""Memory-layer value lookup (UltraMem / UltraMemV2): out[t] = sum_j w[t, j] * V[i[t, j]].

Public API:
  memory_lookup(values, indices, weights, *, impl="auto", block_tokens=None, block_dim=None)
  sharded_memory_lookup(values, indices, weights, *, mesh, slot_axes=("fsdp", "tensor"),
                        token_axes=("data",), impl="auto")

impl: "xla" (reference.py, gather + einsum; backward gather-dot + `.at[].add`), "pallas" (the
kernel of the current backend: gpu.py on GPU, tpu.py on TPU, the GPU-style kernel in interpret
mode on CPU), "pallas_gpu" / "pallas_tpu" (force one kernel style; interpret mode off its own
backend), "auto" (the kernel on GPU/TPU, the reference on CPU).

Out-of-range indices are clamped to [0, num_slots - 1] by every impl (they are traced values and
cannot be validated); the clamped row receives their gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.memory_lookup import _compat
from kernels_pallas.memory_lookup import gpu
from kernels_pallas.memory_lookup import reference
from kernels_pallas.memory_lookup import tpu

IMPLS = ("auto", "xla", "pallas", "pallas_gpu", "pallas_tpu")

__all__ = ["memory_lookup", "sharded_memory_lookup", "IMPLS"]


def _check(values, indices, weights):
  if values.ndim != 2:
    raise ValueError(f"values must be [num_slots, dim], got shape {values.shape}")
  if values.shape[0] < 1 or values.shape[1] < 1:
    raise ValueError(f"values must have at least one slot and one column, got {values.shape}")
  if indices.ndim < 1 or indices.shape[-1] < 1:
    raise ValueError(f"indices must be [..., k] with k >= 1, got shape {indices.shape}")
  if indices.shape != weights.shape:
    raise ValueError(f"indices {indices.shape} and weights {weights.shape} must have one shape")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices.dtype}")
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f"weights must be floating point, got {weights.dtype}")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"values must be floating point, got {values.dtype}")


def resolve_impl(impl: str) -> str:
  """Maps impl to one of "xla", "gpu", "tpu" (the kernel style that will run)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown memory_lookup impl '{impl}' (choose one of {', '.join(IMPLS)})")
  backend = jax.default_backend()
  if impl == "xla" or (impl == "auto" and backend not in ("gpu", "tpu")):
    return "xla"
  if impl in ("pallas_gpu", "pallas_tpu"):
    return impl.removeprefix("pallas_")
  return "tpu" if backend == "tpu" else "gpu"


@jax.custom_vjp
def _xla_lookup(values, indices, weights):
  return reference.lookup(values, indices, weights)


def _xla_fwd(values, indices, weights):
  return reference.lookup(values, indices, weights), (values, indices, weights)


def _xla_bwd(res, dout):
  values, indices, weights = res
  dw = reference.lookup_bwd_weights(values, indices, dout)
  dv = reference.lookup_bwd_values(values.shape[0], indices, weights, dout)
  return dv.astype(values.dtype), None, dw.astype(weights.dtype)


_xla_lookup.defvjp(_xla_fwd, _xla_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_lookup(values, indices, weights, style, blocks, interpret):
  return _kernel_fwd(values, indices, weights, style, blocks, interpret)[0]


def _kernel_fwd(values, indices, weights, style, blocks, interpret):
  mod = gpu if style == "gpu" else tpu
  block_tokens, block_dim = blocks
  out = mod.lookup_fwd(values, indices, weights, block_tokens=block_tokens,
                       block_dim=block_dim, interpret=interpret)
  return out, (values, indices, weights)


def _kernel_bwd(style, blocks, interpret, res, dout):
  values, indices, weights = res
  mod = gpu if style == "gpu" else tpu
  block_tokens, block_dim = blocks
  dw = mod.lookup_bwd_weights(values, indices, dout, block_tokens=block_tokens,
                              block_dim=block_dim, interpret=interpret)
  dv = mod.lookup_bwd_values(values.shape[0], indices, weights, dout, block_dim=block_dim,
                             out_dtype=values.dtype, interpret=interpret)
  return dv, None, dw.astype(weights.dtype)


_kernel_lookup.defvjp(_kernel_fwd, _kernel_bwd)


def memory_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  impl: str = "auto", block_tokens: int | None = None,
                  block_dim: int | None = None) -> jax.Array:
  """out[..., :] = sum_j weights[..., j] * values[indices[..., j]] (UltraMem §3.5 value lookup).

  values [num_slots, dim]; indices, weights [..., k]; out [..., dim] in values.dtype, accumulated
  in fp32. Differentiable in values and weights (custom VJP: gather-dot for the weights, a
  deterministic scatter-add for the table). Block sizes are untuned defaults when None.
  """
  _check(values, indices, weights)
  style = resolve_impl(impl)
  lead, k = indices.shape[:-1], indices.shape[-1]
  idx = reference.clip_indices(indices.reshape(-1, k), values.shape[0])   # [T, k]
  w = weights.reshape(-1, k)
  if idx.shape[0] == 0:
    return jnp.zeros((*lead, values.shape[1]), values.dtype)
  if style == "xla":
    out = _xla_lookup(values, idx, w)
  else:
    out = _kernel_lookup(values, idx, w, style, (block_tokens, block_dim),
                         _compat.interpret_default(style))
  return out.reshape(*lead, values.shape[1])


from kernels_pallas.memory_lookup.sharded import sharded_memory_lookup  # noqa: E402
