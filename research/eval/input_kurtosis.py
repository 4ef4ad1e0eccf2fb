"""Kurtosis of the inputs of a model's linear layers (an evaluator, at the end of a run; and a
tool on finished runs).

  input_kurtosis  {site: [one value per block]} in summary.json, for the sites
                  qkv (the input of the q, k and v projections), o (the attention's output
                  projection), fc1 (the FFN's up and gate projections) and fc2 (its down
                  projection), plus any other linear under its attribute name. The value is the
                  kurtosis of the input over its features, E[(x - mean)^4] / E[(x - mean)^2]^2
                  per token, averaged over the tokens of the batch: 3 for Gaussian features,
                  up to the width for one outlier feature among zeros.

It is the outlier measure of the QAT scaling-law paper (Chen et al. 2025, §4.3: QAT removes most
of the outliers at the inputs of QKV, O and FC1, while FC2's input keeps a kurtosis far above
the others; the paper does not state its estimator, the per-token one here is ours). The inputs
are recorded by wrapping each linear of the model in a probe for one eager forward pass, so no
model code carries the measurement; the wrappers are removed before it returns.

  python -m research.eval.input_kurtosis WORKDIR [WORKDIR ...]   the table of finished runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.model.linear import Linear

# a linear's attribute name -> the site it reads (q, k and v read one input)
SITES = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "up": "fc1", "gate": "fc1",
         "down": "fc2"}
ORDER = ("qkv", "o", "fc1", "fc2")
VALID_BATCHES = 4  # validation batches the tool reads from a finished run


def token_kurtosis(x: jax.Array) -> jax.Array:
  """x [..., features] -> the kurtosis over the features of each token, averaged over tokens."""
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  m2 = jnp.mean(centred ** 2, axis=-1)
  m4 = jnp.mean(centred ** 4, axis=-1)
  return jnp.mean(m4 / jnp.maximum(m2 * m2, 1e-30))


class _Probe(nnx.Module):
  """Calls `inner` after handing its input to `record`."""

  def __init__(self, inner: nnx.Module, record):
    self.inner = inner
    self.record = record

  def __call__(self, x: jax.Array) -> jax.Array:
    self.record(x)
    return self.inner(x)


def _linears(model) -> list[tuple[tuple, nnx.Module]]:
  """(path, module) of the outermost linears (a QAT linear holds a plain one as `proj`)."""
  found = [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, Linear)]
  paths = {p for p, _ in found}
  return [(p, m) for p, m in found
          if not any(p[:i] in paths for i in range(1, len(p)))]


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
  """{site: [kurtosis per block]} of the inputs of `model`'s linears on `tokens` [batch, seq];
  one value per (block, site): the first of the linears that share a site's input."""
  values: dict[tuple[int, str], float] = {}
  probes = []
  for path, module in _linears(model):
    layer = next((k for prev, k in zip(path, path[1:]) if prev == "blocks"
                  and isinstance(k, int)), -1)
    site = SITES.get(path[-1], str(path[-1]))

    def record(x, key=(layer, site)):
      if key not in values:
        values[key] = float(sharding.to_host(token_kurtosis(x)))

    parent = _parent(model, path)
    probes.append((parent, path[-1], module))
    _set(parent, path[-1], _Probe(module, record))
  try:
    model(tokens)
  finally:
    for parent, key, module in probes:
      _set(parent, key, module)
  sites = sorted({s for _, s in values}, key=lambda s: (ORDER.index(s) if s in ORDER
                                                         else len(ORDER), s))
  layers = sorted({l for l, _ in values})
  return {s: [values[(l, s)] for l in layers if (l, s) in values] for s in sites}


WHEN = "at_end"  # an evaluator (research/eval/__init__.py)


def at_end(model, *, tokens: jax.Array, workdir, title: str, primary: bool) -> dict:
  del workdir, title, primary
  return {"input_kurtosis": input_kurtosis(model, tokens)}


def of_run(workdir: str | Path, batches: int = VALID_BATCHES) -> dict[str, list[float]]:
  """input_kurtosis of a finished run's latest checkpoint on the first `batches` of its
  validation batches (the corpus is read where the run's config or RESEARCH_DATA_DIR says)."""
  from research.data.pipeline import load_tokenized, make_valid_batches  # pylint: disable=import-outside-toplevel
  from research.infer import load_run  # pylint: disable=import-outside-toplevel
  run = load_run(workdir)
  c = run.config
  valid = make_valid_batches(load_tokenized(c.data).valid, seq_len=c.data.seq_len,
                             batch_size=c.eval.batch_size, num_batches=batches)
  tokens = jnp.asarray(np.concatenate([b["inputs"] for b in valid]))
  return input_kurtosis(run.model, tokens)


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip().splitlines()[-1].strip())
    return 2
  for workdir in argv:
    result = of_run(workdir)
    cells = "  ".join(f"{s} {np.mean(v):.2f} ({', '.join(f'{x:.1f}' for x in v)})"
                      for s, v in result.items())
    print(f"{workdir}: {cells}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
