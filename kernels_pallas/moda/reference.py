"""Mixture-of-depths attention (MoDA) in plain jnp: the definition, test oracle and CPU path.

Zhu et al. 2026, "Mixture-of-Depths Attention" (arXiv 2603.15619), sec. 2.2 and the digest's
sections 3.3-3.4. Query head h at position t sees, under ONE softmax with one scale,
  * the sequence keys k[u, h // G] of its layer for u <= t (every u when causal=False), and
  * the S depth keys depth_k[t, i, h // G] written at its own position t by earlier sublayers:

  s_seq(u) = <q[t, h], k[u, j]> * scale,         s_dep(i) = <q[t, h], depth_k[t, i, j]> * scale
  [p_seq; p_dep] = softmax([s_seq; s_dep])
  o[t, h] = sum_u p_seq(u) v[u, j] + sum_i p_dep(i) depth_v[t, i, j],        j = h // G.

Depth slots carry no positional signal. S = 0 (or depth_k=None) is plain (causal) attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_shapes(q, k, v, depth_k, depth_v) -> int:
  """Validates the MoDA operand shapes and returns S, the number of depth slots (0 if none).

  q: [b, t, hq, d]; k, v: [b, t, hk, d] with hq = hk * g; depth_k, depth_v: [b, t, s, hk, d].
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
    raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape} in batch, seq or "
                     "head_dim (MoDA is self-attention: q and k have the same length)")
  hk = k.shape[2]
  if hk == 0 or hq % hk:
    raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
  if (depth_k is None) != (depth_v is None):
    raise ValueError("depth_k and depth_v must both be given or both be None")
  if depth_k is None:
    return 0
  if depth_k.shape != depth_v.shape:
    raise ValueError(f"depth_k and depth_v shapes differ: {depth_k.shape} vs {depth_v.shape}")
  if depth_k.ndim != 5 or depth_k.shape[:2] != (b, t) or depth_k.shape[3:] != (hk, d):
    raise ValueError(f"depth_k/depth_v must be [batch, seq, slots, kv_heads, head_dim] = "
                     f"[{b}, {t}, S, {hk}, {d}]; got {depth_k.shape}")
  return depth_k.shape[2]


def moda_reference(q, k, v, depth_k=None, depth_v=None, *, causal: bool = True,
                   sm_scale: float | None = None, precision=None) -> jax.Array:
  """MoDA attention (digest eq. of sec. 3.4) with logits and softmax in fp32.

  q: [b, t, hq, d]; k, v: [b, t, hk, d]; depth_k, depth_v: [b, t, s, hk, d] or None.
  Query head h uses KV head h // g (consecutive query heads share a KV head, as in
  research/model/attention.py:xla_attention). Returns [b, t, hq, d] in q.dtype.
  """
  s = check_shapes(q, k, v, depth_k, depth_v)
  b, t, hq, d = q.shape
  hk = k.shape[2]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  qg = q.reshape(b, t, hk, hq // hk, d)                                  # [b, t, hk, g, d]
  logits = jnp.einsum("btkgd,bukd->bkgtu", qg, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale        # [b, hk, g, t, t]
  if causal:
    mask = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]              # [t(query), u(key)]
    logits = jnp.where(mask[None, None, None], logits, -jnp.inf)
  if s:
    depth_logits = jnp.einsum("btkgd,btikd->bkgti", qg, depth_k, precision=precision,
                              preferred_element_type=jnp.float32) * scale  # [b, hk, g, t, s]
    logits = jnp.concatenate([logits, depth_logits], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)                               # one normalizer
  probs = probs.astype(v.dtype)                                         # as xla_attention
  out = jnp.einsum("bkgtu,bukd->btkgd", probs[..., :t], v, precision=precision,
                   preferred_element_type=jnp.float32)
  if s:
    out = out + jnp.einsum("bkgti,btikd->btkgd", probs[..., t:], depth_v, precision=precision,
                           preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)
