"""Softmax attention on CPU by the compiled kernel of attention.cc, forward and backward.

`attention(q, k, v, causal=)` computes softmax(q k^T / sqrt(d) + mask) v for q [..., t, h, d]
and k, v [..., s, kv, d] (h a multiple of kv: grouped-query attention), float32, any leading
dims; the causal mask lets query i see keys j <= i. The forward saves the log-sum-exp of each
score row and the backward recomputes the probabilities from it (a jax.custom_vjp). Under vmap
the leading dims grow (vmap_method="broadcast_all"); the kernel treats them as one batch.
Reverse mode only: the backward is a custom call with no derivative of its own, so forward-mode
AD (jvp) and gradients of gradients do not run through it (impl=xla does).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu import build

SOURCE = "attention.cc"
_FORWARD, _BACKWARD = "research_cpu_attention_forward", "research_cpu_attention_backward"
HANDLERS = ((_FORWARD, "AttentionForward"), (_BACKWARD, "AttentionBackward"))


def unavailable() -> str | None:
  """None when the kernel's library builds and loads on this machine, else why not."""
  return build.available(SOURCE, HANDLERS)


def unsupported(q, k, v, *, causal: bool) -> str | None:
  """Why these operands are outside what the kernel computes, or None."""
  if not q.dtype == k.dtype == v.dtype == jnp.float32:
    return f"it computes in float32 (got {q.dtype}, {k.dtype}, {v.dtype})"
  if q.ndim < 3 or q.ndim != k.ndim or k.shape != v.shape or q.shape[:-3] != k.shape[:-3] or \
      q.shape[-1] != k.shape[-1]:
    return f"q {q.shape}, k {k.shape}, v {v.shape} are not [..., t, h, d], [..., s, kv, d] twice"
  if 0 in q.shape[-2:] or 0 in k.shape[-2:]:
    return f"q {q.shape} or k {k.shape} has no heads or a head width of 0"
  if q.shape[-2] % k.shape[-2]:
    return f"{q.shape[-2]} query heads do not divide into {k.shape[-2]} key heads"
  if k.shape[-3] == 0:
    return "there are no keys"
  if causal and q.shape[-3] != k.shape[-3]:
    return f"its causal mask needs as many queries as keys (got {q.shape[-3]} and {k.shape[-3]})"
  return None


def _forward(q, k, v, causal: bool):
  lead, (t, h, d) = q.shape[:-3], q.shape[-3:]
  results = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct(lead + (h, t), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, results, vmap_method="broadcast_all")(
      q, k, v, causal=np.int32(causal), scale=np.float32(1 / math.sqrt(d)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, causal):
  return _forward(q, k, v, causal)[0]


def _attention_fwd(q, k, v, causal):
  o, lse = _forward(q, k, v, causal)
  return o, (q, k, v, o, lse)


def _attention_bwd(causal, residuals, do):
  q, k, v, o, lse = residuals
  results = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  return jax.ffi.ffi_call(_BACKWARD, results, vmap_method="broadcast_all")(
      q, k, v, o, lse, do.astype(jnp.float32), causal=np.int32(causal),
      scale=np.float32(1 / math.sqrt(q.shape[-1])))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal: bool = True) -> jax.Array:
  """softmax(q k^T / sqrt(d) + causal mask) v by the CPU kernel (see the module doc). Raises
  KernelBuildError when the kernel cannot be built here and ValueError for operands it does
  not cover (`unsupported`)."""
  why = unsupported(q, k, v, causal=causal)
  if why:
    raise ValueError(f"the CPU attention kernel cannot run these operands: {why}")
  build.load(SOURCE, HANDLERS)
  return _attention(q, k, v, bool(causal))
