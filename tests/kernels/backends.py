"""What the kernel tests need to know about the backend they run on.

`tolerance(table, dtype)` reads a test file's tolerance table, keyed by (backend, dtype), with
"any" for the entries that hold on every backend (conftest.py runs fp32 dots at full precision
everywhere, so today every entry is "any"); a backend that ever needs an entry of its own gets
it in the table, where the reader sees it. `needs_devices(n)` skips, with the reason, a test that
needs more devices than the default backend has (a 1-GPU machine against an 8-device mesh).
"""

from __future__ import annotations

import jax
import pytest

BACKEND = jax.default_backend()


def tolerance(table: dict, dtype):
  """The entry of `table` for this backend and `dtype`: (BACKEND, dtype), else ("any", dtype)."""
  key = (BACKEND, dtype)
  return table[key] if key in table else table[("any", dtype)]


def needs_devices(n: int):
  """A skip mark for a test that needs `n` devices of the default backend."""
  have = jax.device_count()
  return pytest.mark.skipif(have < n, reason=f"needs {n} {BACKEND} devices; this machine has "
                                             f"{have}")
