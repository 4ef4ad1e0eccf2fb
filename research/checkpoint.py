"""Orbax checkpoints of a run: train state (params, optimizer, step), data-iterator state, and
the training metrics of the steps since the last log line (so a resumed run logs the same rows).

Saves are asynchronous (training continues while the arrays are written) and the last `keep`
checkpoints are kept. Orbax writes a step into a temporary directory and renames it when it is
complete, so a step cut short by a kill is never taken for a checkpoint. Any failure to write
is raised as CheckpointError naming the step whose write failed (an asynchronous write fails
while the next step trains; the error surfaces at the next save or at the end), so the run exits
non-zero rather than training on without a way back. A newest checkpoint that cannot be read
(corrupted on disk) is moved to `corrupt_checkpoints/` beside the checkpoint directory, with a
warning, and the one before it is restored; when none can be read, CheckpointError says so.

`restore_model_state` is the one read path for everything but the trainer (inference, the
evaluators, a checkpoint's connection maps): it reads the step and the model's variables of a
checkpoint, read-only, without the optimizer state (so it needs no optimizer to shape it).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from research.errors import ResearchError


class CheckpointError(ResearchError, RuntimeError):
  """A checkpoint could not be written or read."""


def _reason(e: BaseException) -> str:
  """The innermost cause of an orbax error, on one line."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[-1] if text else ''}".strip(": ")


class _QuietOrbaxErrors(logging.Filter):
  """Drops the tracebacks orbax logs for a failed write: the CheckpointError that follows
  says what failed in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_QUIET = _QuietOrbaxErrors()


def _drop_closed_loop_callbacks(previous):
  """An unraisable-exception hook that drops the callbacks a failed asynchronous write leaves
  behind (tensorstore completing futures on orbax's closed event loop: 'Event loop is
  closed', one traceback each) and hands every other unraisable exception on."""

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  return hook


if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
  sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


class Checkpointer:

  def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._pending: int | None = None  # the step of the last save, until it is known written
    for name in ("absl", ""):
      logging.getLogger(name).addFilter(_QUIET)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "data", "log"))
    except Exception as e:  # orbax raises many types; all mean "cannot checkpoint here"
      raise CheckpointError(f"cannot create checkpoint directory {self.directory}: "
                            f"{_reason(e)}") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _failed(self, e: BaseException, step: int | None) -> CheckpointError:
    what = f"checkpoint write of step {step}" if step is not None else "checkpoint write"
    return CheckpointError(f"{what} to {self.directory} failed ({_reason(e)}); the run stopped "
                           "there, and re-running the command resumes from the last checkpoint "
                           "written")

  def _wait_pending(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._failed(e, self._pending) from e
    self._pending = None

  def save(self, step: int, state: Any, data_state: dict, log_state: dict | None = None, *,
           force: bool = False) -> None:
    self._wait_pending()  # a failure of the previous (asynchronous) save is named as its own
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          log=ocp.args.JsonSave(log_state or {})), force=force)
    except Exception as e:
      raise self._failed(e, step) from e
    self._pending = step

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, log_state) of `step`; log_state is {} for checkpoints written before
    it was saved."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if (self.directory / str(step) / "log").exists():
      items["log"] = ocp.args.JsonRestore()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory} "
                            f"({_reason(e)})") from e
    return out["state"], out["data"], (out["log"] if "log" in items else {}) or {}

  def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, log_state) of the newest readable checkpoint, or None when
    there is none. An unreadable newer one is moved aside with a warning. `abstract_state`
    may be a function of the step (a run whose shapes change: a width expansion)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    first_error = None
    for step in steps:
      try:
        abstract = abstract_state(step) if callable(abstract_state) else abstract_state
        return (step, *self.restore(step, abstract))
      except CheckpointError as e:
        first_error = first_error or e
        aside = self.directory.parent / "corrupt_checkpoints" / str(step)
        aside.parent.mkdir(parents=True, exist_ok=True)
        if aside.exists():
          shutil.rmtree(aside)
        shutil.move(str(self.directory / str(step)), aside)
        log(f"warning: checkpoint {step} in {self.directory} cannot be read ({e}); moved to "
            f"{aside}, trying the one before it")
        self._manager.reload()
    raise CheckpointError(f"no checkpoint in {self.directory} can be read (the newest: "
                          f"{first_error}); pass --restart to start the run over")

  def wait(self) -> None:
    """Blocks until pending asynchronous writes are on disk; raises if one failed."""
    self._wait_pending()

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:
      raise self._failed(e, self._pending) from e


def read_only_manager(directory: str | Path) -> ocp.CheckpointManager:
  """A read-only manager of the checkpoints under `directory` (the caller closes it): one for
  many restores, where opening one per restore would list the directory each time."""
  directory = Path(directory).absolute()
  try:
    return ocp.CheckpointManager(directory, item_names=("state", "data", "log"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
  except Exception as e:  # orbax raises many types; all mean "cannot read this directory"
    raise CheckpointError(f"cannot read checkpoints in {directory} ({_reason(e)})") from e


def restore_model_state(directory: str | Path, abstract: dict, step: int | None = None,
                        manager: ocp.CheckpointManager | None = None) -> tuple[int, dict]:
  """(step, {"step", "params", "other"}) of checkpoint `step` (default: the newest) under
  `directory`, read-only. `abstract`: ShapeDtypeStructs (with shardings) of those three entries
  of the trainer's state, or a function of the step that gives them (a run whose shapes change:
  a width expansion); its opt_state is not read. `manager`: an open read_only_manager of
  `directory` to read through (kept open), else one is opened and closed here."""
  directory = Path(directory).absolute()
  own = manager is None
  if own:
    manager = read_only_manager(directory)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{directory} holds no checkpoint")
    abstract = abstract(step) if callable(abstract) else abstract
    restore = ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)
    try:
      state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    except Exception as e:
      raise CheckpointError(f"cannot restore {directory} (step {step}): {_reason(e)}") from e
  finally:
    if own:
      manager.close()
  return int(step), state
