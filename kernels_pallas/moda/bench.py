"""Benchmark of MoDA attention: `python -m kernels_pallas.moda.bench [--quick]`.

Times the forward and the forward + backward (gradients w.r.t. q, k, v, depth_k, depth_v) of
  moda      the MoDA kernel of this backend (impl="pallas"),
  flash     the same kernel with no depth slots (S = 0): this backend's causal flash attention,
  cudnn     jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's flash attention, the
            best dense attention on NVIDIA GPUs and the baseline our flash is held to,
  xla_dpa   jax.nn.dot_product_attention(implementation="xla"), which materialises [t, t] logits,
  xla_ref   the jnp reference (reference.py), likewise,
and prints one Markdown table: ms of the forward, the backward (fwd+bwd minus fwd) and both
(median of --runs after a warm-up), TFLOP/s, the MoDA / flash time ratio, flash's time against
cuDNN's and MoDA's speed-up over the XLA reference. A row that cannot run here says why (cuDNN
off NVIDIA GPUs or for fp32, logits that would not fit, out of memory) and the bench goes on.
Default shape: B=1, Hq=64, Hk=8, d=64, S=64 (the paper's Table 2 row), bf16, T in {1K, 4K, 16K,
64K}. --quick uses tiny shapes; on CPU the kernels then run in interpret mode and the numbers say
nothing about speed.

FLOPs (useful work, causal): forward 4 * B * Hq * d * (T (T + 1) / 2 + T * S); the backward
counts 2.5x the forward, so forward + backward is 3.5x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.bench_notes import unavailable
from kernels_pallas.moda import flash_attention, moda_attention, moda_reference


def flops(b, t, hq, d, s, *, causal=True) -> float:
  """Forward FLOPs of MoDA attention (two matmuls over the visible keys)."""
  seq_keys = t * (t + 1) / 2 if causal else t * t
  return 4.0 * b * hq * d * (seq_keys + t * s)


def _time(fn, args, runs: int) -> float:
  """Median wall time in ms of a jitted call, after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _fwd_and_train(fn, args):
  """(forward, forward + backward) jitted versions of fn(*args)."""
  fwd = jax.jit(fn)

  @jax.jit
  def train(*a):
    out, vjp = jax.vjp(fn, *a)
    return vjp(out)                                  # the output as a stand-in cotangent

  return fwd, train


def _logits_bytes(b, t, hq) -> float:
  """What an XLA attention holds at once: fp32 logits, probabilities and their cotangents,
  ~4 x [b, hq, t, t] fp32."""
  return 4 * 4.0 * b * hq * t * t


def run(seqs, *, b, hq, hk, d, s, dtype, impl, runs, block_q=None, block_k=None,
        ref_budget_bytes=2e10):
  """Returns one dict per (T, implementation) with times and rates; a row that cannot run
  carries a "note" saying why."""
  rows = []
  rng = np.random.default_rng(0)
  for t in seqs:
    mk = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.5, dtype)
    q, k, v = mk((b, t, hq, d)), mk((b, t, hk, d)), mk((b, t, hk, d))
    kd, vd = mk((b, t, s, hk, d)), mk((b, t, s, hk, d))
    g = hq // hk
    dpa = lambda implementation: (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation))
    cases = {
        "moda": (lambda *a: moda_attention(*a, impl=impl, block_q=block_q, block_k=block_k),
                 (q, k, v, kd, vd), s),
        "flash": (lambda *a: flash_attention(*a, impl=impl, block_q=block_q, block_k=block_k),
                  (q, k, v), 0),
        "cudnn": (dpa("cudnn"), (q, k, v), 0),
        "xla_dpa": (dpa("xla"), (q, k, v), 0),
        "xla_ref": (moda_reference, (q, k, v, kd, vd), s),
    }
    times = {}
    for name, (fn, args, slots) in cases.items():
      row = {"T": t, "impl": name, "S": slots, "G": g}
      rows.append(row)
      need = _logits_bytes(b, t, hq)
      if name.startswith("xla_") and need > ref_budget_bytes:
        row["note"] = (f"skipped: its [t, t] logits need ~{need / 2**30:.0f} GiB "
                       f"(budget {ref_budget_bytes / 2**30:.0f} GiB)")
        continue
      try:
        fwd, train = _fwd_and_train(fn, args)
        row["fwd_ms"] = _time(fwd, args, runs)
        row["train_ms"] = _time(train, args, runs)
      except Exception as e:  # pylint: disable=broad-except  (OOM, unsupported, no cuDNN)
        row["note"] = unavailable(e)
        continue
      row["bwd_ms"] = row["train_ms"] - row["fwd_ms"]
      f = flops(b, t, hq, d, slots)
      row["fwd_tflops"] = f / row["fwd_ms"] / 1e9
      row["train_tflops"] = 3.5 * f / row["train_ms"] / 1e9
      times[name] = row
    if "moda" in times:
      m = times["moda"]
      if "flash" in times:
        m["vs_flash"] = m["train_ms"] / times["flash"]["train_ms"]
        m["vs_flash_fwd"] = m["fwd_ms"] / times["flash"]["fwd_ms"]
      if "xla_ref" in times:
        m["speedup_vs_ref"] = times["xla_ref"]["train_ms"] / m["train_ms"]
    if "flash" in times and "cudnn" in times:
      f, c = times["flash"], times["cudnn"]
      f["vs_cudnn_fwd"], f["vs_cudnn"] = f["fwd_ms"] / c["fwd_ms"], f["train_ms"] / c["train_ms"]
  return rows


