"""Runs an experiment's ablation group: every arm x seed in sequence, resumable.

Runs go to `<runs_dir>/<experiment>/<group>/<arm>/seed<k>/`; the group's `manifest.json` lists
every (arm, seed) of the group with its overrides, the paper's numbers and a status (pending,
running, done, failed, reported), also when `--arms` runs only some of them. A finished run
(summary.json present) is skipped; an interrupted one resumes from its checkpoint, so
re-running the same sweep command continues where it stopped.

With `skip_reported`, arms that the experiment's committed results (results/results.json,
written by `research report`) already hold with every seed, under the same overrides and
argument, are not trained: a table half measured in one place is finished in another without
its runs, and the report carries those rows over. So are arms whose resolved config a row of
another table reports with every seed (another group, or another experiment: `ReportedRows`):
their manifest entries say `"status": "reported", "reported": "<experiment>/<group>/<arm>"`,
and the report shows that row, marked as measured there.

Before anything trains, every selected (arm, seed) is checked: its config builds and its values
are in range, a sweep override does not set a key the group's arms set (the arm names that
value), and a run already in its directory has the same config (or only more steps: it is
extended; workdir.plan). A run whose directory another live process holds is skipped
("busy") and left to that process.

An arm's seeds train together, stacked into one vmapped program (`stack_seeds`, the default;
`research sweep --no_stack_seeds` trains them one after another): each seed still has its own
run directory, checkpoints and summary, equal to its single run up to fp32 rounding.

A sweep that declares headline arms has a derived group `common` (experiments.get_sweep): the
headline arms and their baselines at the common scoreboard setting, run at the group's own
argument (`Sweep.arg_of`); with `skip_reported`, its arms whose config a committed row of any
experiment reports (the common dense baseline: polycom's `swiglu`, sdd's `pre`) are shown, not
trained.

Groups often share arms (the baseline of one table is the pre-norm arm of another; two papers
at the same shape share their baseline). Before training an (arm, seed), the sweep looks for a
finished run in the runs directory whose resolved config is the same (`same_config`); if there
is one, the manifest entry points at it (`"reused": "<experiment>/<group>/<arm>/seed<k>"`) and
nothing is trained twice. A finished twin is preferred to resuming the arm's own interrupted
run: the two are the same run, and the twin is already done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import traceback
from pathlib import Path
from typing import Any

from research import config as config_lib
from research import run_config
from research import experiments
from research import report as report_lib
from research.data import synthetic
from research.errors import ResearchError, RunError, WorkdirBusy
from research.train import workdir as workdir_lib
from research.train.trainer import Trainer, train_seeds
from research.train.workdir import config_differences

# Keys that do not change what a run computes: where the corpora live, the progress bar, and
# the vocabulary size (0 in a config means "the tokenizer's", filled in when the run starts).
_IRRELEVANT_KEYS = frozenset({"data.data_dir", "train.progress", "model.vocab_size"})
# Switches that add metrics and change nothing a run computes for its update (same_config: a
# run with one on is the twin of a run with it off, not the reverse)
_OBSERVATION_SWITCHES = frozenset({"train.log_layer_grad_norms"})

# A resolved config holds only the settings of the options it selects (research/run_config.py),
# and matching compares the keys of the config that would run: settings of options it does not
# select (a dense-FFN run's `model.channel.moe.*`, stored by runs older than that rule) never
# count. `attention.prefill` is inference-only, but the trained run is what evaluation loads,
# so it counts like any switch.


def manifest_path(runs_dir: Path, experiment: str, group: str) -> Path:
  return Path(runs_dir) / experiment / group / "manifest.json"


def new_entries(group_arms: list, seeds: int, overrides: dict | None) -> list[dict]:
  """A group's manifest entries before any run: arm x seed index k, each with the overrides
  it trains with. Seed k trains with `seed` k, or, for an arm that names its own `seed` (such as
  qat_scaling's seed-noise arms), with that seed + k (the index used to replace the arm's seed,
  and those arms trained seed 0 again)."""
  return [{"arm": arm.name, "seed": k, "workdir": f"{arm.name}/seed{k}",
           "overrides": {**arm.overrides, **(overrides or {}),
                         "seed": int(arm.overrides.get("seed", 0)) + k},
           "paper": arm.paper, "status": "pending"}
          for arm in group_arms for k in range(seeds)]


@contextlib.contextmanager
def _manifest_lock(path: Path):
  """An exclusive lock on `path`'s group between its read and its write (POSIX advisory)."""
  with open(path.with_name(path.name + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_sweep(name: str, *, group: str | None = None, seeds: int | None = None,
              arg: str | None = None, arms: list[str] | None = None,
              runs_dir: str | Path = "runs", overrides: dict[str, Any] | None = None,
              data_dir: str | None = None, skip_reported: bool = False,
              stack_seeds: bool = True,
              results_dir: str | Path | None = None, results_root: str | Path | None = None,
              log=print) -> Path:
  """Runs (or continues) a sweep group; returns the manifest path. Raises if an arm failed.

  `arg` replaces the sweep's experiment argument (e.g. "scale=smoke" to check a table end to
  end in seconds); for the derived `common` group it sets those keys of the group's argument,
  and the group is derived again there ("scale=smoke": the common setting at the smoke scale;
  research/scoreboard.py `common_group`). `arms` keeps only the named arms. `stack_seeds`: an
  arm's seeds that are to be trained train as one seed-stacked program (research/train/loop.py),
  each in its own run directory; off, one after another. `results_root` holds
  `<experiment>/results/results.json` for every experiment (default: experiments/), read by
  `skip_reported`; `results_dir` replaces this experiment's results directory in it.
  """
  sweep = experiments.get_sweep(name)
  if arg is not None and group == experiments.COMMON_GROUP and sweep.headline:
    from research import scoreboard  # pylint: disable=import-outside-toplevel
    sweep = scoreboard.with_common_group(name, experiments.get_sweep(name, common=False), arg)
    arg = None
  group, group_arms = sweep.group(group)
  selected = {a.name for a in group_arms}
  if arms:
    known = {a.name: a for a in group_arms}
    for a in arms:
      if a not in known:
        raise config_lib.unknown_key_error(a, known, what=f"arm of sweep group '{group}'")
    selected = set(arms)
  seeds = sweep.seeds if seeds is None else seeds
  if seeds < 1:
    raise config_lib.ConfigError(f"--seeds={seeds}: a sweep needs at least one seed")
  _check_overrides(group, group_arms, overrides or {})
  arg = sweep.arg_of(group) if arg is None else arg
  root = Path(runs_dir) / name / group
  path = manifest_path(runs_dir, name, group)
  previous = {}  # (arm, seed) -> entry of an earlier invocation's manifest
  if path.exists():
    previous = {(e["arm"], e["seed"]): e for e in json.loads(path.read_text()).get("arms", [])}
  entries = []
  for entry in new_entries(group_arms, seeds, overrides):
    old = previous.get((entry["arm"], entry["seed"]))
    if old and old.get("reused") and old["overrides"] == entry["overrides"]:
      entry.update(workdir=old["workdir"], reused=old["reused"])
    if old and old.get("reported") and old["overrides"] == entry["overrides"]:
      entry.update(status="reported", reported=old["reported"])  # looked up again below
    entries.append(entry)  # (other invocations' arms: save() reads their entries back)
  manifest = {"experiment": name, "group": group, "arg": arg, "arms": entries}
  path.parent.mkdir(parents=True, exist_ok=True)
  mine = frozenset(selected)  # the arms whose entries this invocation writes (trained or not)

  def save():
    """Writes the manifest. The entries of arms this invocation does not run are read back
    from disk first, under a lock: two sweeps of one group's disjoint arms (one per core) each
    write their own arms' progress and keep the other's (its "reported" and "reused" marks)."""
    with _manifest_lock(path):
      if path.exists():
        disk = {(e["arm"], e["seed"]): e for e in json.loads(path.read_text()).get("arms", [])}
        for i, e in enumerate(entries):
          theirs = disk.get((e["arm"], e["seed"]))
          if e["arm"] not in mine and theirs and theirs["overrides"] == e["overrides"]:
            entries[i] = theirs
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text(json.dumps(manifest, indent=2, default=str))
      os.replace(tmp, path)  # a reader never sees half a manifest

  configs = _check_arms(name, arg, root, [e for e in entries if e["arm"] in selected
                                          and not e.get("reused")], data_dir)
  for e in entries:
    if (root / e["workdir"] / "summary.json").exists() and configs.get(
        (e["arm"], e["seed"]), "finished") == "finished":
      e["status"] = "done"
      e.pop("reported", None)
  save()
  if skip_reported:
    results_root = experiments.experiments_dir() if results_root is None else Path(results_root)
    results_dir = results_root / name / "results" if results_dir is None else Path(results_dir)
    reported = ReportedRows(results_root, {name: results_dir})
    for arm_name in [a.name for a in group_arms if a.name in selected]:
      own = [e for e in entries if e["arm"] == arm_name]
      date = reported.own_row(name, group, arm_name, arg, own[0]["overrides"], seeds)
      if date is not None:  # this table's own row: the report carries it over
        selected.discard(arm_name)
        log(f"{arm_name}: all {seeds} seeds reported in {results_dir / 'results.json'} "
            f"({date}), skipped")
        continue
      if any(e["status"] == "done" for e in own):  # its own seeds (or reused runs) count
        continue
      config = experiments.get_config(f"{name}:{arg}", own[0]["overrides"])
      twin = reported.find(config, seeds, exclude=(name, group, arm_name))
      if twin is None:
        continue
      source, date = twin
      selected.discard(arm_name)
      for e in own:
        e.update(status="reported", reported=source)
      log(f"{arm_name}: same config as {source}, reported with all {seeds} seeds ({date}), "
          "skipped")
    save()
  failed, busy = [], []
  todo = [e for e in entries if e["arm"] in selected]
  to_train: dict[str, list[tuple[str, dict, Any, Path, dict]]] = {}  # arm -> its runs to train
  for i, e in enumerate(todo):
    tag = f"[{i + 1}/{len(todo)}] {e['arm']} seed {e['seed']}"
    if e["status"] == "done":
      log(f"{tag}: finished, skipped")
      continue
    ov = dict(e["overrides"])
    if data_dir:
      ov["data.data_dir"] = data_dir
    config = experiments.get_config(f"{name}:{arg}", ov)
    workdir = root / e["workdir"]
    twin = find_finished_twin(Path(runs_dir), config, exclude=workdir)
    if twin is not None:  # the same run, finished in another group: point at it
      e.update(workdir=os.path.relpath(twin, root), status="done",
               reused=twin.relative_to(Path(runs_dir)).as_posix())
      e.pop("reported", None)
      log(f"{tag}: same config as {e['reused']}, reused"
          + (f" (the interrupted run in {workdir} is left as it is)" if workdir.exists() else ""))
      save()
      continue
    to_train.setdefault(e["arm"], []).append((tag, e, config, workdir, ov))

  def train(runs) -> None:
    """Trains one arm's runs: its seeds as one seed-stacked program when there are several
    (train_seeds; one after another where they cannot stack), else the one run."""
    for tag, e, *_ in runs:
      log(tag)
      e["status"] = "running"
      e.pop("reported", None)  # trained here after all
    save()
    trainers = [Trainer(config, workdir, experiment=name, arg=arg, overrides=ov, log=log)
                for _, _, config, workdir, ov in runs]
    if stack_seeds and len(trainers) > 1:
      train_seeds(trainers)
    else:
      trainers[0].run()
    for _, e, *_ in runs:
      e["status"] = "done"

  for arm, runs in to_train.items():
    batches = [runs] if stack_seeds else [[r] for r in runs]
    while batches:
      batch = batches.pop(0)  # (not `group`: the error below names the sweep's group)
      try:
        train(batch)
      except KeyboardInterrupt:
        for _, e, *_ in batch:
          e["status"] = "pending"
        save()
        raise
      except WorkdirBusy as err:
        if len(batch) > 1:  # another process holds one of them: the others one by one
          batches = [[r] for r in batch] + batches
          continue
        tag, e = batch[0][:2]  # another process trains this run: leave it to that process
        log(f"{tag}: skipped, {err}")
        e["status"] = "busy"
        busy.append(f"{e['arm']} seed {e['seed']}")
      except Exception as err:  # one failed arm must not stop the table; reported at the end
        log(f"{arm}: failed: {err}" if isinstance(err, ResearchError) else traceback.format_exc())
        for _, e, *_ in batch:
          e["status"] = "failed"
          failed.append(f"{e['arm']} seed {e['seed']}")
      save()
  if busy:
    log(f"{len(busy)} run(s) left to the processes that hold them: {', '.join(busy)}")
  if failed:
    raise RunError(f"sweep {name}/{group}: {len(failed)} run(s) failed: {', '.join(failed)} "
                   "(the log above says why; re-running the sweep retries them)")
  return path


def _check_overrides(group: str, arms: list, overrides: dict) -> None:
  """A sweep override may not set what the group's arms set: the arm's name stands for that
  value (an override would give every row one value under different labels)."""
  owned = {k for arm in arms for k in arm.overrides} | {"seed"}
  clash = sorted(k for k in overrides if k in owned)
  if clash:
    raise config_lib.ConfigError(
        f"--config.{clash[0]} is set by the arms of sweep group '{group}' (or by --seeds); a "
        "sweep override cannot change it: add an arm, or train the variant with `research run`")


def _check_arms(name: str, arg: str, root: Path, entries: list[dict],
                data_dir: str | None) -> dict[tuple[str, int], str]:
  """Builds every entry's config and checks it against a run already in its directory, before
  anything trains; returns (arm, seed) -> workdir.plan's action. Raises the first problem."""
  actions = {}
  for e in entries:
    ov = dict(e["overrides"])
    if data_dir:
      ov["data.data_dir"] = data_dir
    try:
      resolved = run_config.resolve(experiments.get_config(f"{name}:{arg}", ov))
      actions[(e["arm"], e["seed"])], _ = workdir_lib.plan(root / e["workdir"],
                                                           resolved.to_dict())
    except ResearchError as err:
      raise type(err)(f"arm {e['arm']} seed {e['seed']}: {err}") from None
  return actions


def _all_seeds(row: dict, seeds: int) -> bool:
  """Whether a results.json row has every one of `seeds` seeds finished or diverged."""
  return row.get("seeds_finished", 0) + row.get("diverged", 0) >= seeds


class ReportedRows:
  """The rows of every experiment's committed results.json, searched by resolved config.

  A row is a twin of an arm when it reports all of the arm's seeds and the config its
  experiment, argument and overrides (those of seed 0) resolve to today is the arm's
  (`same_config`): the same model measured in another table. Like `--skip_reported` itself,
  this trusts that the code has not changed what those overrides compute since the row was
  measured.
  """

  def __init__(self, results_root: Path, replace: dict[str, Path] | None = None):
    paths = {p.parent.parent.name: p
             for p in sorted(Path(results_root).glob("*/results/results.json"))}
    for experiment, results_dir in (replace or {}).items():
      paths[experiment] = Path(results_dir) / "results.json"
    self._rows = []  # (experiment, group, row, date), read once for every arm's search
    for experiment, path in paths.items():
      if not path.is_file():
        continue
      data = json.loads(path.read_text())
      for group in data.get("groups", []):
        for row in group.get("arms", []):
          date = row.get("date") or group.get("date") or data.get("date")
          self._rows.append((experiment, group, row, date))
    self._resolved: dict[tuple, dict | None] = {}
    self._signatures: dict[tuple, tuple | None] = {}

  def own_row(self, experiment: str, group: str, arm: str, arg: str, overrides: dict,
              seeds: int) -> str | None:
    """The date of `experiment`'s own row for `arm` of `group` when it reports all `seeds`
    seeds under the same argument and overrides (those of seed 0), else None."""
    for exp, stored, row, date in self._rows:
      if (exp == experiment and stored.get("group") == group and row.get("arm") == arm
          and stored.get("arg") == arg and _all_seeds(row, seeds)
          and report_lib.same_arm(experiment, arg, row.get("overrides"), overrides,
                                  config_of=self._config_of)):
        return date or ""
    return None

  def _config_of(self, experiment: str, arg: str, overrides: dict | None) -> dict | None:
    key = (experiment, arg, json.dumps(overrides or {}, sort_keys=True, default=str))
    if key not in self._resolved:  # None: not a twin of anything
      self._resolved[key] = resolved_config(experiment, arg, overrides)
    return self._resolved[key]

  def _signature_of(self, experiment: str, arg: str, overrides: dict) -> tuple | None:
    """The row's values of the SIGNATURE keys, from its unresolved config (cheap: a row whose
    signature differs is no twin, and its config is not resolved)."""
    key = (experiment, arg, json.dumps(overrides, sort_keys=True, default=str))
    if key not in self._signatures:
      try:
        self._signatures[key] = _signature(
            experiments.get_config(f"{experiment}:{arg}", overrides))
      except Exception:  # as in _config_of: not a twin of anything
        self._signatures[key] = None
    return self._signatures[key]

  def find(self, config, seeds: int, exclude: tuple[str, str, str] | None = None
           ) -> tuple[str, str] | None:
    """("<experiment>/<group>/<arm>", date) of a row that reports `config` (seed 0's) with
    `seeds` finished or diverged seeds, or None."""
    resolved = run_config.resolve(config).to_dict()
    signature = _signature(resolved)
    observing_more = None  # the first row that is a twin only by logging more
    for experiment, group, row, date in self._rows:
      source = (experiment, group.get("group"), row.get("arm"))
      if source == exclude or row.get("seeds_total") != seeds or not _all_seeds(row, seeds):
        continue
      args = (experiment, group.get("arg", ""), row.get("overrides") or {})
      if self._signature_of(*args) != signature:
        continue
      other = self._config_of(*args)
      kind = None if other is None else twin_kind(other, resolved)
      if kind is None:
        continue
      found = row.get("from") or "/".join(source), date  # a row shown for another: its source
      if kind == EXACT:
        return found  # an exact twin first
      observing_more = observing_more or found
    return observing_more


# Keys that resolving a config never changes (run_config.resolve fills derived values: KV
# heads, head_dim, FFN width, ...): configs that differ in one of them resolve to different
# configs, so ReportedRows compares them before it resolves a row's config.
SIGNATURE = ("model.num_layers", "model.d_model", "model.init_std", "data.corpus",
             "data.tokenizer", "data.seq_len", "train.steps", "train.batch_size", "train.lr",
             "train.b1", "train.b2", "train.optimizer")


def _signature(config) -> tuple:
  d = config if isinstance(config, dict) else config.to_dict()
  return tuple(config_lib.get_dotted(d, key) for key in SIGNATURE)


EXACT, OBSERVES_MORE = "exact", "observes more"


def twin_kind(stored: dict, config) -> str | None:
  """How a run on disk (its config.json's "config") matches `config` (a ConfigDict, or the
  dict of an already resolved one), from one comparison: EXACT when it computes what `config`
  would, OBSERVES_MORE when it also logged what an observation-only switch adds
  (_observes_more), else None."""
  resolved = config if isinstance(config, dict) else run_config.resolve(config).to_dict()
  inert = inert_prefixes(resolved)
  diffs = [k for k in config_differences(stored, resolved)
           if k not in _IRRELEVANT_KEYS and not k.startswith(inert)]
  if not diffs:
    return EXACT
  return OBSERVES_MORE if all(_observes_more(stored, resolved, k) for k in diffs) else None


def same_config(stored: dict, config, observing_more: bool = True) -> bool:
  """Whether a run on disk computes what `config` would (twin_kind); with `observing_more`, a
  run that also logged what an observation-only switch adds counts."""
  kind = twin_kind(stored, config)
  return kind == EXACT or (observing_more and kind == OBSERVES_MORE)


def resolved_config(experiment: str, arg: str, overrides: dict | None) -> dict | None:
  """`experiment:arg`'s resolved config under `overrides`, as a dict; None when it no longer
  builds (an experiment or a key renamed since)."""
  try:
    return run_config.resolve(
        experiments.get_config(f"{experiment}:{arg}", overrides or {})).to_dict()
  except Exception:  # pylint: disable=broad-except
    return None


def overrides_resolve_alike(experiment: str, arg: str, a: dict | None, b: dict | None,
                            config_of=resolved_config) -> bool:
  """Whether two arms' overrides, however spelled, give `experiment:arg` one config (an arm
  that now spells out a value its config already had is the arm it was). False when either
  no longer builds. `config_of`: resolved_config or a caching twin of it (ReportedRows')."""
  ca, cb = config_of(experiment, arg, a), config_of(experiment, arg, b)
  return ca is not None and cb is not None and same_config(ca, cb, observing_more=False)


def _observes_more(stored: dict, config: dict, key: str) -> bool:
  """Whether `key` is an observation-only switch that the stored run has on and `config` off:
  such a run trained exactly the same steps (a test checks the losses are bit-identical) and
  logged more, so it stands in for the run `config` describes. The reverse does not hold: a
  run without the extra metrics cannot stand in for one whose report plots them."""
  return (key in _OBSERVATION_SWITCHES and config_lib.get_dotted(stored, key, False) is True
          and config_lib.get_dotted(config, key) is False)


def inert_prefixes(config: dict) -> tuple[str, ...]:
  """Key prefixes of `config` (a resolved config's dict) that its run never reads beyond the
  options' settings (which a resolved config no longer holds): the synthetic-task sizes of a
  text corpus."""
  if config_lib.get_dotted(config, "data.corpus") not in synthetic.TASKS:
    return ("data.synthetic.",)
  return ()


def find_finished_twin(runs_dir: Path, config, exclude: Path | None = None) -> Path | None:
  """A finished sweep run under `<runs_dir>/<experiment>/<group>/<arm>/seed<k>/` (any
  experiment: two papers' baselines are often the same model) whose config is `config`; an
  exact twin before one that only logged more (twin_kind)."""
  resolved = run_config.resolve(config).to_dict()
  observing_more = None
  for summary in sorted(Path(runs_dir).glob("*/*/*/seed*/summary.json")):
    workdir = summary.parent
    if exclude is not None and workdir.resolve() == Path(exclude).resolve():
      continue
    try:
      stored = json.loads((workdir / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
      continue
    kind = twin_kind(stored, resolved)
    if kind == EXACT:
      return workdir
    if kind == OBSERVES_MORE and observing_more is None:
      observing_more = workdir
  return observing_more
