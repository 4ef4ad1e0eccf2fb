"""`research report model_merging` calls analyze(): the merges that merges.py evaluated
(results/merges.json) against the checkpoint they end at (the claim: lower) and against the
annealed control ending at the same step, mean ± std over seeds, verdicts by the project's rule
(research/verdict.py: |t| >= 2 and every seed agreeing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from research import verdict as verdict_lib


def _mean_std(values: list[float]) -> str:
  if not values:
    return "-"
  mean = sum(values) / len(values)
  if len(values) < 2:
    return f"{mean:.4f}"
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return f"{mean:.4f} ± {std:.4f}"


def _anneal_losses(groups: list[dict]) -> dict[int, list[float]]:
  """{s: the annealed control's per-seed valid losses} for controls with every seed finished
  (index i is seed i, as the trunk's seeds pair with them)."""
  out = {}
  for group in groups:
    if group["group"] != "anneal":
      continue
    for row in group["arms"]:
      values = (row.get("valid_loss") or {}).get("values") or []
      if row["arm"].startswith("anneal_") and values and len(values) == row["seeds_total"]:
        out[int(row["arm"].split("_")[1])] = values
  return out


def _of_seeds(values: list[float], seeds: list[str]) -> list[float]:
  """The control's values (index i: seed i, every seed finished) of the named seeds."""
  return [values[int(k.removeprefix("seed"))] for k in seeds]


def _delta(values: list[float], reference: list[float]) -> str:
  c = verdict_lib.compare(values, reference)
  return f"{c.delta:+.4f} ({c.t:+.1f}, {c.agree}/{c.paired})"


def merge_tables(rows: list[dict], anneal: dict[int, list[float]]) -> str:
  """One table per trunk and point s: each merge against checkpoint s (the claim) and, where
  the trunk is the annealed control's (constant_3e-3, its seeds pair with the control's), against
  the control ending at s (the paper's "the merge approximates the anneal": no claim)."""
  lines = []
  for trunk in sorted({r["trunk"] for r in rows}):
    for s in sorted({r["s"] for r in rows if r["trunk"] == trunk}):
      here = [r for r in rows if r["trunk"] == trunk and r["s"] == s]
      seeds = sorted({r["seed"] for r in here})
      latest = [next(r["latest"] for r in here if r["seed"] == k) for k in seeds]
      control = anneal.get(s) if trunk == "constant_3e-3" else None
      lines += [f"### {trunk}, s = {s} ({len(seeds)} seeds)\n",
                "| weights | valid loss | Δ vs checkpoint s (t, seeds) | verdict (claim: lower) "
                "| Δ vs annealed control (t, seeds) |",
                "|---|---|---|---|---|",
                f"| checkpoint s alone | {_mean_std(latest)} | reference | – | "
                f"{_delta(latest, _of_seeds(control, seeds)) if control else '–'} |"]
      for name in dict.fromkeys(r["merge"] for r in here):
        by_seed = {r["seed"]: r["loss"] for r in here if r["merge"] == name}
        values = [by_seed[k] for k in seeds if k in by_seed]
        ref = [lt for k, lt in zip(seeds, latest) if k in by_seed]
        c = verdict_lib.compare(values, ref)
        word = verdict_lib.verdict(c, "lower")
        vs_control = "–"
        if control:
          mine = [k for k in seeds if k in by_seed]
          vs_control = _delta([by_seed[k] for k in mine], _of_seeds(control, mine))
        lines.append(f"| {name} | {_mean_std(values)} | {c.delta:+.4f} ({c.t:+.1f}, "
                     f"{c.agree}/{c.paired}) | {word} | {vs_control} |")
      if control:
        lines.append(f"| annealed control (last 10% to 0) | {_mean_std(control)} | "
                     f"{_delta(control, latest)} | no claim | reference |")
      lines.append("")
  return "\n".join(lines)


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del experiment, runs_root
  path = Path(out_dir) / "merges.json"
  if not path.is_file():
    return ("## Merges\n\nNo merges evaluated yet: run `python experiments/model_merging/"
            "merges.py --runs_dir RUNS` after the trunk sweep.\n")
  rows = json.loads(path.read_text())["rows"]
  return "## Merges (validation loss, nats/token)\n\n" + merge_tables(rows, _anneal_losses(groups))
