"""Tables and plots from runs' metrics.

This module reads only files on disk; it never imports the model or the trainer (only the
verdicts and the confound check resolve the sweep's configs: `_judge`, `confounds`). With no
runs at all, a report is regenerated from the results.json already there (tables, verdicts). The file
formats below are written by the trainer and the sweep runner, and this docstring is their
documentation.

A *run directory* holds:

* ``config.json``: ``{"experiment": str, "arg": str, "overrides": {...}, "config": {...},
  "git_revision": str, "packages": {...}}`` (the resolved config, nested).
* ``metrics.jsonl``: one JSON object per line. Training lines are
  ``{"split": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time"}``,
  evaluation lines ``{"split": "valid", "step", "loss", "bpb"}``. Extra numeric keys
  (e.g. ``"aux/load_balance"``) are kept; non-numeric ones are ignored. Losses may be NaN or
  inf for a diverged run (JSON written with ``allow_nan``). A resumed run may hold a step twice
  (the lines after the resumed checkpoint, written again): for each split the LAST line written
  for a step wins.
* ``summary.json``, only once the run finished: ``{"step", "valid_loss", "valid_bpb",
  "train_loss", "tokens_per_s", "params", "diverged", "layer_cosine"}`` (``diverged``: the run
  stopped on a non-finite loss; ``layer_cosine``: [num_layers] adjacent-layer similarity, see
  research/eval/layer_cosine.py). Training lines may also hold ``grad_norm/block_<i>``. Newer
  summaries add ``step_time_s``, ``params_activated``, ``flops_per_token_fwd``,
  ``param_bytes_per_token`` (research/model/accounting.py) and, on a synthetic task,
  ``valid_exact_match`` (valid lines then carry ``exact_match``); the tables show them when
  present.
* ``connections.json``, for hyper / frac / vwn residuals: each sublayer's static connection
  matrix and the unfolded map (research/eval/connections.py); an experiment's ``analysis.py``
  may plot them (see ``_analysis_hook``).

A *sweep* of experiment E, group G lives in ``<runs_dir>/<E>/<G>/manifest.json``::

    {"experiment": "baseline", "group": "lr", "arg": "scale=tiny",
     "arms": [{"arm": "lr=1e-3", "seed": 0, "workdir": "<absolute, or relative to the manifest>",
               "overrides": {"train.lr": 0.001}, "paper": {"valid_loss": 1.88} or null,
               "status": "done" | "running" | "failed" | "pending" | "reported"}, ...]}

with one entry per arm x seed; ``paper`` maps a label to the paper's reported number. An entry
may add ``"reused": "<experiment>/<group>/<arm>/seed<k>"`` (its workdir is that run) or
``"reported": "<experiment>/<group>/<arm>"``: not trained, because that row of
``experiments/<experiment>/results/results.json`` reports the same config; the report shows
that row (``_carry_reported``).

How a seed counts: it is *diverged* when any train/valid loss or its summary's valid loss is
not finite, its summary says so, or its last valid loss is more than ``SPIKE_NATS`` above its
best (a spike that did not recover); it is *finished* when it has a ``summary.json`` and did
not diverge. Means and
sample standard deviations (ddof=1) are taken over finished seeds only; diverged seeds are
reported as "k/n diverged" and left out of the plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # drawn off-screen, without touching pyplot's backend
import numpy as np

from research.errors import ResearchError


class ReportError(ResearchError):
  """A run or sweep on disk is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory, read back.

  ``metrics[split]`` maps "step" to a sorted int array and every numeric key seen in that
  split to a float array of the same length (NaN where a line lacked the key).
  """

  workdir: Path
  config: dict
  metrics: dict[str, dict[str, np.ndarray]]
  summary: dict | None

  def curve(self, split: str, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; empty arrays when the run never logged it."""
    series = self.metrics.get(split, {})
    if key not in series:
      return np.zeros((0,), np.int64), np.zeros((0,), np.float64)
    return series["step"], series[key]

  @property
  def diverged(self) -> bool:
    """A loss that is not finite, or a valid loss that ends more than SPIKE_NATS above its
    best (a spike that did not recover)."""
    losses = [self.curve(split)[1] for split in ("train", "valid")]
    if self.summary is not None:
      if self.summary.get("diverged"):
        return True
      losses.append(np.asarray([self.summary.get("valid_loss", math.nan)], np.float64))
    if any(not np.all(np.isfinite(v)) for v in losses):
      return True
    valid = losses[1]
    return bool(len(valid) and valid[-1] > valid.min() + SPIKE_NATS)

  def grad_profile(self, step: int) -> np.ndarray | None:
    """[num_layers] per-block gradient norms logged at `step` (train.log_layer_grad_norms)."""
    series = self.metrics.get("train", {})
    keys = sorted(k for k in series if k.startswith("grad_norm/block_"))
    if not keys or step not in series["step"]:
      return None
    i = int(np.nonzero(series["step"] == step)[0][0])
    return np.asarray([series[k][i] for k in keys])

  @property
  def finished(self) -> bool:
    return self.summary is not None and not self.diverged

  def final_train_loss(self, fraction: float = 0.1) -> float | None:
    """The mean training loss logged over the last `fraction` of the run's steps (the logged
    values are means over their logging interval), or None without a training log."""
    steps, losses = self.curve("train")
    if not len(steps):
      return None
    tail = steps > steps[-1] * (1.0 - fraction)
    return float(np.mean(losses[tail]))

  def stats(self, last: int = 5, until_step: int | None = None) -> dict[str, float]:
    """{name: value} of the statistics the forward recorded (`stat/<name>` of the training
    log): the mean of the last `last` logged values, or of those logged up to `until_step`."""
    series = self.metrics.get("train", {})
    out = {}
    for key in sorted(k for k in series if k.startswith("stat/")):
      steps, values = series["step"], series[key]
      if until_step is None:
        picked = values[np.isfinite(values)][-last:]
      else:
        picked = values[np.isfinite(values) & (steps <= until_step)]
      if len(picked):
        out[key[len("stat/"):]] = float(np.mean(picked))
    return out


