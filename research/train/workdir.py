"""A run's work directory: its lock, its config record, and the rules for resuming in it.

Lock. `W/lock` is held (an exclusive `flock`) by the one process that trains in W, from before it
writes anything until it exits; the file records the owner's host, pid, start time and
command. A second process on W stops at once with `WorkdirBusy` naming the owner. The kernel
drops the lock when its process dies, however it dies, so a lock record left behind by a
killed run (same host, process gone) is taken over with a message. A record from another host
that the file system lets us lock is taken over too (the lock is not held there); where the file
system cannot lock at all, such a record is refused, since its owner cannot be checked.

Resume rules (`plan`). A work directory holding `config.json` is
  - resumed (or reported finished) when the requested config is the same, up to the keys that
    never change what a run computes (`IGNORED`: where the corpora live, the progress bar) and
    the keys a resumed run may change (`ADJUSTABLE`: how often it logs, evaluates and saves,
    the attention kernel);
  - extended when `train.steps` alone grew: training continues from the last checkpoint to
    the new end, with the schedule recomputed for the new length (said at start);
  - refused otherwise, naming every differing key with its old and new value, unless the run
    is started over (`restart`: the run's files are removed first).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import ml_collections

from research import config as config_lib
from research import run_config
from research.errors import RunError, WorkdirBusy

LOCK = "lock"
# the files a run writes in its work directory (removed by a restart; the lock stays)
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "connections.json",
             "connections.png", "checkpoints", "corrupt_checkpoints")
# keys that never change what a run computes: where the corpora live (the corpus itself is
# checked by its sha256 when loaded) and the progress bar
IGNORED = frozenset({"data.data_dir", "train.progress"})
# keys a resumed run may change: how often it logs, evaluates and saves, and which kernel
# computes its attention (the same function; a run begun on one backend resumes on another)
ADJUSTABLE = frozenset({"train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                        "eval.every", "model.attention.impl"})

_MISSING = object()


def config_differences(old: dict, new: dict) -> list[str]:
  """Dotted keys whose value in the config of a run on disk (`old`) differs from `new`.

  A resolved config holds only the settings its run reads (run_config.read_settings: an
  option that is off, such as `train.expand` without an expansion step, has no section), so
  the comparison runs both ways:
  - a key the old run does not have (an option added to the code since it started, or one it
    had off) is no difference when `new` holds the key's default value: the default reproduces
    the old code's behaviour, so such a run still resumes;
  - a key the old run read and `new` lacks is no difference when its stored value is the
    default; otherwise it is one (an expanding run against a config that does not expand).
    Settings the old run stored but never read (of options it did not select) are not compared.
  The IGNORED keys are never differences, nor is a `model.vocab_size` of 0 in `new` (the
  tokenizer's, filled in when the run starts).
  """
  # compared in the form a run stores them (config.json): tuples read back as lists
  stored = lambda d: json.loads(json.dumps(d, default=str))  # noqa: E731  (as write_record)
  new, old, defaults = stored(new), stored(old), stored(run_config.default_config().to_dict())
  diffs = []
  for k in config_lib.flat_keys(ml_collections.ConfigDict(new)):
    if k in IGNORED or (k == "model.vocab_size" and config_lib.get_dotted(new, k) == 0):
      continue
    was, now = config_lib.get_dotted(old, k, _MISSING), config_lib.get_dotted(new, k)
    if was is _MISSING:
      if now != config_lib.get_dotted(defaults, k, _MISSING):
        diffs.append(k)
    elif was != now:
      diffs.append(k)
  for k in config_lib.flat_keys(run_config.read_settings(old)):
    if k in IGNORED or config_lib.get_dotted(new, k, _MISSING) is not _MISSING:
      continue
    if config_lib.get_dotted(old, k) != config_lib.get_dotted(defaults, k, _MISSING):
      diffs.append(k)
  return sorted(diffs)


def _value(d: dict, key: str):
  v = config_lib.get_dotted(d, key, _MISSING)
  return "(absent)" if v is _MISSING else repr(v)


def describe_differences(old: dict, new: dict, keys: list[str]) -> str:
  return "; ".join(f"{k} {_value(old, k)} -> {_value(new, k)}" for k in keys)


# ------------------------------------------------------------------------------------- lock

def _host() -> str:
  return socket.gethostname()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _describe_owner(owner: dict) -> str:
  return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since "
          f"{owner.get('started', '?')}: {owner.get('command', '?')})")


class WorkdirLock:
  """The exclusive lock of one work directory (see the module docstring). Use as a context
  manager, or `acquire()` / `release()`."""

  def __init__(self, workdir: str | Path, *, log=print):
    self.workdir = Path(workdir)
    self.path = self.workdir / LOCK
    self.log = log
    self._fd: int | None = None

  def _read(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    try:
      return json.loads(text) if text else {}
    except ValueError:
      return {"command": text[:200]}

  def acquire(self) -> "WorkdirLock":
    make_workdir(self.workdir)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise RunError(f"cannot create the lock file {self.path}: {e.strerror}") from None
    kernel_lock = True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = self._read(fd)
      os.close(fd)
      raise WorkdirBusy(f"{self.workdir} is in use by {_describe_owner(owner)}; wait for that "
                        "run to end, or use another work directory") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
        os.close(fd)
        raise RunError(f"cannot lock {self.path}: {e.strerror}") from None
      kernel_lock = False  # a file system without locks: the record alone decides
    previous = self._read(fd)
    if previous.get("pid") is not None:
      same_host = previous.get("host") == _host()
      if not kernel_lock and (not same_host or _alive(int(previous["pid"]))):
        os.close(fd)
        raise WorkdirBusy(
            f"{self.workdir} is in use by {_describe_owner(previous)} as far as its lock "
            f"record says (this file system cannot lock); if that run has ended, delete "
            f"{self.path}")
      self.log(f"taking over the lock of {self.workdir} from {_describe_owner(previous)}, "
               "which ended without releasing it")
    record = {"host": _host(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # an empty record: released, nothing to take over
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def lock_holder(workdir: str | Path) -> dict | None:
  """The lock record of the live process holding `workdir`'s lock, or None when it is free."""
  path = Path(workdir) / LOCK
  if not path.is_file():
    return None
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    text = path.read_text().strip()
    try:
      return json.loads(text) if text else {}
    except ValueError:
      return {}
  except OSError:
    return None
  finally:
    os.close(fd)
  return None


def make_workdir(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise RunError(f"the work directory {workdir} (or a parent of it) is a file, "
                   "not a directory") from None
  except OSError as e:
    raise RunError(f"cannot create the work directory {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK):
    raise RunError(f"the work directory {workdir} is not writable")


# ------------------------------------------------------------------------------- resume plan

def read_record(workdir: Path) -> dict | None:
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    raise RunError(f"{path} is not valid JSON; move the run away or pass --restart") from None


def read_summary(workdir: Path) -> dict | None:
  path = Path(workdir) / "summary.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    return None  # a summary cut short: the run's last step is redone from its checkpoint


def checkpoint_steps(workdir: str | Path) -> list[int]:
  """The finished step directories under W/checkpoints (orbax's layout), sorted, without
  orbax."""
  root = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()) \
      if root.is_dir() else []


def latest_checkpoint_step(workdir: Path) -> int | None:
  """The newest finished step directory under W/checkpoints."""
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None


def plan(workdir: Path, config: dict) -> tuple[str, str]:
  """(action, message) for training the resolved `config` (a dict) in `workdir`.

  action: "new" (nothing there), "resume" (an unfinished run of this config, perhaps with
  adjusted logging), "finished" (nothing to do), or "extend" (a finished or unfinished run
  whose train.steps grew or changed). Anything else raises RunError naming the differences.
  """
  record = read_record(workdir)
  if record is None:
    return "new", ""
  old = record.get("config", {})
  diffs = config_differences(old, config)
  hard = [k for k in diffs if k not in ADJUSTABLE and k != "train.steps"]
  if hard:
    raise RunError(f"{workdir} holds a run with a different config: "
                   f"{describe_differences(old, config, hard)}; pass --restart to discard it "
                   "and start over there, or use another work directory")
  notes = []
  soft = [k for k in diffs if k in ADJUSTABLE]
  if soft:
    notes.append(f"changed on resume: {describe_differences(old, config, soft)}")
  summary = read_summary(workdir)
  new_steps = config["train"]["steps"]
  if "train.steps" in diffs:
    old_steps = config_lib.get_dotted(old, "train.steps")
    done = summary["step"] if summary else latest_checkpoint_step(workdir) or 0
    if new_steps <= done:
      raise RunError(f"{workdir} holds a run trained to step {done}; train.steps={new_steps} "
                     "would not extend it (pass --restart to start over with fewer steps)")
    notes.append(f"extending the run from train.steps={old_steps} to {new_steps} (trained to "
                 f"step {done}): the learning-rate schedule is recomputed for {new_steps} steps, "
                 "so from here on it differs from the old run's")
    return "extend", "; ".join(notes)
  if summary is not None:
    return "finished", "; ".join(notes)
  return "resume", "; ".join(notes)


# what a fork may not change: the train state's shapes (model, optimizer) and the data stream
FORK_FIXED = ("model.", "train.optimizer", "train.lowbit.", "train.batch_size", "data.")


def copy_fork(source: str | Path, step: int, workdir: Path, config: dict | None = None) -> str:
  """Seeds the new run directory `workdir` with checkpoint `step` of the run in `source` (the
  whole train state, the data iterator's position and unlogged metrics) and its metrics up to
  that step, so the run resumes there under its own config (a fork: e.g. the same weights
  annealed over a span). `config` (the fork's resolved config) may differ from the source's in
  the schedule and the other train settings, not in FORK_FIXED. Returns the note config.json's
  history records."""
  source = Path(source)
  ckpt = source / "checkpoints" / str(step)
  if not ckpt.is_dir():
    raise RunError(f"cannot fork {source} at step {step}: it has no checkpoint there "
                   f"(checkpoints: {checkpoint_steps(source) or 'none'})")
  record = read_record(source)
  if record is None:
    raise RunError(f"cannot fork {source}: it holds no run (no config.json)")
  if config is not None:
    fixed = [k for k in config_differences(record.get("config", {}), config)
             if k.startswith(FORK_FIXED) and k not in ("data.data_dir",)]
    if fixed:
      raise RunError(f"a fork of {source} keeps its model, optimizer and data; these differ: "
                     f"{describe_differences(record.get('config', {}), config, fixed)}")
  shutil.copytree(ckpt, Path(workdir) / "checkpoints" / str(step))
  rows = [row for row in read_metrics(source / "metrics.jsonl") if row["step"] <= step]
  (Path(workdir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return f"forked from {source.absolute()} at step {step}"


def clear_run(workdir: Path, log=print) -> None:
  """Removes the run files of `workdir` (for --restart); the lock and anything else stay."""
  removed = []
  for name in RUN_FILES:
    p = Path(workdir) / name
    if p.is_dir():
      shutil.rmtree(p)
      removed.append(name)
    elif p.exists():
      p.unlink()
      removed.append(name)
  if removed:
    log(f"restart: removed {', '.join(removed)} from {workdir}")


def write_record(workdir: Path, record: dict, previous: dict | None, note: str) -> None:
  """Writes config.json; a run whose config changed on resume keeps the history of changes."""
  history = list((previous or {}).get("history", []))
  if previous is not None and note:
    history.append({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                    "change": note})
  if history:
    record = {**record, "history": history}
  _atomic_write(Path(workdir) / "config.json", json.dumps(record, indent=2, default=str))


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------- metrics

def read_metrics(path: Path) -> list[dict]:
  """The rows of a metrics.jsonl; a last line cut short by a kill is dropped."""
  rows = []
  if not Path(path).is_file():
    return rows
  for line in Path(path).read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and "step" in row:
      rows.append(row)
  return rows


def cut_metrics(path: Path, step: int) -> list[dict]:
  """Keeps the rows of `path` up to `step` (the restored checkpoint's) and returns them: the
  rows a killed run wrote after its last checkpoint are redone by the resumed run, so the file
  then holds each step once, as an uninterrupted run's would."""
  rows = read_metrics(path)
  kept = [r for r in rows if r["step"] <= step]
  if Path(path).is_file() and (len(kept) != len(rows) or
                               len(Path(path).read_text().splitlines()) != len(rows)):
    _atomic_write(Path(path), "".join(json.dumps(r) + "\n" for r in kept))
  return kept
