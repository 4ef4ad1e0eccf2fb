"""Evaluates PMA merges of the trunk runs' checkpoints (research/train/merge.py) and writes
results/merges.json, which analysis.py (run by `research report model_merging`) tabulates.

  python experiments/model_merging/merges.py --runs_dir runs [--data_dir DIR]

For every finished seed of every trunk arm and each point s: the validation loss of checkpoint
s alone and of each merge of the grid whose checkpoints s - (N-1) V, ..., s all exist, on the
fixed validation batches of the run's config (the numbers its training log reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

POINTS = (1000, 2500, 5000)
# (method, ema alpha or None, N, V): the methods at N = 10, V = 50; N at V = 50; V at N = 10
GRID = ([("sma", None, 10, 50), ("ema", 0.1, 10, 50), ("ema", 0.2, 10, 50), ("wma", None, 10, 50)]
        + [("sma", None, n, 50) for n in (3, 6, 15)]
        + [("sma", None, 10, v) for v in (25, 100, 200)])


def label(method: str, alpha, n: int, v: int) -> str:
  return f"{method}{'' if alpha is None else alpha}_n{n}_v{v}"


def evaluate_seed(workdir: Path, points=POINTS, grid=GRID,
                  data_dir: str | None = None) -> list[dict]:
  # pylint: disable=import-outside-toplevel
  from research import data
  from research.eval import lm_eval
  from research.train import merge
  with merge.RunCheckpoints(workdir) as run:
    if data_dir:
      run.config.data.data_dir = data_dir
    batches = data.validation_batches(run.config)
    step_fn = lm_eval.make_eval_step(run.graphdef)
    available = set(run.steps())
    cache: dict[int, tuple] = {}

    def variables(step):
      if step not in cache:
        cache[step] = run.variables(step)
      return cache[step]

    rows = []
    for s in points:
      if s not in available:
        continue
      latest = lm_eval.evaluate(step_fn, *variables(s), batches)
      for method, alpha, n, v in grid:
        try:
          steps = merge.window_steps(sorted(available), n, v, s)
        except merge.MergeError:  # a window reaching past the run's first checkpoints
          continue
        weights = merge.merge_weights(method, n, alpha or 0.2)
        merged = merge.merge_trees([variables(st) for st in steps], weights)
        rows.append({"s": s, "merge": label(method, alpha, n, v), "method": method,
                     "alpha": alpha, "N": n, "V": v, "loss": lm_eval.evaluate(step_fn, *merged,
                                                                              batches),
                     "latest": latest})
      for step in [st for st in cache if st <= s]:  # later points read later checkpoints
        del cache[step]
    return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs_dir", default="runs")
  p.add_argument("--data_dir")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "merges.json"))
  args = p.parse_args(argv)
  root = Path(args.runs_dir) / "model_merging" / "trunk"
  out = []
  for arm_dir in sorted(p for p in root.glob("*") if p.is_dir()):
    for seed_dir in sorted(arm_dir.glob("seed*")):
      if not (seed_dir / "summary.json").is_file():
        print(f"skipping {seed_dir}: not finished", file=sys.stderr)
        continue
      rows = evaluate_seed(seed_dir, data_dir=args.data_dir)
      out += [{"trunk": arm_dir.name, "seed": seed_dir.name, **r} for r in rows]
      print(f"{seed_dir}: {len(rows)} merges evaluated")
  if not out:
    print(f"no finished trunk runs under {root}; run `research sweep model_merging --group "
          "trunk` first", file=sys.stderr)
    return 2
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"points": list(POINTS), "rows": out}, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
