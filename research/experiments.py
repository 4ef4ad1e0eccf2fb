"""Finds experiments by name and loads their config and sweep.

An experiment is a directory `experiments/<name>/` holding

  config.py   get_config(arg: str) -> ConfigDict; module attributes CLAIM (one line) and
              SCALES (tuple of scale names), and a docstring with the launch command
  sweep.py    get_sweep() -> Sweep: the paper's ablation tables as named groups of arms, and
              the headline arms that `research scoreboard` shows (Sweep.headline); `get_sweep`
              here adds to a sweep with headlines the derived group `common` (COMMON_GROUP):
              its headline arms and their baselines at the common scoreboard setting
              (research/scoreboard.py `common_group`)
  README.md   the claim, the paper's numbers, our results and verdicts
  analysis.py optional: analyze(experiment, runs_root, groups, out_dir) -> Markdown that
              `research report` appends (fits, heat maps)

The experiments directory is `experiments/` beside the `research` package (an editable
install), or `$RESEARCH_EXPERIMENTS_DIR`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from research import config as config_lib
from research.errors import ResearchError


class ExperimentError(ResearchError, ValueError):
  """An experiment, group or argument that does not exist."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One row of an ablation table: a name, config overrides, the paper's numbers for it, and
  the paper's claim about its loss against the group's reference arm ("lower", "higher",
  "same"; None: no claim), which `research report` judges by the verdict rule
  (research/verdict.py)."""
  name: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  paper: dict[str, float] | None = None
  claim: str | None = None


@dataclasses.dataclass(frozen=True)
class Headline:
  """An arm that embodies the paper's method, as `research scoreboard` shows it: arm `arm` of
  group `group` against `baseline` (default: the group's reference arm). The verdict is the
  report's for the arm (its `Arm.claim` against the reference); against another baseline
  (e.g. the Transformer row of a table whose reference is the paper's own model), `claim` is
  the paper's claim against that baseline (None: no claim at this scale)."""
  group: str
  arm: str
  baseline: str = ""
  claim: str | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Named groups of arms (one group per paper table), run at `arg` with `seeds` seeds each.

  references: group -> the arm every other arm is compared with (default: the group's first
  arm; "" for none, e.g. a learning-rate sweep). varies: group -> config keys the table varies
  on purpose among those `research report` watches for confounds (init, data, optimizer and
  schedule, model size; report.WATCHED), so that a difference there is not flagged.
  superseded: group -> why another group carries the verdicts that this one's arms would give
  (e.g. a table measured with a handicapped baseline, kept as a sensitivity table): its report
  shows the comparisons but no verdict words.
  headline: the arms that embody the paper's method, each against its baseline: the rows
  `research scoreboard` shows for this experiment (none: the experiment has no row there).
  args: group -> the experiment argument of a group run at another one than `arg` (the
  derived `common` group's). unavailable: group -> why a derived group could not be built
  (`group` raises it).
  """
  groups: dict[str, list[Arm]]
  arg: str = "scale=tiny"
  seeds: int = 3
  default_group: str = ""
  references: dict[str, str] = dataclasses.field(default_factory=dict)
  varies: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  superseded: dict[str, str] = dataclasses.field(default_factory=dict)
  headline: tuple[Headline, ...] = ()
  args: dict[str, str] = dataclasses.field(default_factory=dict)
  unavailable: dict[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for h in self.headline:
      arms = [a.name for a in self.groups.get(h.group, ())]
      baseline = h.baseline or self.reference(h.group)
      if h.arm not in arms or baseline not in arms or baseline == h.arm:
        raise ExperimentError(
            f"headline {h.group}/{h.arm} against {baseline or 'no baseline'!r}: both must be two "
            f"arms of group {h.group!r} (its arms: {', '.join(arms) or 'none'})")

  def group(self, name: str | None) -> tuple[str, list[Arm]]:
    name = name or self.default_group or next(iter(self.groups))
    if name in self.unavailable:
      raise ExperimentError(f"sweep group '{name}' cannot be built: {self.unavailable[name]}")
    if name not in self.groups:
      raise config_lib.unknown_key_error(name, self.groups, what="sweep group")
    return name, self.groups[name]

  def arg_of(self, group: str) -> str:
    """The experiment argument the group's arms run at."""
    return self.args.get(group, self.arg)

  def reference(self, group: str) -> str:
    """The group's reference arm ("" for none)."""
    if group in self.references:
      return self.references[group]
    arms = self.groups.get(group) or []
    return arms[0].name if arms else ""


def experiments_dir() -> Path:
  env = os.environ.get("RESEARCH_EXPERIMENTS_DIR")
  return Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"


def list_experiments() -> list[str]:
  root = experiments_dir()
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir() if (p / "config.py").is_file())


def _load_module(name: str, filename: str) -> ModuleType:
  names = list_experiments()
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ExperimentError(f"unknown experiment '{name}'{hint} (see `research list`)")
  path = experiments_dir() / name / filename
  if not path.is_file():
    raise ExperimentError(f"experiment '{name}' has no {filename}")
  mod_name = f"research_experiments.{name}.{path.stem}"
  spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[mod_name] = module
  spec.loader.exec_module(module)
  return module


def load_config_module(name: str) -> ModuleType:
  return _load_module(name, "config.py")


def split_name(spec: str) -> tuple[str, str]:
  """'baseline:scale=tiny' -> ('baseline', 'scale=tiny')."""
  name, _, arg = spec.partition(":")
  return name, arg


def get_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config of `NAME[:ARG]` with dotted overrides applied (unknown keys are errors)."""
  name, arg = split_name(spec)
  module = load_config_module(name)
  config = module.get_config(arg)
  config_lib.apply_overrides(config, overrides or {})
  return config


# The derived group of every sweep that declares headlines: its headline arms and their
# baselines at the common scoreboard setting (research/scoreboard.py `common_group`).
COMMON_GROUP = "common"


def get_sweep(name: str, *, common: bool = True) -> Sweep:
  """The experiment's sweep; with `common`, and headlines declared, with its derived `common`
  group (or, where that cannot be built, the reason in `Sweep.unavailable`)."""
  sweep = _load_module(name, "sweep.py").get_sweep()
  if not common or not sweep.headline:
    return sweep
  if COMMON_GROUP in sweep.groups:
    raise ExperimentError(f"experiment '{name}': the group name '{COMMON_GROUP}' is reserved for "
                          "the derived group of the headline arms at the common setting")
  from research import scoreboard  # pylint: disable=import-outside-toplevel
  return scoreboard.with_common_group(name, sweep)


def describe(name: str) -> tuple[str, tuple[str, ...]]:
  """(one-line claim, scales) of an experiment."""
  module = load_config_module(name)
  return getattr(module, "CLAIM", ""), tuple(getattr(module, "SCALES", ()))
