"""Compiles a kernel's C++ source into a shared library on first use and registers its XLA FFI
handlers with jax.

The library is built for the machine that runs it (`-march=native`), so it is cached under a
key of everything that changes the binary: the source, the flags, the compiler's version, the
jaxlib version (its FFI headers) and the CPU's model and feature flags. The cache lives in
`$RESEARCH_KERNEL_CACHE` (default `~/.cache/research/kernels_cpu`); a build writes a temporary
file and renames it, so two processes building at once each end with a whole library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

CACHE_ENV = "RESEARCH_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd",
         "-fno-math-errno", "-Wall")
_SOURCES = Path(__file__).resolve().parent


class KernelBuildError(RuntimeError):
  """A CPU kernel's library could not be built or loaded here (no compiler, a failed build)."""


def compiler() -> str:
  """The C++ compiler: $CXX when set, else the first of c++, g++, clang++ on the PATH."""
  named = os.environ.get("CXX")
  if named:
    found = shutil.which(named)
    if not found:
      raise KernelBuildError(f"CXX={named} is not a compiler on this machine (the CPU kernels "
                             f"are C++ built on first use)")
    return found
  for name in ("c++", "g++", "clang++"):
    if shutil.which(name):
      return shutil.which(name)
  raise KernelBuildError("no C++ compiler found for the CPU kernels (looked for $CXX, c++, g++ "
                         "and clang++); install one or set CXX, or run the jnp attention "
                         "(model.attention.impl=xla)")


def cache_dir() -> Path:
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV])
  try:
    return Path.home() / ".cache" / "research" / "kernels_cpu"
  except RuntimeError as e:  # no home directory
    raise KernelBuildError(f"no cache directory for the CPU kernels ({e}); set {CACHE_ENV}") \
        from e


def _cpu_identity() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  keep = [l for l in lines if l.split(":")[0].strip() in ("model name", "flags", "Features")]
  return "\n".join(sorted(set(keep))) or platform.machine()


def library_path(source: str, cxx: str) -> Path:
  """Where `source`'s library, built by the compiler `cxx`, is cached on this machine."""
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelBuildError(f"the C++ compiler {cxx} does not run: {e}") from e
  text = (_SOURCES / source).read_bytes()
  key = hashlib.sha256(b"\0".join(
      s if isinstance(s, bytes) else s.encode()
      for s in (text, " ".join(FLAGS), version, jaxlib.__version__, _cpu_identity()))).hexdigest()
  return cache_dir() / f"{Path(source).stem}-{key[:16]}.so"


def build(source: str) -> Path:
  """The library of `source` (a .cc file beside this one), compiled unless cached."""
  cxx = compiler()
  target = library_path(source, cxx)
  if target.exists():
    return target
  partial = None
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
      partial = Path(tmp.name)
    cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCES / source),
           "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      raise KernelBuildError(f"building {source} failed ({' '.join(cmd)}):\n"
                             f"{result.stderr[-3000:]}")
    os.replace(partial, target)
    partial = None
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelBuildError(f"building {source} into {target.parent} failed: {e}") from e
  finally:
    if partial is not None:
      partial.unlink(missing_ok=True)
  return target


@functools.cache
def load(source: str, handlers: tuple[tuple[str, str], ...]) -> None:
  """Builds `source` if needed, loads it and registers each (ffi target name, exported symbol)
  pair for the CPU platform. Once per process; raises KernelBuildError when it cannot."""
  path = build(source)
  try:
    library = ctypes.CDLL(str(path))
    for target, symbol in handlers:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, AttributeError) as e:
    raise KernelBuildError(f"loading {path} failed: {e}") from e


@functools.cache
def available(source: str, handlers: tuple[tuple[str, str], ...]) -> str | None:
  """None when `source` loads here, else why it does not (the build error, once per process)."""
  try:
    load(source, handlers)
  except KernelBuildError as e:
    return str(e)
  return None
