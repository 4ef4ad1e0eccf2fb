"""Speed of the residual-stream connections' per-token contraction, both formulations.

  python bench/ghc_contract.py                          # the shapes of the tiny experiments
  python bench/ghc_contract.py --shape 16,2,32 --tokens 768 --repeats 50

A connection (research/model/residual.py, MixingConnection) contracts per-token weights with
the stream twice: the width connection (S x (m+S) weights) and the depth connection (m x S).
`_contract` broadcasts and sums when the per-token product I K d is at most
`residual.BROADCAST_MAX`, and calls a batched dot otherwise. This prints, for each
(S slots, m segments, slot width w), the forward + backward time of one whole dynamic
connection around a linear sublayer under each formulation, and the one the rule picks.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.model import residual

SHAPES = [(2, 1, 64), (4, 1, 64), (8, 1, 64),  # hyper_connections n = 2, 4, 8 (D = 64)
          (2, 2, 32), (4, 4, 16),              # frac_connections m = 2, 4
          (3, 2, 32), (4, 2, 32), (8, 2, 32), (16, 2, 32),  # virtual_width r = 1.5 ... 8
          (16, 4, 16)]                         # virtual_width r = 4, m = 4


def connection(slots: int, segments: int, width: int) -> residual.MixingConnection:
  """A dynamic GHC with VWN's initial values (HC's shape when segments = 1). The FC shapes are
  timed with this full depth matrix too; FC's own is diagonal and skips that contraction."""
  alpha0, beta0 = residual.ghc_initial_weights(slots, segments)
  return residual.MixingConnection(
      slots=slots, segments=segments, width=width, alpha0=alpha0, beta0=beta0, dynamic=True,
      tanh=True, scale0=1.0, matrix_scales=True, temperature=1.0 / np.sqrt(width), eps=1e-6,
      dtype=jnp.float32)


def time_connection(shape: tuple[int, int, int], tokens: int, repeats: int,
                    broadcast_max: int) -> float:
  """Milliseconds per forward + backward of one connection, `_contract` ruled by
  broadcast_max (traced afresh, so the setting applies)."""
  slots, segments, width = shape
  graph, state = nnx.split(connection(slots, segments, width))
  d = segments * width
  sublayer = jax.random.normal(jax.random.key(1), (d, d)) / np.sqrt(d)
  stream = jax.random.normal(jax.random.key(0), (1, tokens, slots * width))

  def loss(state, stream):
    return jnp.sum(nnx.merge(graph, state)(stream, lambda h: h @ sublayer) ** 2)

  saved = residual.BROADCAST_MAX
  residual.BROADCAST_MAX = broadcast_max
  try:
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(state, stream))
  finally:
    residual.BROADCAST_MAX = saved
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(step(state, stream))
  return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--shape", action="append", metavar="S,m,w",
                 help="slots, segments, slot width (repeatable; default: the experiments')")
  p.add_argument("--tokens", type=int, default=768, help="batch x sequence (tiny: 12 x 64)")
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  shapes = SHAPES
  if args.shape:
    try:
      shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    except ValueError:
      p.error(f"--shape takes three integers S,m,w; got {args.shape}")
    if any(len(s) != 3 for s in shapes):
      p.error(f"--shape takes three integers S,m,w; got {args.shape}")
  print(f"{jax.devices()[0].platform}, {args.tokens} tokens, fwd + bwd of one connection; "
        f"BROADCAST_MAX = {residual.BROADCAST_MAX}")
  print(f"{'(S, m, w)':>14} {'I K d':>6} {'broadcast ms':>13} {'dot ms':>8}  rule (width connection)")
  for shape in shapes:
    slots, segments, width = shape
    product = slots * (segments + slots) * width  # the width connection's broadcast
    broadcast = time_connection(shape, args.tokens, args.repeats, broadcast_max=1 << 40)
    dot = time_connection(shape, args.tokens, args.repeats, broadcast_max=0)
    pick = "broadcast" if product <= residual.BROADCAST_MAX else "dot"
    print(f"{str(shape):>14} {product:>6} {broadcast:>13.1f} {dot:>8.1f}  {pick}")


if __name__ == "__main__":
  main()
