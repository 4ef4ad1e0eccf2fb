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

# jax / flax pairs that install together (setup.cfg allows both) but cannot import: (jax
# release prefix, the oldest flax that works with it, what fails). setup.cfg cannot state a
# range of one package that depends on the other's version, so the check is here, before
# flax is imported, with the fix in one line.
BROKEN_PAIRS = (
    ("0.11.", (0, 12, 10), "flax's nnx reads jax.experimental.hijax.HiPrimitive, which jax "
                           "0.11 does not have"),
)


def _version_tuple(text: str) -> tuple[int, ...]:
  out = []
  for part in text.split(".")[:3]:
    digits = "".join(ch for ch in part if ch.isdigit())
    out.append(int(digits or 0))
  return tuple(out)


def check_versions(jax_version: str | None = None, flax_version: str | None = None) -> None:
  """Raises ImportError (one line, naming both versions and the fix) for a known-broken pair."""
  import importlib.metadata
  try:
    jax_version = jax_version or importlib.metadata.version("jax")
    flax_version = flax_version or importlib.metadata.version("flax")
  except importlib.metadata.PackageNotFoundError:
    return
  for prefix, oldest, why in BROKEN_PAIRS:
    if jax_version.startswith(prefix) and _version_tuple(flax_version) < oldest:
      need = ".".join(map(str, oldest))
      raise ImportError(
          f"flax {flax_version} does not work with jax {jax_version} ({why}): install "
          f"flax>={need} (pip install 'flax>={need}') or jax<{prefix}0")


check_versions()

import flax  # noqa: E402  (after the XLA flag defaults and the version check)

# Parameters are placed by research.model.create_model, which jits the initializer with the
# shardings derived from each parameter's logical axes. Flax's eager sharding would instead
# require an active mesh for every module constructed, also in notebooks and unit tests.
flax.config.update("flax_always_shard_variable", False)
