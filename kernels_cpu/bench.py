"""Benchmark of the CPU attention kernel: `python -m kernels_cpu.bench [--runs N]`.

Times the forward and the forward + backward (gradients w.r.t. q, k, v) of
  cpu   the compiled kernel (kernels_cpu.attention),
  xla   the jnp attention (research.model.attention.xla_attention), what XLA:CPU compiles,
each jitted on its own, and prints one Markdown table: ms of the forward, the backward
(fwd+bwd minus fwd) and both (median of --runs timed loops of --calls calls each), GFLOP/s
of useful work, and the kernel's speed-up over XLA. Shapes: the tiny setting's attention
(B 12, T 64, H 4, d 32), a GQA one and a longer one. In a training step the kernel saves more
than these standalone figures say (bench/train_throughput.py measures the step): there XLA
also reorders the surrounding activations for its batched matmuls.

FLOPs (useful work, causal): forward 4 * B * H * d * T (T + 1) / 2; the backward counts 2.5x
the forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from kernels_cpu import attention as cpu_attention
from research.model.attention import xla_attention

SHAPES = ((12, 64, 4, 4, 32), (8, 128, 8, 2, 64), (2, 512, 8, 8, 64))  # (b, t, h, kv, d)


def _time(fn, args, runs: int, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return 1e3 * statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--calls", type=int, default=50)
  args = p.parse_args()
  why = cpu_attention.unavailable()
  if why:
    raise SystemExit(f"the CPU kernel is not available here: {why}")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32, causal\n")
  print("| shape (B, T, H, KV, d) | impl | fwd ms | bwd ms | fwd+bwd ms | GFLOP/s | speed-up |")
  print("|---|---|---|---|---|---|---|")
  for b, t, h, kv, d in SHAPES:
    keys = jax.random.split(jax.random.key(0), 4)
    q, do = (jax.random.normal(k_, (b, t, h, d)) for k_ in keys[::3])
    k, v = (jax.random.normal(k_, (b, t, kv, d)) for k_ in keys[1:3])
    pos = np.broadcast_to(np.arange(t), (b, t))
    impls = {
        "xla": lambda q, k, v: xla_attention(q, k, v, q_positions=pos, k_positions=pos),
        "cpu": lambda q, k, v: cpu_attention.attention(q, k, v, causal=True),
    }
    flop = 4.0 * b * h * d * t * (t + 1) / 2
    totals = {}
    for name, fn in impls.items():
      fwd = jax.jit(fn)
      train = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
      f = _time(fwd, (q, k, v), args.runs, args.calls)
      both = _time(train, (q, k, v, do), args.runs, args.calls)
      totals[name] = both
      speedup = f"{totals['xla'] / both:.2f}x" if name == "cpu" else ""
      print(f"| {b}, {t}, {h}, {kv}, {d} | {name} | {f:.3f} | {both - f:.3f} | {both:.3f} | "
            f"{3.5 * flop / both / 1e6:.1f} | {speedup} |")


if __name__ == "__main__":
  main()
