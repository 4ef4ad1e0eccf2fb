"""Ctrl-C (SIGINT) and SIGTERM (what schedulers send on preemption) as requests to stop.

A signal only sets a flag; the trainer acts on it where it is safe: during start-up between its
phases (nothing trained, nothing to save), and in the loop between steps, where the step count,
the train state and the iterator position agree and a checkpoint is saved. Acting on it raises
`Interrupted`, a KeyboardInterrupt whose `exit_code` is 128 + the signal (130 for Ctrl-C, 143
for SIGTERM). A second signal while a stop is pending interrupts at once.

The handlers are installed by the `research` command before it imports jax (an interrupt that
lands inside jax's or orbax's native code can crash the process) and by `Trainer.run` when it is
called from Python; only the main thread can install them.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal; `exit_code` is what the command exits with."""

  def __init__(self, signum: int, message: str = ""):
    super().__init__(message or f"stopped by {signal.Signals(signum).name}")
    self.signum = signum
    self.exit_code = 128 + signum


class StopRequests:
  """The process's pending stop request (the first signal received), if any."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop now
      raise Interrupted(signum)
    self.signum = signum

  def installed(self) -> bool:
    return bool(self._previous)

  def install(self) -> bool:
    """Installs the handlers; False (nothing done) off the main thread or when already in."""
    if self._previous or threading.current_thread() is not threading.main_thread():
      return False
    for s in SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return True

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def check(self, message: str = "") -> None:
    """Raises Interrupted if a stop was requested (and clears the request: it is acted on)."""
    if self.signum is not None:
      signum, self.signum = self.signum, None
      raise Interrupted(signum, message)

  def clear(self) -> None:
    self.signum = None


STOP = StopRequests()


@contextlib.contextmanager
def handling_stops():
  """Installs the handlers for the block if nobody has (and removes them after); yields STOP."""
  installed = STOP.install()
  try:
    yield STOP
  finally:
    if installed:
      STOP.restore()
