"""Achieved memory bandwidth of the memory lookup: `python -m kernels_pallas.memory_lookup.bench`.

Bytes actually moved (s_v = bytes per value element, s_w per weight, 4 per int32 index):
  forward    T*k*D*s_v (rows read) + T*k*(4 + s_w) (indices, weights) + T*D*s_v (out written)
  backward   d_weights: T*k*D*s_v (rows) + T*D*s_v (dout) + T*k*(4 + s_w)
             d_values:  T*k*D*s_v (dout rows gathered per pair) + T*k*12 (sorted slot, token,
                        weight) + N*D*s_v (the dense table gradient written)
GB/s = bytes / time; "% peak" divides by the device's HBM bandwidth from PEAK_BYTES_PER_S
(unknown on CPU). Each impl's backward is timed on its own (the VJP function with saved
residuals), not together with the forward. Timing: compile + 2 warm-ups, then the median of
`repeats` runs, each ended by block_until_ready. A row that cannot run here (out of memory, a
kernel that fails to compile) says why, and the bench goes on. With --quick on CPU the kernels
run in interpret mode: those numbers show only that the path runs, not speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from kernels_pallas.bench_notes import unavailable
from kernels_pallas.memory_lookup import _kernel_bwd, _kernel_fwd, _xla_bwd, resolve_impl
from kernels_pallas.memory_lookup import reference

# device_kind substring -> HBM bytes/s (vendor datasheet peaks; first match wins).
PEAK_BYTES_PER_S = (
    ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
    ("B200", 8.0e12), ("A100", 2.0e12), ("L4", 0.3e12),
    ("TPU v5 lite", 0.819e12), ("TPU v5e", 0.819e12), ("TPU v5", 2.765e12),
    ("TPU v6", 1.64e12), ("TPU v4", 1.2e12),
)


def peak_bandwidth(device) -> float | None:
  if device.platform == "cpu":
    return None
  for key, bw in PEAK_BYTES_PER_S:
    if key.lower() in device.device_kind.lower():
      return bw
  return None


def moved_bytes(n, d, t, k, vbytes, wbytes):
  fwd = t * k * d * vbytes + t * k * (4 + wbytes) + t * d * vbytes
  bwd = (t * k * d * vbytes + t * d * vbytes + t * k * (4 + wbytes)
         + t * k * d * vbytes + t * k * 12 + n * d * vbytes)
  return fwd, bwd


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fns(impl):
  style = resolve_impl(impl)
  if style == "xla":
    fwd = jax.jit(reference.lookup)
    bwd = jax.jit(lambda v, i, w, g: _xla_bwd((v, i, w), g))
    return fwd, bwd, False
  interpret = jax.default_backend() != style
  blocks = (None, None)
  fwd = jax.jit(lambda v, i, w: _kernel_fwd(v, i, w, style, blocks, interpret)[0])
  bwd = jax.jit(lambda v, i, w, g: _kernel_bwd(style, blocks, interpret, (v, i, w), g))
  return fwd, bwd, interpret


def run(*, quick=False, impls=None, repeats=10, dtype=jnp.bfloat16):
  dev = jax.devices()[0]
  if impls is None:
    impls = ("xla", "pallas") if dev.platform in ("gpu", "tpu") else ("xla", "pallas_gpu",
                                                                      "pallas_tpu")
  if quick:
    shapes, dtype = [(64, 128, 16, 4)], jnp.float32
  else:
    shapes = [(1 << 20, 256, 16384, 16), (1 << 20, 256, 16384, 64)]
  peak = peak_bandwidth(dev)
  rows = []
  for n, d, t, k in shapes:
    ks = jax.random.split(jax.random.key(0), 4)
    v = jax.random.normal(ks[0], (n, d), jnp.float32).astype(dtype)
    idx = jax.random.randint(ks[1], (t, k), 0, n, jnp.int32)
    w = jax.random.normal(ks[2], (t, k), jnp.float32).astype(dtype)
    g = jax.random.normal(ks[3], (t, d), jnp.float32).astype(dtype)
    size = jnp.dtype(dtype).itemsize
    fwd_b, bwd_b = moved_bytes(n, d, t, k, size, size)
    base = {}
    for impl in impls:
      fwd, bwd, interp = _fns(impl)
      for direction, fn, args, nbytes in (("fwd", fwd, (v, idx, w), fwd_b),
                                          ("bwd", bwd, (v, idx, w, g), bwd_b)):
        row = dict(shape=f"N={n} D={d} T={t} k={k} {jnp.dtype(dtype).name}",
                   impl=impl + (" (interpret)" if interp else ""), direction=direction)
        rows.append(row)
        try:
          sec = _time(fn, args, repeats)
        except Exception as e:  # pylint: disable=broad-except  (OOM, a lowering that fails)
          row["note"] = unavailable(e)
          continue
        if impl == "xla":
          base[direction] = sec
        row.update(ms=sec * 1e3, gbps=nbytes / sec / 1e9,
                   peak=None if peak is None else nbytes / sec / peak,
                   vs_xla=base[direction] / sec if direction in base else None)
  return rows


def table(rows) -> str:
  out = ["| shape | impl | pass | ms | GB/s | % HBM peak | speed-up vs xla | note |",
         "|---|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    if "note" in r:
      out.append(f"| {r['shape']} | {r['impl']} | {r['direction']} | | | | | {r['note']} |")
      continue
    peak = "unknown" if r["peak"] is None else f"{100 * r['peak']:.1f}"
    vs = "n/a" if r["vs_xla"] is None else f"{r['vs_xla']:.2f}x"
    out.append(f"| {r['shape']} | {r['impl']} | {r['direction']} | {r['ms']:.3f} | "
               f"{r['gbps']:.2f} | {peak} | {vs} | |")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU: interpret mode)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
  print(table(run(quick=args.quick, repeats=args.repeats)))


if __name__ == "__main__":
  main()
