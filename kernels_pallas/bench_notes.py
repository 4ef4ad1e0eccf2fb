"""What the kernel benches print for a row that cannot run on this machine."""

from __future__ import annotations


def unavailable(e: Exception) -> str:
  """One line naming why a bench row did not run (no cuDNN, out of memory, a failing kernel):
  the exception's type and the first line of its message."""
  text = str(e).strip().splitlines()
  return f"unavailable: {type(e).__name__}: {(text[0] if text else '')[:90]}"