SPIKE_NATS = 1.0
GRAD_PROFILE_STEPS = (1, 100, 1000)


def _read_json(path: Path):
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ReportError(f"{path} is not valid JSON ({e}); rewrite it or rerun the run.") from e


def _read_metrics(path: Path) -> dict[str, dict[str, np.ndarray]]:
  lines = path.read_text().splitlines()
  by_split: dict[str, dict[int, dict]] = {}
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # A crash can cut the last line short; drop it.
        continue
      raise ReportError(f"{path}:{i + 1} is not valid JSON ({e}); fix or remove that line.") from e
    if "split" not in record or "step" not in record:
      raise ReportError(f"{path}:{i + 1} has no 'split' or 'step' key; every metrics line needs both.")
    # Later lines overwrite earlier ones: after a resume the re-run steps win.
    by_split.setdefault(record["split"], {})[int(record["step"])] = record
  metrics = {}
  for split, records in by_split.items():
    steps = sorted(records)
    keys = {k for r in records.values() for k, v in r.items()
        if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    series = {"step": np.asarray(steps, np.int64)}
    for key in sorted(keys):
      values = [records[s].get(key, math.nan) for s in steps]
      series[key] = np.asarray([v if isinstance(v, (int, float)) else math.nan for v in values],
                   np.float64)
    metrics[split] = series
  return metrics


def _mean_finite(values) -> float | None:
  """Mean of the finite numbers among `values`, or None when there are none."""
  finite = [float(v) for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(finite)) if finite else None


def read_run(workdir: str | Path) -> Run:
  """Reads config.json, metrics.jsonl and (if present) summary.json of one run directory."""
  workdir = Path(workdir)
  metrics_path = workdir / "metrics.jsonl"
  if not metrics_path.exists():
    raise ReportError(f"no metrics.jsonl in {workdir}; start the run with `research run`.")
  config_path, summary_path = workdir / "config.json", workdir / "summary.json"
  config = _read_json(config_path) if config_path.exists() else {}
  summary = _read_json(summary_path) if summary_path.exists() else None
  return Run(workdir, config, _read_metrics(metrics_path), summary)


def _finite(values: np.ndarray) -> np.ndarray:
  """NaN where not finite, so that matplotlib leaves a gap instead of breaking autoscale."""
  return np.where(np.isfinite(values), values, np.nan)


def plot_run(workdir: str | Path, out_png: str | Path | None = None) -> Path:
  """Train loss (light) and valid loss (markers) over steps; saved as <workdir>/loss.png."""
  run = read_run(workdir)
  out_png = Path(out_png) if out_png is not None else run.workdir / "loss.png"
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  steps, loss = run.curve("train")
  if len(steps):
    ax.plot(steps, _finite(loss), color="tab:blue", alpha=0.35, linewidth=1, label="train")
  steps, loss = run.curve("valid")
  if len(steps):
    ax.plot(steps, _finite(loss), color="tab:orange", marker="o", markersize=4, label="valid")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(f"{run.config.get('experiment', '?')}: {run.config.get('arg', '')}")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  return out_png


@dataclasses.dataclass
class _Arm:
  """The seeds of one arm of a sweep, in manifest order."""

  name: str
  entries: list[dict] = dataclasses.field(default_factory=list)
  runs: list[Run | None] = dataclasses.field(default_factory=list)  # None: no metrics yet.

  @property
  def finished(self) -> list[Run]:
    return [r for r in self.runs if r is not None and r.finished]

  @property
  def n_diverged(self) -> int:
    return sum(r is not None and r.diverged for r in self.runs)

  @property
  def paper(self) -> dict:
    return next((e["paper"] for e in self.entries if e.get("paper")), {})

  @property
  def status(self) -> str:
    """What to print in place of numbers when no seed finished."""
    statuses = {e.get("status", "pending") for e in self.entries}
    if "running" in statuses:
      return "running"
    if self.n_diverged:
      return "diverged"
    return "failed" if "failed" in statuses else "not run"


def _stats(values: list[float]) -> dict:
  """Mean and sample std (ddof=1; None for a single value) of finished seeds."""
  if not values:
    return {"mean": None, "std": None, "values": []}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": float(np.mean(values)), "std": std, "values": [float(v) for v in values]}


def _fmt(stats: dict) -> str:
  std = "n/a" if stats["std"] is None else f"{stats['std']:.4f}"
  return f"{stats['mean']:.4f} ± {std}"


def _load_sweep(manifest_path: Path) -> tuple[dict, list[_Arm]]:
  manifest = _read_json(manifest_path)
  arms: dict[str, _Arm] = {}
  for entry in manifest.get("arms", []):
    arm = arms.setdefault(entry["arm"], _Arm(entry["arm"]))
    workdir = Path(entry["workdir"])
    if not workdir.is_absolute():
      workdir = manifest_path.parent / workdir
    arm.entries.append(entry)
    arm.runs.append(read_run(workdir) if (workdir / "metrics.jsonl").exists() else None)
  return manifest, list(arms.values())


def _group_results(manifest: dict, arms: list[_Arm]) -> dict:
  """The numbers of one group, as written to results.json."""
  rows = []
  for arm in arms:
    done = arm.finished
    rows.append({
      "arm": arm.name,
      "seeds_total": len(arm.runs),
      "seeds_finished": len(done),
      "diverged": arm.n_diverged,
      "status": "done" if done else arm.status,
      "valid_loss": _stats([r.summary["valid_loss"] for r in done]),
      "valid_bpb": _stats([r.summary["valid_bpb"] for r in done]),
      # the training loss (next-token cross-entropy) over the last tenth of training
      "train_loss": _stats([v for v in (r.final_train_loss() for r in done) if v is not None]),
      "tokens_per_s": _mean_finite([r.summary.get("tokens_per_s") for r in done]),
      "layer_cosine": _mean_profile([r.summary.get("layer_cosine") for r in done]),
      # synthetic tasks (MQAR accuracy, fact recall) and the per-token costs of the arm
      "exact_match": _stats([r.summary["valid_exact_match"] for r in done
                             if "valid_exact_match" in r.summary]),
      "step_time_s": _mean_finite([r.summary.get("step_time_s") for r in done]),
      # the extrapolation evaluator's losses per evaluated length, mean over the seeds
      "extrapolation": _mean_nested([r.summary.get("extrapolation") for r in done]),
      # the forward's statistics (stat/*: MoE drops, router diagnostics), mean over the seeds:
      # at the end of training, and over the first EARLY_STEPS
      "stats": _mean_stats([r.stats() for r in done]),
      "stats_early": _mean_stats([r.stats(until_step=EARLY_STEPS) for r in done]),
      **{k: _mean_finite([r.summary.get(k) for r in done])
         for k in ("params", "params_activated", "flops_per_token_fwd", "param_bytes_per_token")},
      "overrides": arm.entries[0].get("overrides", {}),
      "paper": arm.paper,
      "curves": _row_curves(done),
    })
  seeds = sorted({row["seeds_total"] for row in rows})
  return {"group": manifest.get("group"), "arg": manifest.get("arg", ""), "seeds_per_arm": seeds,
      "arms": rows}


EARLY_STEPS = 500


def _mean_stats(per_run: list[dict[str, float]]) -> dict[str, float]:
  names = sorted({k for d in per_run for k in d})
  return {k: float(np.mean([d[k] for d in per_run if k in d])) for k in names}


def _row_curves(runs: list[Run]) -> dict | None:
  """The arm's mean loss curves over its finished seeds, kept in results.json so that the plot
  can be drawn again when the runs themselves are gone: {"valid": {"step", "mean", "min", "max"},
  "train": {"step", "mean"}}."""
  if not runs:
    return None
  out = {}
  for split in ("valid", "train"):
    steps, mean, lo, hi = _mean_curve(runs, split)
    out[split] = {"step": [int(v) for v in steps], "mean": _rounded(mean)}
    if split == "valid":
      out[split].update(min=_rounded(lo), max=_rounded(hi))
  return out


def _rounded(values: np.ndarray) -> list[float | None]:
  return [round(float(v), 5) if math.isfinite(v) else None for v in values]


# Override keys that do not change what a run computes (where the corpora are, the progress
# bar): two arms whose overrides differ only in these are the same arm.
INERT_OVERRIDES = frozenset({"data.data_dir", "train.progress"})


def same_overrides(a: dict | None, b: dict | None) -> bool:
  strip = lambda o: {k: v for k, v in (o or {}).items() if k not in INERT_OVERRIDES}  # noqa: E731
  return strip(a) == strip(b)


def same_arm(experiment: str, arg: str, old: dict | None, new: dict | None,
             config_of=None) -> bool:
  """Whether a stored row's overrides describe the arm `new` describes: spelled alike, or
  resolving to one config (`config_of`: how to resolve, sweep.resolved_config by default; a
  caller that compares many rows passes its cache)."""
  if same_overrides(old, new):
    return True
  from research import sweep  # pylint: disable=import-outside-toplevel  (sweep imports this module)
  return sweep.overrides_resolve_alike(experiment, arg, old, new,
                                       config_of=config_of or sweep.resolved_config)


def _unmeasured(row: dict) -> bool:
  """Whether a freshly computed row has nothing of its own: no seed finished or diverged, and
  none running."""
  return row["seeds_finished"] == 0 and not row["diverged"] and row["status"] != "running"


def _carry_over(experiment: str, group: dict, previous: dict | None, date: str) -> None:
  """Keeps the numbers of arms whose runs are not in this runs directory.

  A row with no finished seed (and none running) takes the row of the same arm and argument
  from the previous results.json when its overrides are the same, or spelled differently but
  resolving to the same config (same_arm), marked with the date of the report that measured
  it, so that regenerating a report from a runs directory that holds only some groups or arms
  does not erase results measured earlier.
  """
  for row in group["arms"]:
    row.setdefault("date", date)
  if not previous or previous.get("arg") != group["arg"]:
    return
  old_rows = {row["arm"]: row for row in previous.get("arms", [])}
  for i, row in enumerate(group["arms"]):
    old = old_rows.get(row["arm"])
    if (_unmeasured(row) and old and (old.get("seeds_finished") or old.get("diverged"))
        and same_arm(experiment, group["arg"], old.get("overrides"), row["overrides"])):
      group["arms"][i] = {**old, "date": old.get("date", previous.get("date")), "carried": True}


def _carry_reported(group: dict, arms: list[_Arm], sources: "_ReportedSources") -> None:
  """Rows of arms the sweep did not train because another table reports the same config
  (manifest entries with "reported": "<experiment>/<group>/<arm>") take that row's numbers
  and curves, marked with where and when they were measured."""
  for i, (row, arm) in enumerate(zip(group["arms"], arms)):
    source = next((e["reported"] for e in arm.entries if e.get("reported")), None)
    if source is None or not _unmeasured(row):
      continue
    found = sources.row(source)
    if found is not None:
      old, date = found
      group["arms"][i] = {**old, "arm": row["arm"], "overrides": row["overrides"],
                          "paper": row["paper"], "date": date, "carried": True,
                          "from": old.get("from") or source}


class _ReportedSources:
  """Rows by "<experiment>/<group>/<arm>": this report's own groups first (they may have just
  been recomputed), then the results.json of the experiment they belong to."""

  def __init__(self, experiment: str, own: dict[str, dict], own_previous: dict[str, dict],
               results_root: str | Path | None = None):
    self._experiment, self._own, self._previous = experiment, own, own_previous
    self._root = None if results_root is None else Path(results_root)
    self._files: dict[str, dict[str, dict]] = {}

  def _groups(self, experiment: str) -> dict[str, dict]:
    if experiment == self._experiment:
      return {**self._previous, **self._own}
    if experiment not in self._files:
      root = self._root
      if root is None:
        from research import experiments  # pylint: disable=import-outside-toplevel
        root = experiments.experiments_dir()
      self._files[experiment] = _previous_results(root / experiment / "results", experiment)
    return self._files[experiment]

  def row(self, source: str) -> tuple[dict, str] | None:
    experiment, group_name, arm = source.split("/", 2)
    group = self._groups(experiment).get(group_name)
    row = next((r for r in (group or {}).get("arms", []) if r["arm"] == arm), None)
    if row is None or not row.get("seeds_finished"):
      return None
    return row, row.get("date") or group.get("date")


def experiment_groups(experiment: str, results_root: Path,
                      current: dict[str, list]) -> list[dict]:
  """The result groups of `experiment` for a cross-experiment table: `current[experiment]` (the
  experiment being reported, fresh) when given, else its committed results.json's (none when
  it has no results yet)."""
  if experiment in current:
    return current[experiment]
  path = results_root / experiment / "results" / "results.json"
  if not path.is_file():
    return []
  return _read_json(path).get("groups", [])


def number_or_dash(value, digits: int = 3) -> str:
  """A table cell: the value to `digits` decimals, or a dash where there is none."""
  return "—" if value is None else f"{value:.{digits}f}"


def _previous_results(out_dir: Path, experiment: str) -> dict[str, dict]:
  """Group name -> group of the results.json already in `out_dir` (empty when there is none)."""
  path = out_dir / "results.json"
  if not path.is_file():
    return {}
  data = _read_json(path)
  if data.get("experiment") != experiment:
    return {}
  groups = {}
  for group in data.get("groups", []):
    group.setdefault("date", data.get("date"))
    for row in group.get("arms", []):
      row.setdefault("date", group["date"])
    groups[group["group"]] = group
  return groups


def _mean_nested(entries: list) -> dict | None:
  """{key: {metric: mean over the entries that have it}} of nested summary dicts such as the
  extrapolation evaluator's {"128": {"loss": ..., "tail": ...}}; None when none has one."""
  entries = [e for e in entries if e]
  if not entries:
    return None
  out: dict = {}
  for key in sorted({k for e in entries for k in e}, key=lambda k: (len(k), k)):
    metrics = sorted({m for e in entries if key in e for m in e[key]})
    out[key] = {m: float(np.mean([e[key][m] for e in entries if key in e and m in e[key]]))
                for m in metrics}
  return out


def _mean_profile(profiles: list) -> list[float] | None:
  """Element-wise mean of equal-length per-layer lists (None when there are none)."""
  profiles = [p for p in profiles if p]
  if not profiles or len({len(p) for p in profiles}) != 1:
    return None
  return [float(v) for v in np.mean(np.asarray(profiles, np.float64), axis=0)]


# Settings that are not what an architecture table varies: a difference in them between the arms
# of a group (unless the sweep declares it: Sweep.varies) is printed as a possible confound.
WATCHED = ("model.init_std", "model.init_out_scaling", "model.head.tie_embeddings",
           "model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
           "model.dropout", "train.", "data.", "eval.")


def confounds(experiment: str, arg: str, arms: list, varies=()) -> list[str]:
  """The WATCHED settings in which the resolved configs of a group's arms (`experiments.Arm`)
  differ, other than those in `varies`: "key (value: arm, arm; value: arm)"."""
  from research import config as config_lib  # pylint: disable=import-outside-toplevel
  from research import run_config  # pylint: disable=import-outside-toplevel
  from research import experiments  # pylint: disable=import-outside-toplevel
  configs = {}
  for arm in arms:
    overrides = {k: v for k, v in arm.overrides.items() if k != "seed"}
    configs[arm.name] = run_config.resolve(
        experiments.get_config(f"{experiment}:{arg}", overrides)).to_dict()
  out = []
  for key in config_lib.flat_keys(run_config.default_config()):
    if not key.startswith(WATCHED) or key in varies or key in ("data.data_dir", "train.progress"):
      continue
    by_value: dict[str, list[str]] = {}
    for name, config in configs.items():
      by_value.setdefault(repr(config_lib.get_dotted(config, key)), []).append(name)
    if len(by_value) > 1:
      out.append(f"{key} (" + "; ".join(f"{v}: {', '.join(names)}"
                                          for v, names in by_value.items()) + ")")
  return out


def _judge(experiment: str, group: dict) -> None:
  """Adds to `group` the comparison of every arm with the group's reference arm and, where the
  sweep gives the paper's claim, the verdict rule's word (research/verdict.py); and the
  possible confounds. Both come from the experiment's sweep definition as it is today."""
  from research import experiments  # pylint: disable=import-outside-toplevel
  from research import verdict  # pylint: disable=import-outside-toplevel
  try:
    sweep = experiments.get_sweep(experiment)
  except Exception:  # an experiment renamed or removed: nothing to judge by
    return
  arms = sweep.groups.get(group["group"])
  if not arms:
    return
  rows = {row["arm"]: row for row in group["arms"]}
  ref = rows.get(sweep.reference(group["group"]))
  group["reference"] = ref["arm"] if ref else None
  superseded = sweep.superseded.get(group["group"])
  group["superseded"] = superseded
  claims = {} if superseded else {a.name: a.claim for a in arms}
  for row in group["arms"]:
    row.pop("comparison", None)
    row.pop("verdict", None)
    values = row["valid_loss"]["values"]
    if ref is None or row is ref or not values or not ref["valid_loss"]["values"]:
      continue
    c = verdict.compare(values, ref["valid_loss"]["values"])
    row["comparison"] = dataclasses.asdict(c)
    if claims.get(row["arm"]):
      row["verdict"] = verdict.verdict(c, claims[row["arm"]])
  try:
    group["confounds"] = confounds(experiment, group["arg"], arms,
                                   sweep.varies.get(group["group"], ()))
  except Exception:  # an arm whose overrides no longer resolve: no check
    group["confounds"] = None


def _markdown(experiment: str, group: dict) -> str:
  rows, date = group["arms"], group["date"]
  labels = list(dict.fromkeys(label for row in rows for label in row["paper"]))
  show_diverged = any(row["diverged"] for row in rows)
  header = ["arm", "seeds", "valid loss", "valid bpb"] + (["diverged"] if show_diverged else [])
  show_cos = any(row.get("layer_cosine") for row in rows)
  header += ["tokens/s"] + (["adjacent-layer cos"] if show_cos else [])
  show_em = any(row.get("exact_match", {}).get("values") for row in rows)
  show_cost = any(row.get("params_activated") for row in rows)
  header += (["exact match"] if show_em else []) + (
      ["ms/step", "params (activated)", "MFLOPs/token", "param KB read/token"] if show_cost else [])
  header += [f"paper: {label}" for label in labels]
  reference = group.get("reference")
  show_verdict = any(row.get("verdict") for row in rows)
  if reference:
    header += [f"Δ vs {reference} (t, seeds agreeing)"] + (["verdict"] if show_verdict else [])
  lines = [
    f"## {group['group']}", "",
    f"- experiment: `{experiment}`, group: `{group['group']}`",
    f"- config arg: `{group['arg']}`",
    f"- seeds per arm: {', '.join(map(str, group['seeds_per_arm']))} "
    "(mean ± sample std over finished seeds; diverged seeds excluded: a loss that is not "
    f"finite, or a valid loss ending more than {SPIKE_NATS:g} nat above its best)",
    f"- date: {date}",
    f"- regenerate: `research report {experiment}`",
  ]
  carried = sorted({row["date"] for row in rows if row.get("carried") and not row.get("from")})
  if carried:
    lines.append(f"- arms marked * are carried over from the report of {', '.join(carried)}: "
                 "their runs are not in the runs directory this report was made from")
  borrowed = [f"{row['arm']} = `{row['from']}` ({row['date']})" for row in rows if row.get("from")]
  if borrowed:
    lines.append("- arms marked † are not trained here: another table reports the same config "
                 f"with every seed, and its row is shown: {'; '.join(borrowed)}")
  if group.get("superseded"):
    lines.append(f"- **no verdicts here**: {group['superseded']}")
  if group.get("confounds"):
    lines.append("- **possible confound**: besides what the table varies, its arms differ in "
                 + "; ".join(group["confounds"]))
  if reference:
    lines.append(f"- Δ: valid loss minus `{reference}`'s (Welch t; seeds whose paired difference "
                 "has Δ's sign)" + ("; verdict: the rule of research/verdict.py against the "
                                    "paper's claim" if show_verdict else ""))
  lines += [
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
  ]
  for row in rows:
    done = row["seeds_finished"] > 0
    mark = " †" if row.get("from") else " *" if row.get("carried") else ""
    name = row["arm"].replace("|", "\\|") + mark
    cells = [name, f"{row['seeds_finished']}/{row['seeds_total']}",
         _fmt(row["valid_loss"]) if done else row["status"],
         _fmt(row["valid_bpb"]) if done else row["status"]]
    if show_diverged:
      cells.append(f"{row['diverged']}/{row['seeds_total']} diverged" if row["diverged"] else "–")
    cells.append(f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] is not None else "–")
    if show_cos:
      cos = row.get("layer_cosine")
      cells.append(f"{np.mean(cos):.3f}" if cos else "–")
    if show_em:
      cells.append(_fmt(row["exact_match"]) if row["exact_match"]["values"] else "–")
    if show_cost:
      num = lambda k, f: f(row[k]) if row.get(k) is not None else "–"  # noqa: E731
      cells += [num("step_time_s", lambda v: f"{1e3 * v:.1f}"),
                f"{num('params', lambda v: f'{v / 1e6:.2f}M')} "
                f"({num('params_activated', lambda v: f'{v / 1e6:.2f}M')})",
                num("flops_per_token_fwd", lambda v: f"{v / 1e6:.2f}"),
                num("param_bytes_per_token", lambda v: f"{v / 1e3:,.0f}")]
    for label in labels:
      value = row["paper"].get(label)
      cells.append("–" if value is None else f"{value:g}" if isinstance(value, float) else str(value))
    if reference:
      c = row.get("comparison")
      if c:
        t = "n/a" if c["t"] != c["t"] else f"{c['t']:+.1f}"
        cells.append(f"{c['delta']:+.4f} ({t}, {c['agree']}/{c['paired']})")
      else:
        cells.append("reference" if row["arm"] == reference else "–")
      if show_verdict:
        cells.append(row.get("verdict") or "–")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _mean_curve(runs: list[Run], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Mean, min and max over seeds of a loss curve, on the steps every seed logged."""
  curves = [dict(zip(r.curve(split)[0].tolist(), r.curve(split)[1].tolist())) for r in runs]
  steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  if not steps:
    empty = np.zeros((0,))
    return empty, empty, empty, empty
  values = np.asarray([[c[s] for s in steps] for c in curves], np.float64)  # [seeds, steps]
  return np.asarray(steps), values.mean(0), values.min(0), values.max(0)


def _plot_curves(experiment: str, group: dict, out_png: Path) -> None:
  fig = Figure(figsize=(8, 5))
  ax = fig.subplots()
  rows = [row for row in group["arms"] if row["seeds_finished"] and row.get("curves")]
  for i, row in enumerate(rows):
    color = f"C{i % 10}"
    valid, train = row["curves"]["valid"], row["curves"]["train"]
    nan = lambda v: np.asarray([np.nan if x is None else x for x in v], np.float64)  # noqa: E731
    ax.plot(valid["step"], nan(valid["mean"]), color=color, marker="o", markersize=3,
            label=f"{row['arm']} (n={row['seeds_finished']})")
    ax.fill_between(valid["step"], nan(valid["min"]), nan(valid["max"]), color=color, alpha=0.2,
                    linewidth=0)
    ax.plot(train["step"], nan(train["mean"]), color=color, linestyle="--", linewidth=0.7,
            alpha=0.7)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (valid: solid, min–max band; train: dashed)")
  ax.set_title(f"{experiment} / {group['group']} ({group['arg']})")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


def _plot_final(experiment: str, group: dict, out_png: Path) -> None:
  rows = [row for row in group["arms"] if row["seeds_finished"]]
  fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 4.5))
  ax = fig.subplots()
  x = np.arange(len(rows))
  means = [row["valid_loss"]["mean"] for row in rows]
  stds = [row["valid_loss"]["std"] or 0.0 for row in rows]
  ax.bar(x, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.6)
  for xi, row in zip(x, rows):
    seeds = row["valid_loss"]["values"]
    jitter = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else np.zeros((1,))
    ax.scatter(xi + jitter, seeds, color="black", s=12, zorder=3)
  if rows:  # Zoom in on the differences: bars from zero would hide them.
    values = [v for row in rows for v in row["valid_loss"]["values"]]
    pad = 0.1 * (max(values) - min(values) + max(stds)) + 1e-3
    ax.set_ylim(min(values) - max(stds) - pad, max(values) + max(stds) + pad)
  ax.set_xticks(x, [row["arm"] for row in rows], rotation=30, ha="right")
  ax.set_ylabel("final valid loss (bar: mean ± std; dots: seeds)")
  ax.set_title(f"{experiment} / {group['group']}")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


def _plot_diagnostics(experiment: str, group: dict, arms: list[_Arm], out_png: Path) -> bool:
  """Gradient-norm profile over depth at GRAD_PROFILE_STEPS and adjacent-layer cosine, mean over
  finished seeds per arm; False (no file) when the runs logged neither."""
  finished = [a for a in arms if a.finished]
  profiles = {}  # (arm, step) -> mean profile
  for arm in finished:
    for step in GRAD_PROFILE_STEPS:
      p = _mean_profile([None if (g := r.grad_profile(step)) is None else g.tolist()
                         for r in arm.finished])
      if p:
        profiles[arm.name, step] = p
  rows = {row["arm"]: row for row in group["arms"]}
  cos = {a.name: rows[a.name]["layer_cosine"] for a in finished if rows[a.name].get("layer_cosine")}
  steps = [s for s in GRAD_PROFILE_STEPS if any(k[1] == s for k in profiles)]
  panels = len(steps) + bool(cos)
  if not panels:
    return False
  fig = Figure(figsize=(4.2 * panels, 4))
  axes = np.atleast_1d(fig.subplots(1, panels))
  for ax, step in zip(axes, steps):
    for i, arm in enumerate(finished):
      if (arm.name, step) in profiles:
        ax.plot(profiles[arm.name, step], marker="o", markersize=3, color=f"C{i % 10}",
                label=arm.name)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("gradient norm of the block's parameters")
    ax.set_title(f"step {step}")
    ax.grid(alpha=0.3)
  if cos:
    ax = axes[-1]
    for i, arm in enumerate(finished):
      if arm.name in cos:
        ax.plot(cos[arm.name], marker="o", markersize=3, color=f"C{i % 10}", label=arm.name)
    ax.set_xlabel("block l")
    ax.set_ylabel("cos(input of l, input of l + 1)")
    ax.set_title("adjacent-layer similarity (end)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{experiment} / {group['group']}")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  return True


def checkpointed_arms(runs_root: str | Path, groups: list[dict]):
  """Yields (group name, arm, workdirs) for each swept arm of `groups` (what an analysis hook
  receives) whose finished seeds kept checkpoints: the runs an analysis can load."""
  for group in groups:
    manifest = Path(runs_root) / group["group"] / "manifest.json"
    if not manifest.is_file():
      continue
    _, arms = _load_sweep(manifest)
    for arm in arms:
      done = [r.workdir for r in arm.finished if (r.workdir / "checkpoints").is_dir()]
      if done:
        yield group["group"], arm, done


def _analysis_hook(experiment: str):
  """`analyze(experiment, runs_root, groups, out_dir) -> str` (Markdown) from the experiment's
  optional analysis.py, or None."""
  from research import experiments  # pylint: disable=import-outside-toplevel
  if not (experiments.experiments_dir() / experiment / "analysis.py").is_file():
    return None
  return experiments._load_module(experiment, "analysis.py").analyze  # pylint: disable=protected-access


def report(experiment: str, runs_dir: str | Path, out_dir: str | Path,
      groups: list[str] | None = None, results_root: str | Path | None = None) -> Path:
  """Writes results.md, results.json and per-group PNGs for a sweep; returns results.md.

  Groups and arms that have no finished run under `runs_dir` keep what the results.json
  already in `out_dir` holds for them (see `_carry_over`): a report regenerated after some
  groups were re-run, or on another machine, adds to the results instead of erasing them.
  Arms the sweep marked "reported" show the row of another table that they stand for, read
  from `<results_root>/<experiment>/results/results.json` (default: experiments/).
  """
  root = Path(runs_dir) / experiment
  manifests = {p.parent.name: p for p in sorted(root.glob("*/manifest.json"))}
  if not manifests and not (Path(out_dir) / "results.json").is_file():
    raise ReportError(f"no sweep manifest under {root}/*/; create the runs with "
             f"`research sweep {experiment}`.")
  if groups is not None:
    missing = [g for g in groups if g not in manifests]
    if missing:
      raise ReportError(f"no sweep for group(s) {missing} under {root} (found {sorted(manifests)}); "
               f"run `research sweep {experiment}` for them.")
    manifests = {g: manifests[g] for g in groups}
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  date = datetime.date.today().isoformat()
  previous = _previous_results(out_dir, experiment)
  results, diagnostics = {}, {}
  sources = _ReportedSources(experiment, results, previous, results_root)
  # groups whose arms stand for another table's rows last, so that those rows are this report's
  loaded = sorted((_load_sweep(path) + (name,) for name, path in manifests.items()),
                  key=lambda item: any(e.get("reported") for a in item[1] for e in a.entries))
  for manifest, arms, name in loaded:
    manifest.setdefault("group", name)
    group = _group_results(manifest, arms)
    group["date"] = date
    _carry_reported(group, arms, sources)
    _carry_over(experiment, group, previous.get(name), date)
    _judge(experiment, group)
    results[name] = group
    _plot_curves(experiment, group, out_dir / f"{name}_curves.png")
    _plot_final(experiment, group, out_dir / f"{name}_final.png")
    diagnostics[name] = _plot_diagnostics(experiment, group, arms, out_dir / f"{name}_diagnostics.png")
  for name, group in previous.items():  # groups with no sweep in this runs directory: kept
    if name not in results:
      _judge(experiment, group)  # judged by today's rule and sweep definition
      results[name] = group
  sections = [f"# Results: {experiment}\n"]
  for name in sorted(results):
    group = results[name]
    sections.append(_markdown(experiment, group))
    sections.append(f"![{name} curves]({name}_curves.png)\n\n![{name} final]({name}_final.png)\n")
    if diagnostics.get(name, (out_dir / f"{name}_diagnostics.png").is_file()):
      sections.append(f"![{name} diagnostics]({name}_diagnostics.png)\n")
  groups = [results[name] for name in sorted(results)]
  analyze = _analysis_hook(experiment)
  if analyze is not None:  # the experiment's own analysis (fits, heat maps): Markdown
    sections.append(analyze(experiment, root, groups, out_dir) or "")
  (out_dir / "results.json").write_text(json.dumps(
    {"experiment": experiment, "date": date, "command": f"research report {experiment}",
     "groups": groups}, indent=2) + "\n")
  md_path = out_dir / "results.md"
  md_path.write_text("\n".join(sections))
  return md_path
