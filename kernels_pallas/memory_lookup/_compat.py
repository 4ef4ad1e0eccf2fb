"""The one place where this package touches Pallas names that moved between jax 0.10 and 0.11.

Both versions spell the names below the same way today; if a future jax renames one, only this
file changes. (History: `pltpu.ANY` became `pl.ANY` in 0.10.0, `TPUCompilerParams` /
`TritonCompilerParams` became `pltpu.CompilerParams` / `pltriton.CompilerParams` in 0.7.)
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

ANY = pl.ANY                          # an operand left in HBM, moved by hand (TPU style)
NO_BLOCK = pl.no_block_spec           # the whole array as one ref (Triton style: raw pointers)
DMA = pltpu.SemaphoreType.DMA
VMEM = pltpu.VMEM
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
make_async_copy = pltpu.make_async_copy


def triton_params(num_warps: int = 4, num_stages: int = 2):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(*dimension_semantics: str):
  return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))


def interpret_default(platform: str) -> bool:
  """Kernels of style `platform` ('gpu' or 'tpu') run compiled only on that backend."""
  return jax.default_backend() != platform
