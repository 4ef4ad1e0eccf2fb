"""What "a sharded step equals the one-device step" asserts, for every test that compares them.

A mesh sums in another order, so fp32 results differ in their last bits. Two places turn those
bits into more, and a test that asked for 1e-5 everywhere failed on some machines and not others:

- Adam's first update is lr * g / (|g| + eps). Where |g| is near eps its slope is about lr / eps,
  so a gradient off in its last bits moves that parameter by a few percent of one update
  (measured on the recurrent mixers' fsdp x tensor step: 1 of 87,616 elements, 3.7e-5 at lr
  1e-3). A handful of elements per model; a sharding bug (a gradient reduced over one shard only,
  a scale taken per shard) moves the bulk of them.
- A quantized linear rounds its input: an ulp can carry one value across a rounding boundary,
  and that token's logits then move by about one quantization step (measured: one token of 128,
  9e-4, BitLinear on a CI machine). A per-shard quantization scale would move every token.

So the bulk must agree to 1e-5, and the few exceptions are counted and bounded.

Tests that compare two forms of one model (scanned or rematerialized blocks against the
unrolled ones) give both the same parameters with `copy_parameters`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def copy_parameters(unrolled, target):
  """Sets the variables of `target`, a DecoderLM of the same shape, to those of `unrolled`, a
  DecoderLM with unrolled blocks: each block's variables stacked along the layers axis when
  `target` scans its blocks (model.scan_blocks), as they are; and the embedding, final norm
  and head. Returns `target`."""
  blocks = [nnx.state(b) for b in unrolled.blocks]
  if target.scanned:
    nnx.update(target.blocks, jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
  else:
    nnx.update(target.blocks, nnx.state(unrolled.blocks))
  for name in ("embed", "final_norm", "head"):
    if getattr(unrolled, name) is not None:
      nnx.update(getattr(target, name), nnx.state(getattr(unrolled, name)))
  return target


def assert_same_logits(got, ref, *, flipped_tokens: int = 0, rtol: float = 1e-5,
                       atol: float = 1e-5) -> None:
  """Logits [..., vocab] agree to rtol / atol at every token position but at most
  `flipped_tokens` of them (quantized models), which stay within 1e-2 (a quantization step)."""
  got, ref = np.asarray(got), np.asarray(ref)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  off = ~np.isclose(got, ref, rtol=rtol, atol=atol)
  tokens = off.reshape(-1, off.shape[-1]).any(axis=-1)
  worst = float(np.abs(got - ref).max())
  assert tokens.sum() <= flipped_tokens, (
      f"{tokens.sum()} of {tokens.size} token positions have logits off by more than "
      f"{atol} + {rtol}|ref| (allowed: {flipped_tokens}); largest difference {worst:.3g}")
  if flipped_tokens:
    assert worst <= 1e-2, f"a flipped token's logits moved {worst:.3g}, more than 1e-2"


def assert_same_step(params, ref_params, *, lr: float, outliers: float = 1e-4,
                     rtol: float = 1e-5, atol: float = 1e-5) -> None:
  """Parameters after one AdamW step agree to rtol / atol but for at most a fraction `outliers`
  of all elements (at least one), each of which is within one update (`lr`) of the reference."""
  leaves, ref_leaves = jax.tree.leaves(params), jax.tree.leaves(ref_params)
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
  a = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in leaves])
  b = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in ref_leaves])
  off = ~np.isclose(a, b, rtol=rtol, atol=atol)
  allowed = max(1, int(outliers * a.size))
  diff = np.abs(a - b)
  assert off.sum() <= allowed, (
      f"{off.sum()} of {a.size} parameter elements differ by more than {atol} + {rtol}|ref| "
      f"after one step (allowed: {allowed}); largest difference {diff.max():.3g}")
  assert diff.max() <= lr, f"a parameter moved {diff.max():.3g}, more than one update ({lr})"
