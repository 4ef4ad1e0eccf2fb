"""Peak FLOP/s per device, for model-FLOPs utilization (MFU).

Accelerators use their dense bf16 peak from the vendors' data sheets. A CPU has no data sheet
figure that means anything for XLA, so its peak is *measured*: the best fp32 matmul throughput
of this process's CPU devices on a large square matmul, cached per machine in the cache dir.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# dense bf16 peak FLOP/s per chip, matched against jax's device_kind
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def cache_dir() -> Path:
  return Path(os.environ.get("RESEARCH_CACHE_DIR", Path.home() / ".cache" / "research"))


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best fp32 FLOP/s of an n x n matmul over all CPU cores (what XLA can reach here)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def cpu_peak_flops() -> float:
  key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|jax{jax.__version__}"
  path = cache_dir() / "cpu_peak_flops.json"
  try:
    table = json.loads(path.read_text())
  except (OSError, ValueError):
    table = {}
  if key not in table:
    table[key] = measure_cpu_peak()
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(table, indent=1))
    except OSError:
      pass
  return table[key]


def peak_flops_per_device(device: jax.Device | None = None) -> float:
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    # The measured matmul uses every core; spread it over the CPU devices XLA exposes.
    return cpu_peak_flops() / max(len(jax.devices("cpu")), 1)
  kind = device.device_kind
  for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return float("nan")
