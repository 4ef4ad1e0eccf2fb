"""The Pallas names that differ between the jax versions we run (0.10.x on CPU, 0.11.x on GPU).

Everything version-dependent that the MoDA kernels touch is resolved here, once.
"""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Triton-lowering compiler parameters (`TritonCompilerParams` before jax 0.7).
TritonCompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(
    pltriton, "TritonCompilerParams")

# Mosaic TPU compiler parameters (`TPUCompilerParams` before jax 0.7).
TPUCompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def vmem(shape, dtype):
  """A VMEM scratch buffer (`pltpu.VMEM`, also reachable as `pltpu.MemorySpace.VMEM`)."""
  if hasattr(pltpu, "VMEM"):
    return pltpu.VMEM(shape, dtype)
  return pltpu.MemorySpace.VMEM(shape, dtype)
