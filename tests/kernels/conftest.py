"""Kernel tests mean the same on every backend.

Unless told otherwise, fp32 matmuls do not run in fp32 everywhere: NVIDIA GPUs use TF32 (10
mantissa bits; XLA's dots and Pallas Triton's alike) and TPUs one bf16 pass. Every test in this
directory therefore runs under `jax.default_matmul_precision("highest")`: the references, and
the kernels' own fp32 dots (a dot without an explicit precision takes the default when it is
traced), compute in full fp32 on CPU, GPU and TPU, so one fp32 tolerance states what a kernel
must meet on each. bf16 inputs are unaffected (their dots are bf16 with fp32 accumulation on
every backend). The speed of the default (TF32) path is the benches' business, not the tests'.
(tests/kernels/backends.py has the per-backend tolerance lookup and the device-count skip.)
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _full_fp32_matmuls():
  """Module scope: it is set up before the modules' own fixtures (their inputs), and it ends
  with the module, so nothing outside tests/kernels runs under it."""
  with jax.default_matmul_precision("highest"):
    yield

