"""Kurtosis of the inputs of a model's linear layers (an evaluator, at the end of a run; and a
tool on finished runs).

  input_kurtosis  {site: [one value per block]} in summary.json, for the sites
                  qkv (the input of the q, k and v projections), o (the attention's output
                  projection), fc1 (the FFN's up and gate projections) and fc2 (its down
                  projection), plus any other linear of a block under its path in the block
                  ("attn.gate"); linears outside the blocks (an MTP head's) are not measured.
                  The value is the kurtosis of the input over its features,
                  E[(x - mean)^4] / E[(x - mean)^2]^2 per token, averaged over the tokens of
                  the batch: 3 for Gaussian features, up to the width for one outlier feature
                  among zeros.

It is the outlier measure of the QAT scaling-law paper (Chen et al. 2025, §4.3: QAT removes most
of the outliers at the inputs of QKV, O and FC1, while FC2's input keeps a kurtosis far above
the others; the paper does not state its estimator, the per-token one here is ours). The inputs
are recorded by wrapping each linear of the blocks in a probe for one forward pass, so no model
code carries the measurement; the wrappers are removed before it returns.

  python -m research.eval.input_kurtosis WORKDIR [WORKDIR ...]   the table of finished runs
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.model.linear import Linear

# (sublayer, attribute) of a block's linear -> the site it reads (q, k and v read one input)
SITES = {("attn", "q"): "qkv", ("attn", "k"): "qkv", ("attn", "v"): "qkv", ("attn", "o"): "o",
         ("channel", "up"): "fc1", ("channel", "gate"): "fc1", ("channel", "down"): "fc2"}
ORDER = ("qkv", "o", "fc1", "fc2")
VALID_BATCHES = 4  # validation batches the tool reads from a finished run
METHOD = f"per-token kurtosis over features, mean over tokens; {VALID_BATCHES} valid batches"


def token_kurtosis(x: jax.Array) -> jax.Array:
  """x [..., features] -> the kurtosis over the features of each token, averaged over the
  tokens whose features are not all equal (undefined there); NaN when none is."""
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  m2 = jnp.mean(centred ** 2, axis=-1)
  m4 = jnp.mean(centred ** 4, axis=-1)
  defined = m2 > 1e-30
  per_token = jnp.where(defined, m4 / jnp.where(defined, m2 * m2, 1.0), 0.0)
  count = jnp.sum(defined)
  return jnp.where(count > 0, jnp.sum(per_token) / jnp.maximum(count, 1), jnp.nan)


class _Probe(nnx.Module):
  """Calls `inner` after handing its input to `record`."""

  def __init__(self, inner: nnx.Module, record):
    self.inner = inner
    self.record = record

  def __call__(self, x: jax.Array) -> jax.Array:
    self.record(x)
    return self.inner(x)


def _block_linears(model) -> list[tuple[tuple, int | None, str, nnx.Module]]:
  """(path, layer, site, module) of the outermost linears of the decoder's blocks (a QAT
  linear holds a plain one as `proj`); layer None for stacked (scanned) blocks, whose calls
  come in layer order. The site is SITES' name, or the path inside the block ("attn.gate")."""
  found = [(tuple(p), m) for p, m in nnx.iter_graph(model.blocks) if isinstance(m, Linear)]
  paths = {p for p, _ in found}
  out = []
  for path, module in found:
    if any(path[:i] in paths for i in range(1, len(path))):
      continue
    layer, inner = (path[0], path[1:]) if path and isinstance(path[0], int) else (None, path)
    out.append((("blocks",) + path, layer, SITES.get(inner[-2:], ".".join(map(str, inner))),
                module))
  return out


def _parent(model, path: tuple):
  node = model
  for key in path[:-1]:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _set(parent, key, value) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def input_kurtosis(model, tokens: jax.Array) -> dict[str, list[float]]:
  """{site: [kurtosis per block]} of the inputs of the linears in `model`'s blocks on `tokens`
  [batch, seq]: one value per (block, site), that of the first call among the linears sharing
  the site's input; NaN for a block without the site. Scanned and rematerialized blocks work
  (the values leave the trace by jax.debug.callback). Channel mixers that are not linears of
  research/model/linear.py (MoE experts, memory layers) have no fc1 / fc2 entry."""
  calls: dict[tuple, list[float]] = {}  # a linear's path -> its values in call order
  probes, where = [], {}
  for path, layer, site, module in _block_linears(model):

    def record(x, path=path):
      jax.debug.callback(lambda v, path=path: calls.setdefault(path, []).append(float(v)),
                         token_kurtosis(x), ordered=True)

    parent = _parent(model, path)
    probes.append((parent, path[-1], module))
    where[path] = (layer, site)
    _set(parent, path[-1], _Probe(module, record))
  try:
    model(tokens)
    jax.effects_barrier()
  finally:
    for parent, key, module in probes:
      _set(parent, key, module)
  values: dict[tuple[int, str], float] = {}
  for path, seen in calls.items():  # paths in order of their first call
    layer, site = where[path]
    for i, v in enumerate(seen if layer is None else seen[:1]):
      values.setdefault((i if layer is None else layer, site), v)
  sites = sorted({s for _, s in values}, key=lambda s: (ORDER.index(s) if s in ORDER
                                                         else len(ORDER), s))
  layers = range(max((l for l, _ in values), default=-1) + 1)
  return {s: [values.get((l, s), math.nan) for l in layers] for s in sites}


WHEN = "at_end"  # an evaluator (research/eval/__init__.py)


def at_end(model, *, tokens: jax.Array, workdir, title: str, primary: bool) -> dict:
  del workdir, title, primary
  return {"input_kurtosis": input_kurtosis(model, tokens)}


def of_run(workdir: str | Path, batches: int = VALID_BATCHES) -> dict[str, list[float]]:
  """input_kurtosis of a finished run's latest checkpoint on the first `batches` of its
  validation batches (the corpus is read where the run's config or RESEARCH_DATA_DIR says)."""
  # pylint: disable=import-outside-toplevel
  from research import data as data_lib
  from research.infer import load_run
  run = load_run(workdir)
  valid = data_lib.validation_batches(run.config, batches)
  tokens = jnp.asarray(np.concatenate([b["inputs"] for b in valid]))
  return input_kurtosis(run.model, tokens)


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip().splitlines()[-1].strip())
    return 2
  for workdir in argv:
    result = of_run(workdir)
    cells = "  ".join(f"{s} {np.nanmean(v):.2f} ({', '.join(f'{x:.1f}' for x in v)})"
                      for s, v in result.items())
    print(f"{workdir}: {cells}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
