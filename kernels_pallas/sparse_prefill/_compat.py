"""Pallas API names that differ between jax 0.10.x and 0.11.x, gathered in one place."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# `pl.dot` moved to the Triton module (0.10.2); older releases only have `pl.dot`.
triton_dot = getattr(pltriton, "dot", None) or getattr(pl, "dot")

# The Triton compiler-params dataclass (named TritonCompilerParams before 0.8).
TritonParams = getattr(pltriton, "CompilerParams", None) or getattr(pl, "TritonCompilerParams")

# The Mosaic TPU compiler-params dataclass and the scalar-prefetch grid spec.
TPUParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
VMEM = pltpu.VMEM if hasattr(pltpu, "VMEM") else pltpu.MemorySpace.VMEM


def on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def interpret_default(interpret: bool | None) -> bool:
  """Kernels run in interpret mode on CPU unless told otherwise."""
  return on_cpu() if interpret is None else bool(interpret)
