"""A JAX/Flax NNX codebase for LLM-architecture research (see docs/architecture.md)."""

import os

# XLA:CPU's YNNPACK fusions run this codebase's fp32 matmuls ([768,128] x [128,352], say) at
# ~100-120 GFLOP/s where XLA's Eigen path reaches ~200-300 GFLOP/s on a 2-core x86 CPU; turning
# them off made the tiny baseline's training step ~4 ms faster (61 -> 57 ms, best of 4 x 50
# steps). XLA reads XLA_FLAGS when the CPU backend starts, i.e. at the first jax computation,
# so this must run before that. An explicit setting of the flag in XLA_FLAGS is left alone,
# and it is only added on the jaxlib release where it was measured (unknown flags are fatal).
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _default_xla_flags() -> None:
  import importlib.metadata
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if jaxlib_version.startswith("0.10.") and _YNN_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_default_xla_flags()

import flax  # noqa: E402  (after the XLA flag defaults)

# Parameters are placed by research.model.create_model, which jits the initializer with the
# shardings derived from each parameter's logical axes. Flax's eager sharding would instead
# require an active mesh for every module constructed, also in notebooks and unit tests.
flax.config.update("flax_always_shard_variable", False)
