"""Orbax checkpoints of a run: train state (params, optimizer, step) and data-iterator state.

Saves are asynchronous (training continues while the arrays are written) and the last
`keep` checkpoints are kept. Any failure to write is raised as CheckpointError so the run exits
non-zero rather than training on without a way back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read."""


class Checkpointer:

  def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "data"))
    except Exception as e:  # orbax raises many types; all mean "cannot checkpoint here"
      raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)
    except Exception as e:
      raise CheckpointError(f"checkpoint write at step {step} to {self.directory} failed: {e}") from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
    return out["state"], out["data"]

  def wait(self) -> None:
    """Blocks until pending asynchronous writes are on disk; raises if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"checkpoint write to {self.directory} failed: {e}") from e

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:
      raise CheckpointError(f"checkpoint write to {self.directory} failed: {e}") from e
