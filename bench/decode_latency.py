"""Per-token decode latency and cache size against context length, for each sequence mixer.

  python bench/decode_latency.py                          # the tiny shape, contexts 256 .. 4096
  python bench/decode_latency.py --mixers dense,gla --contexts 256,1024 --steps 32
  python bench/decode_latency.py --json bench/results/decode_latency.json   # also as JSON (the
                                                    # recurrent experiments' mixer table reads it)

For each mixer the decoder of the `tiny` scale (4 x 128, 4 heads; weights at init: latency does
not depend on them) prefills a context of L tokens into a cache of L + steps slots, then runs
`steps` greedy decode steps; the figure is the median time of one step (batch 1, jitted, after
a warm-up step) and the bytes the cache holds. Softmax attention keeps K and V per token (its
cache and its step grow with L); the recurrent mixers carry a fixed-size state per layer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from research import run_config
from research.infer.engine import Engine
from research.model.lm import DecoderLM

MIXERS = ("dense", "retention", "gla", "deltaproduct", "mlgru")
CONTEXTS = (256, 512, 1024, 2048, 4096)


def model_for(kind: str, vocab: int = 65) -> DecoderLM:
  c = run_config.default_config()  # the tiny decoder
  c.model.attention.kind = kind
  c = run_config.resolve(c)
  c.model.vocab_size = vocab
  return DecoderLM(c.model, rngs=nnx.Rngs(0))


def measure(kind: str, context: int, steps: int) -> tuple[float, int]:
  """(median seconds per decode step, cache bytes) after a prefill of `context` tokens."""
  model = model_for(kind)
  engine = Engine(model, max_len=context + steps + 1)
  prompt = np.asarray(jax.random.randint(jax.random.key(0), (1, context), 0, 65))
  pre = engine.prefill(prompt)
  cache, token = pre.cache, pre.next_token
  _, cache, token = engine.step(cache, token)  # compile
  jax.block_until_ready(token)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    _, cache, token = engine.step(cache, token)
    jax.block_until_ready(token)
    times.append(time.perf_counter() - start)
  return statistics.median(times), cache.state_bytes()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mixers", default=",".join(MIXERS))
  p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--json", default="", help="also write the figures to this JSON file")
  a = p.parse_args()
  mixers = [m for m in a.mixers.split(",") if m]
  contexts = [int(x) for x in a.contexts.split(",") if x]
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; tiny decoder, batch 1, "
        f"median of {a.steps} steps")
  print("| mixer | " + " | ".join(f"{n} ms/token" for n in contexts) + " | "
        + " | ".join(f"{n} cache KB" for n in contexts) + " |")
  print("|---" * (1 + 2 * len(contexts)) + "|")
  kinds = {}
  for kind in mixers:
    lat, size = [], []
    for n in contexts:
      t, b = measure(kind, n, a.steps)
      kinds.setdefault(kind, {})[str(n)] = {"ms": 1e3 * t, "cache_bytes": b}
      lat.append(f"{1e3 * t:.2f}")
      size.append(f"{b / 1024:,.0f}")
    print(f"| {kind} | " + " | ".join(lat) + " | " + " | ".join(size) + " |", flush=True)
  if a.json:
    out = {"command": "python bench/decode_latency.py " + " ".join(sys.argv[1:]),
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "date": datetime.date.today().isoformat(), "steps": a.steps, "kinds": kinds}
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  main()
