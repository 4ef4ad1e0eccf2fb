"""Evaluators: what a run measures besides its training and validation loss.

A config declares its evaluators by name (`eval.evaluators`, comma-separated); each name is a
module of this package, which the trainer imports by name (`load`), so training code imports
no evaluator. A module is an evaluator when it defines `WHEN`:

  WHEN = "every_eval"  at every evaluation, on the fixed validation batches:
                       make_step(graphdef, corpus) -> a jittable (params, other, batch) -> pytree
                         of sums, or None where it does not apply (exact_match on a text corpus);
                       score(step, params, other, batches) -> float (a list of floats when the
                         step is vmapped over stacked seeds);
                       the value goes into the valid line of metrics.jsonl under the module's
                       name and into summary.json as `valid_<name>`
  WHEN = "at_end"      once, on the trained model:
                       at_end(model, *, tokens, workdir, title, primary) -> summary entries;
                       it writes files into `workdir` only when `primary` (process 0)

  exact_match    (every_eval) synthetic tasks' answer accuracy
  layer_cosine   (at_end) adjacent-block cosine of the stream
  connections    (at_end) the learned connection matrices' heat maps (hyper / frac / vwn)
  input_kurtosis (at_end) kurtosis of each linear layer's input per block and site (QAT)

The other modules (lm_eval, long_ppl, retrieval) are evaluation tools that experiments call.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from research.errors import ConfigError

WHENS = ("every_eval", "at_end")


def _modules() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(spec: str) -> list[tuple[str, ModuleType]]:
  """[(name, module)] of the evaluators named in `spec` ("exact_match,layer_cosine"); an unknown
  name, or a module that is not an evaluator, is a ConfigError."""
  out, available = [], _modules()
  for name in (n.strip() for n in spec.split(",")):
    if not name:
      continue
    if name not in available:
      raise ConfigError(f"eval.evaluators: no evaluator '{name}' (research/eval/ has "
                        f"{', '.join(available)})")
    module = importlib.import_module(f"{__name__}.{name}")
    if getattr(module, "WHEN", None) not in WHENS:
      raise ConfigError(f"eval.evaluators: research/eval/{name}.py is not an evaluator (it "
                        f"defines no WHEN of {', '.join(WHENS)})")
    out.append((name, module))
  return out
