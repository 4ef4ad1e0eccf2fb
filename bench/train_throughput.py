"""Training throughput of an experiment configuration on the current device.

  python bench/train_throughput.py                      # baseline tiny (nanoGPT baby), fp32 on CPU
  python bench/train_throughput.py --spec baseline:scale=small --steps 20
  python bench/train_throughput.py --spec moda --set model.attention.kind=dense   # its baseline
  python bench/train_throughput.py --vs-torch           # and the PyTorch peer (bench/peer_torch.py)
  python bench/train_throughput.py --stack 3            # 3 seeds as one seed-stacked step, too

Prints step time, tokens/s and MFU (against research.train.mfu's peak table; on CPU the peak is
measured). Data comes from the real pipeline; the timing covers the jitted step and the host
work of fetching and placing the next batch, as in training. `--vs-torch` alternates each timed
window of ours with one of the PyTorch peer of the same model on the same batches (a fresh
process per window, so neither's thread pool idles beside the other) and prints the median
of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from research import config as config_lib
from research import experiments, sharding
from research.train import mfu as mfu_lib
from research.train.trainer import Trainer


def torch_window(spec: str, steps: int, warmup: int) -> float:
  """Seconds per step of one timed window of the PyTorch peer, in its own process."""
  script = Path(__file__).with_name("peer_torch.py")
  out = subprocess.run([sys.executable, str(script), "--spec", spec, "--steps", str(steps),
                        "--warmup", str(warmup)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["step_s"][0]


def stacked_step_time(r, state, n: int, steps: int, warmup: int, repeats: int) -> float:
  """Best seconds per step of n copies of `state` trained as one vmapped step, each copy on
  its own batches (drawn from the run's iterator), as seed-stacked training does."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  state = jax.tree.map(lambda x: jnp.stack([x] * n), state)
  keys = jnp.stack([jax.random.key(i) for i in range(n)])
  step = jax.jit(jax.vmap(r.step_with_key), donate_argnums=0)

  def batch():
    host = [next(r.train_iter) for _ in range(n)]
    return {k: jnp.asarray(np.stack([b[k] for b in host])) for k in host[0]}

  with sharding.use_mesh(r.mesh):
    b = batch()
    compiled = step.lower(state, b, keys).compile()
    for _ in range(warmup):
      state, _ = compiled(state, b, keys)
      b = batch()
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, _ = compiled(state, b, keys)
        b = batch()
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / steps)
  return min(times)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--spec", default="baseline:scale=tiny")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--vs-torch", dest="vs_torch", action="store_true",
                 help="alternate with bench/peer_torch.py's windows and print the ratio")
  p.add_argument("--stack", type=int, default=0,
                 help="also time N seeds stacked into one vmapped step (research/train/loop.py)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a dotted config override, e.g. model.attention.kind=dense (repeatable)")
  args = p.parse_args()
  overrides = {}
  for item in args.set:
    if "=" not in item:
      p.error(f"--set '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    overrides[key] = config_lib.parse_value(value)
  config = experiments.get_config(args.spec, overrides)
  with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(config, tmp, log=lambda *_: None)
    r = trainer.build()
  c = r.config
  tokens = c.train.batch_size * c.data.seq_len
  state = r.state
  with sharding.use_mesh(r.mesh):
    batch = trainer.put_batch(r, next(r.train_iter))
    step = r.step_fn.lower(state, batch).compile()
    for _ in range(args.warmup):
      state, m = step(state, batch)
      batch = trainer.put_batch(r, next(r.train_iter))
    jax.block_until_ready(state)
    times, peer = [], []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = step(state, batch)
        batch = trainer.put_batch(r, next(r.train_iter))
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / args.steps)
      if args.vs_torch:
        peer.append(torch_window(args.spec, args.steps, args.warmup))
  best = min(times)
  peak = mfu_lib.peak_flops_per_device() * jax.device_count()
  flops = r.summary["flops_per_token_train"] * tokens
  print(f"{args.spec} {' '.join(args.set)}: {r.summary['params'] / 1e6:.3f}M params, batch {c.train.batch_size} x "
        f"{c.data.seq_len}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"precision {c.train.precision}")
  print(f"step time {best * 1e3:.2f} ms (median {np.median(times) * 1e3:.2f} ms over "
        f"{args.repeats} x {args.steps} steps)")
  print(f"tokens/s {tokens / best:,.0f}")
  print(f"model FLOP/s {flops / best / 1e9:.1f} G; peak {peak / 1e9:.1f} G; MFU {flops / best / peak:.1%}")
  if args.stack > 1:
    stacked = stacked_step_time(r, state, args.stack, args.steps, args.warmup, args.repeats)
    print(f"{args.stack} seeds stacked: step time {stacked * 1e3:.2f} ms, "
          f"{args.stack * tokens / stacked:,.0f} tokens/s over the seeds; "
          f"{stacked / best:.2f}x one seed's step time for {args.stack} seeds "
          f"({args.stack * best / stacked:.2f}x the throughput of one after another)")
  if peer:
    ours, theirs = float(np.median(times)), float(np.median(peer))
    print(f"PyTorch peer: step time {theirs * 1e3:.2f} ms (median of {len(peer)} windows), "
          f"tokens/s {tokens / theirs:,.0f}")
    print(f"ratio (ours / PyTorch tokens/s, medians of alternating windows): {theirs / ours:.2f}x")
  stats = jax.devices()[0].memory_stats() or {}  # accelerators report it; CPUs do not
  if "peak_bytes_in_use" in stats:
    print(f"peak memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB of "
          f"{stats.get('bytes_limit', float('nan')) / 2**30:.1f} GiB on device 0")


if __name__ == "__main__":
  main()