def to_markdown(rows, *, interpret: bool) -> str:
  tag = " (interpret)" if interpret else ""
  lines = ["| T | impl | S | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | "
           "MoDA/flash time (fwd, fwd+bwd) | flash/cuDNN time (fwd, fwd+bwd) | "
           "MoDA speed-up vs xla_ref (fwd+bwd) | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, spec: "" if x is None else format(x, spec)
  pair = lambda r, a, b: "" if b not in r else f"{r[a]:.3f}, {r[b]:.3f}"
  for r in rows:
    impl = r["impl"] + (tag if r["impl"] in ("moda", "flash") else "")
    lines.append(
        f"| {r['T']} | {impl} | {r['S']} | {fmt(r.get('fwd_ms'), '.3f')} | "
        f"{fmt(r.get('bwd_ms'), '.3f')} | {fmt(r.get('train_ms'), '.3f')} | "
        f"{fmt(r.get('fwd_tflops'), '.1f')} | {fmt(r.get('train_tflops'), '.1f')} | "
        f"{pair(r, 'vs_flash_fwd', 'vs_flash')} | {pair(r, 'vs_cudnn_fwd', 'vs_cudnn')} | "
        f"{fmt(r.get('speedup_vs_ref'), '.2f')} | {r.get('note', '')} |")
  return "\n".join(lines)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU: interpret mode)")
  p.add_argument("--seq", type=str, default="1024,4096,16384,65536")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=64)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--slots", type=int, default=64)
  p.add_argument("--dtype", type=str, default="bfloat16")
  p.add_argument("--block_q", type=int, default=None)
  p.add_argument("--block_k", type=int, default=None)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--impl", type=str, default="pallas",
                 help="moda_attention impl for the moda and flash rows (xla: the reference)")
  p.add_argument("--ref_budget_gib", type=float, default=18.6,
                 help="XLA rows whose [t, t] logits need more memory than this are skipped")
  a = p.parse_args(argv)
  if a.quick:
    a.seq, a.heads, a.kv_heads, a.head_dim, a.slots, a.runs = "32", 4, 2, 16, 4, 2
    a.block_q, a.block_k = a.block_q or 16, a.block_k or 16
  backend = jax.default_backend()
  rows = run([int(x) for x in a.seq.split(",")], b=a.batch, hq=a.heads, hk=a.kv_heads,
             d=a.head_dim, s=a.slots, dtype=jnp.dtype(a.dtype), impl=a.impl, runs=a.runs,
             block_q=a.block_q, block_k=a.block_k, ref_budget_bytes=a.ref_budget_gib * 2**30)
  device = jax.devices()[0].device_kind
  header = (f"MoDA attention on {device} ({backend}), B={a.batch} Hq={a.heads} Hk={a.kv_heads} "
            f"d={a.head_dim} S={a.slots} {a.dtype}, causal, jax {jax.__version__}; median of "
            f"{a.runs} runs")
  interpret = a.impl.startswith("pallas") and backend not in ("gpu", "tpu")
  table = header + "\n\n" + to_markdown(rows, interpret=interpret)
  print(table)
  return table


if __name__ == "__main__":
  main()
