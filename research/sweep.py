"""Runs an experiment's ablation group: every arm x seed in sequence, resumable.

Runs go to `<runs_dir>/<experiment>/<group>/<arm>/seed<k>/`; the group's `manifest.json` lists
each (arm, seed) with its overrides, the paper's numbers and a status (pending, running, done,
failed). A finished run (summary.json present) is skipped; an interrupted one resumes from
its checkpoint, so re-running the same sweep command continues where it stopped.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from research import config as config_lib
from research import experiments
from research.train.trainer import Trainer


def manifest_path(runs_dir: Path, experiment: str, group: str) -> Path:
  return Path(runs_dir) / experiment / group / "manifest.json"


def run_sweep(name: str, *, group: str | None = None, seeds: int | None = None,
              arg: str | None = None, arms: list[str] | None = None,
              runs_dir: str | Path = "runs", overrides: dict[str, Any] | None = None,
              data_dir: str | None = None, log=print) -> Path:
  """Runs (or continues) a sweep group; returns the manifest path. Raises if an arm failed.

  `arg` replaces the sweep's experiment argument (e.g. "scale=smoke" to check a table end to
  end in seconds); `arms` keeps only the named arms.
  """
  sweep = experiments.get_sweep(name)
  group, group_arms = sweep.group(group)
  if arms:
    known = {a.name: a for a in group_arms}
    for a in arms:
      if a not in known:
        raise config_lib.unknown_key_error(a, known, what=f"arm of sweep group '{group}'")
    group_arms = [known[a] for a in arms]
  seeds = sweep.seeds if seeds is None else seeds
  arg = sweep.arg if arg is None else arg
  root = Path(runs_dir) / name / group
  entries = []
  for arm in group_arms:
    for seed in range(seeds):
      entries.append({"arm": arm.name, "seed": seed, "workdir": f"{arm.name}/seed{seed}",
                      "overrides": {**arm.overrides, **(overrides or {}), "seed": seed},
                      "paper": arm.paper, "status": "pending"})
  manifest = {"experiment": name, "group": group, "arg": arg, "arms": entries}
  path = manifest_path(runs_dir, name, group)
  path.parent.mkdir(parents=True, exist_ok=True)

  def save():
    path.write_text(json.dumps(manifest, indent=2, default=str))

  for e in entries:
    if (root / e["workdir"] / "summary.json").exists():
      e["status"] = "done"
  save()
  failed = []
  for i, e in enumerate(entries):
    if e["status"] == "done":
      log(f"[{i + 1}/{len(entries)}] {e['arm']} seed {e['seed']}: finished, skipped")
      continue
    log(f"[{i + 1}/{len(entries)}] {e['arm']} seed {e['seed']}")
    e["status"] = "running"
    save()
    ov = dict(e["overrides"])
    if data_dir:
      ov["data.data_dir"] = data_dir
    try:
      config = experiments.get_config(f"{name}:{arg}", ov)
      Trainer(config, root / e["workdir"], experiment=name, arg=arg, overrides=ov,
              log=log).run()
      e["status"] = "done"
    except KeyboardInterrupt:
      e["status"] = "pending"
      save()
      raise
    except Exception:  # one failed arm must not stop the table; it is reported at the end
      log(traceback.format_exc())
      e["status"] = "failed"
      failed.append(f"{e['arm']} seed {e['seed']}")
    save()
  if failed:
    raise RuntimeError(f"sweep {name}/{group}: {len(failed)} run(s) failed: {', '.join(failed)}")
  return path
