"""`research report qat_scaling` calls analyze(): delta = valid loss(QAT) - valid loss(fp32) of
every cell (N non-embedding parameters, D tokens, G group size), the fit of
delta = k D^g_D (log2 G)^g_G / N^g_N (research/fit.py: log-space least squares, bootstrap 95%
intervals over cells, the corner N = max, D = max predicted by a fit without it), the error
decomposition at G = 32 (W4A4 against W4A16 + W16A4; R = W16A4 / W4A16), the FC2-input fix,
the seed noise of delta at one cell, and the long runs (d = 64 beyond the grid's D) against
the grid law's prediction. It writes the grid's rows (seed 0) as results/qat_deltas.csv, which
`research fit` reads (the seed-noise and long runs go to qat_deltas_extra.csv):

  research fit experiments/qat_scaling/results/qat_deltas.csv --target delta \\
      --terms N,D,log2:G --holdout N=max,D=max
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from research import experiments, fit as fit_lib, scales
from research.eval import input_kurtosis

PAPER = {"W4A4": (0.2186, 0.0745, 0.7779), "W4A16": (0.3589, 0.1610, 0.3533),
         "W16A4": (0.1816, 0.0331, 0.9812),
         "W4A4 FC2 8-bit": (0.2637, 0.0964, 0.3407)}  # (g_N, g_D, g_G), Table 1
NAME = re.compile(
    r"^(?P<prec>[a-z0-9]+?)(_g(?P<g>\d+))?_d(?P<d>\d+)_D(?P<D>[\d.]+)M(_s(?P<s>\d))?$")
PREC = {"w4a4": "W4A4", "w4a16": "W4A16", "w16a4": "W16A4", "w4a4fc2a8": "W4A4 FC2 8-bit"}


def _loss(row) -> float | None:
  values = (row.get("valid_loss") or {}).get("values") or []
  return values[0] if values else None


def _non_embedding(arg: str, overrides: dict) -> int:
  c = experiments.get_config(f"qat_scaling:{arg}", {k: v for k, v in overrides.items()
                                                     if k != "seed"})
  return scales.non_embedding_params(c)


def delta_rows(groups: list[dict]) -> list[dict]:
  runs = {}
  for group in groups:
    for row in group["arms"]:
      m = NAME.match(row["arm"])
      loss = _loss(row)
      if m is None or loss is None:
        continue
      key = (m["prec"], int(m["g"] or 0), int(m["d"]), float(m["D"]), int(m["s"] or 0))
      runs[key] = (loss, group.get("arg", "scale=tiny"), row.get("overrides") or {},
                   group.get("group", ""))
  out, sizes = [], {}
  for (prec, g, d, tokens, seed), (loss, arg, overrides, group) in sorted(runs.items()):
    base = runs.get(("fp32", 0, d, tokens, seed))
    if prec == "fp32" or base is None:
      continue
    if d not in sizes:
      sizes[d] = _non_embedding(arg, overrides)
    out.append({"precision": PREC.get(prec, prec), "G": g, "d": d, "N": sizes[d],
                "D": tokens * 1e6, "seed": seed, "loss": loss, "fp32_loss": base[0],
                "delta": loss - base[0], "group": group})
  return out


def _write_csv(rows: list[dict], path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _fit_line(name, precision, rows, terms, holdout="N=max,D=max") -> str:
  if not rows:
    return f"| {name} | no finished pair yet | | | | | |"
  try:
    f = fit_lib.fit(rows, "delta", terms, holdout=holdout, bootstrap=2000)
    held_note = ""
  except fit_lib.FitError as e:
    try:  # the corner itself may be a dropped row (delta <= 0): fit without holding it out
      f = fit_lib.fit(rows, "delta", terms, bootstrap=2000)
    except fit_lib.FitError as e2:
      return f"| {name} | not fitted: {e2} | | | | | |"
    top_n, top_d = max(r["N"] for r in rows), max(r["D"] for r in rows)
    corner = [r for r in rows if r["N"] == top_n and r["D"] == top_d]
    held_note = ("– (the corner's delta ≤ 0)" if corner and all(r["delta"] <= 0 for r in corner)
                 else f"not held out: {e}")
  cells = []
  for term, sign in (("N", -1), ("D", 1), ("log2(G)", 1)):
    if term not in f.coef:
      cells.append("–")
      continue
    lo, hi = sorted((sign * f.interval[term][0], sign * f.interval[term][1]))
    cells.append(f"{sign * f.coef[term]:+.3f} [{lo:+.3f}, {hi:+.3f}]")
  paper = PAPER.get(precision)
  held = f"{f.holdout['mean_abs_rel_error']:.0%}" if f.holdout else held_note
  return (f"| {name} | {' | '.join(cells)} | {f.r2:.2f} | {f.rows} ({f.dropped} ≤ 0 dropped) "
          f"| {held} | {paper or '–'} |")


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del experiment
  rows = delta_rows(groups)
  kurtosis = _kurtosis(runs_root, groups, Path(out_dir))
  if not rows:
    return "## QAT scaling\n\nNo QAT and fp32 pair has finished yet.\n" + kurtosis
  main = [r for r in rows if r["seed"] == 0 and r["group"] not in OUTSIDE_GRID]
  # the grid alone, so `research fit` on it is the fit below; seed-noise and long runs apart
  extra = [r for r in rows if r not in main]
  for name, part in (("qat_deltas.csv", main), ("qat_deltas_extra.csv", extra)):
    if part:
      _write_csv(part, Path(out_dir) / name)
    else:
      (Path(out_dir) / name).unlink(missing_ok=True)  # none now: no stale table
  if not main:  # only the seed-noise cell so far: no grid to tabulate or fit
    return ("## QAT scaling\n\nThe grid (seed 0) has no QAT and fp32 pair yet.\n" + kurtosis
            + _seed_noise(rows))
  lines = ["## QAT scaling: delta = valid loss(QAT) - valid loss(fp32)\n",
           "| precision | G | d | N | D | delta |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['precision']} | {r['G']} | {r['d']} | {r['N'] / 1e6:.2f}M | "
            f"{r['D'] / 1e6:g}M | {r['delta']:+.4f} |" for r in main]
  lines += ["", "### Fits: delta = k D^g_D (log2 G)^g_G / N^g_N (95% bootstrap intervals; "
            "held out: the N = max, D = max corner)\n",
            "| rows | g_N | g_D | g_G | R² | cells | held-out error | paper (g_N, g_D, g_G) |",
            "|---|---|---|---|---|---|---|---|"]
  w4a4 = [r for r in main if r["precision"] == "W4A4"]
  lines.append(_fit_line("W4A4", "W4A4", w4a4, ["N", "D", "log2:G"]))
  for prec in ("W4A16", "W16A4", "W4A4 FC2 8-bit"):
    lines.append(_fit_line(f"{prec} (G = 32)", prec,
                           [r for r in main if r["precision"] == prec], ["N", "D"]))
  lines.append(_decomposition(main))
  return ("\n".join(lines) + "\n" + _long_runs(main, [r for r in rows if r["group"] == "long"])
          + kurtosis + _seed_noise(rows))


OUTSIDE_GRID = ("long",)  # groups whose runs the grid's fit leaves out (and predicts)


def _long_runs(main: list[dict], long: list[dict]) -> str:
  """The long group (d = 64, G = 32, D beyond the grid, up to D/N ~ 95) beside the grid's
  cells of the same width and G, with the grid's W4A4 law evaluated at every D: does delta
  keep rising with D where D/N approaches the paper's range?"""
  if not long:
    return ""
  w4a4 = [r for r in main if r["precision"] == "W4A4"]
  try:
    law = fit_lib.fit(w4a4, "delta", ["N", "D", "log2:G"], bootstrap=0)
  except fit_lib.FitError:
    law = None
  d, g = long[0]["d"], long[0]["G"]
  same = sorted([r for r in w4a4 if r["d"] == d and r["G"] == g] + long, key=lambda r: r["D"])
  predicted = law.predict(same) if law is not None else [math.nan] * len(same)
  lines = [f"\n### Long runs (d = {d}, G = {g}; the long group is outside the grid's fit)\n",
           "| D | D/N | fp32 | W4A4 | delta | the grid's W4A4 law predicts | run |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['D'] / 1e6:g}M | {r['D'] / r['N']:.0f} | {r['fp32_loss']:.4f} | "
            f"{r['loss']:.4f} | {r['delta']:+.4f} | {p:+.4f} | "
            f"{r['group'] if r['group'] == 'long' else 'grid'} |"
            for r, p in zip(same, predicted)]
  return "\n".join(lines) + "\n"


def _seed_noise(rows: list[dict]) -> str:
  """Mean ± sample std of delta over the seeds of the W4A4, G = 32, d = 128, D = 4M cell."""
  seeds = [r for r in rows if r["d"] == 128 and r["D"] == 4e6 and r["G"] == 32
           and r["precision"] == "W4A4"]
  if len(seeds) < 2:
    return ""
  values = [r["delta"] for r in seeds]
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return (f"\nSeed noise of delta (W4A4, G = 32, d = 128, D = 4M; seeds "
          f"{', '.join(str(r['seed']) for r in seeds)}): {mean:+.4f} ± {std:.4f}.\n")


def _decomposition(rows: list[dict]) -> str:
  """At G = 32, per cell: W4A4 against W4A16 + W16A4 (the paper: W4A4 ≈ 0.906 (W4A16 +
  W16A4)), R = W16A4 / W4A16 (the paper: R > 1, falling as D/N grows; defined here only where
  W4A16's delta is positive, as a ratio to a delta within seed noise means nothing), the
  activations' share W16A4 / W4A4, and FC2-8-bit / W4A4 (the paper: 0.795 at G = 32); then
  each column summarized over the cells."""
  by = {(r["precision"], r["d"], r["D"]): r["delta"] for r in rows if r["G"] == 32}
  lines = ["\n### Decomposition at G = 32\n",
           "| d | D | D/N | W4A4 | W4A16 | W16A4 | ratio W4A4 / (W4A16 + W16A4) "
           "| R = W16A4 / W4A16 | W16A4 / W4A4 | FC2 8-bit | FC2 8-bit / W4A4 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  sizes = {r["d"]: r["N"] for r in rows}
  cells = []
  for (prec, d, tokens), w4a4 in sorted(by.items()):
    if prec != "W4A4":
      continue
    w, a, fc2 = (by.get((p, d, tokens)) for p in ("W4A16", "W16A4", "W4A4 FC2 8-bit"))
    if w is None or a is None:
      continue
    cell = {"D/N": tokens / sizes[d], "ratio": w4a4 / (w + a) if w + a > 0 else math.nan,
            "R": a / w if w > 0 else math.nan, "share": a / w4a4 if w4a4 > 0 else math.nan,
            "fix": fc2 / w4a4 if fc2 is not None and w4a4 > 0 else math.nan}
    cells.append(cell)
    fmt = lambda x: "–" if math.isnan(x) else f"{x:.2f}"  # noqa: E731
    lines.append(f"| {d} | {tokens / 1e6:g}M | {cell['D/N']:.1f} | {w4a4:+.4f} | {w:+.4f} | "
                 f"{a:+.4f} | {fmt(cell['ratio'])} | {fmt(cell['R'])} | {fmt(cell['share'])} | "
                 + ("–" if fc2 is None else f"{fc2:+.4f}") + f" | {fmt(cell['fix'])} |")
  if not cells:
    return lines[0] + "\nNo cell has W4A4, W4A16 and W16A4 runs yet.\n"
  return "\n".join(lines) + "\n\n" + _decomposition_summary(cells) + "\n"


def _decomposition_summary(cells: list[dict]) -> str:
  def spread(key):
    x = np.array([c[key] for c in cells if not math.isnan(c[key])])
    if not len(x):
      return "no cell"
    return (f"mean {x.mean():.2f}, median {np.median(x):.2f}, range {x.min():.2f}-"
            f"{x.max():.2f}, {len(x)} cells")
  defined = [c for c in cells if not math.isnan(c["R"])]
  out = [f"- ratio W4A4 / (W4A16 + W16A4): {spread('ratio')} (paper 0.906).",
         f"- R = W16A4 / W4A16: defined in {len(defined)} of {len(cells)} cells (W4A16's delta "
         f"≤ 0 in the others), > 1 in {sum(c['R'] > 1 for c in defined)} of them; "
         f"{spread('R')}.",
         f"- Activations' share W16A4 / W4A4: {spread('share')}."]
  if len(defined) >= 3:
    rho = _spearman([c["D/N"] for c in defined], [c["R"] for c in defined])
    out.append(f"- Spearman rank correlation of R with D/N over the {len(defined)} defined cells: "
               f"{rho:+.2f} (the paper: R falls as D/N grows, a negative correlation).")
  fixed = [c for c in cells if not math.isnan(c["fix"])]
  if fixed:
    cut = np.array([1 - c["fix"] for c in fixed])
    out.append(f"- FC2's input at 8 bits lowers W4A4's delta in {int((cut > 0).sum())} of "
               f"{len(fixed)} cells, by a mean {cut.mean():.0%} (range {cut.min():.0%} to "
               f"{cut.max():.0%}; the paper: 20.5% at G = 32).")
  return "\n".join(out)


def _spearman(x, y) -> float:
  """Spearman's rank correlation, tied values sharing their mean rank."""
  def ranks(v):
    v = np.asarray(v, float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
      r[v == value] = r[v == value].mean()
    return r
  return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


# (group, arm prefix, precision) of the runs whose linear inputs the kurtosis table measures
KURTOSIS_RUNS = (("fp32", "fp32", "fp32"), ("w4a4", "w4a4_g32", "W4A4"),
                 ("split", "w4a16_g32", "W4A16"), ("split", "w16a4_g32", "W16A4"),
                 ("split", "w4a4fc2a8_g32", "W4A4 FC2 8-bit"))
KURTOSIS_TOKENS_M = 4.0


def _kurtosis(runs_root, groups: list[dict], out_dir: Path) -> str:
  """Mean over the blocks of each linear site's input kurtosis, for the G = 32 runs at D = 4M
  (the paper's check: FC2's input keeps the highest kurtosis, QAT or not). Runs under
  `runs_root` (None: none) are measured when qat_kurtosis.csv lacks them, or holds them from
  another final loss or another estimator (input_kurtosis.METHOD); the CSV's other rows are
  kept (runs measured on another machine). A run that cannot be measured is named, not fatal."""
  path = out_dir / "qat_kurtosis.csv"
  order = [p for _, _, p in KURTOSIS_RUNS]
  stored = {}
  if path.is_file():
    with path.open() as f:
      stored = {(r["precision"], int(r["d"])): r for r in csv.DictReader(f)
                if r["precision"] in order}
  finished = {(g["group"], row["arm"]): _loss(row) for g in groups for row in g["arms"]
              if _loss(row) is not None}  # the arms' final valid loss (one seed: its run's)
  failed = []
  for group, prefix, precision in KURTOSIS_RUNS if runs_root is not None else ():
    for d in (64, 128, 192, 256):
      arm = f"{prefix}_d{d}_D{KURTOSIS_TOKENS_M:g}M"
      workdir = Path(runs_root) / group / arm / "seed0"
      if (group, arm) not in finished or not (workdir / "summary.json").is_file():
        continue  # not finished, or not in this runs directory
      loss = finished[(group, arm)]
      old = stored.get((precision, d))
      if (old is not None and old.get("method") == input_kurtosis.METHOD
          and _same(float(old["valid_loss"]), loss)):
        continue
      try:
        sites = input_kurtosis.of_run(workdir)
      except Exception as e:  # pylint: disable=broad-except
        failed.append(f"{group}/{arm}: {type(e).__name__}: {e}")
        continue
      stored[(precision, d)] = {"precision": precision, "d": d, "valid_loss": loss,
                                **{s: float(np.nanmean(sites.get(s, [math.nan])))
                                   for s in input_kurtosis.ORDER},
                                "per_block": json.dumps({s: [round(x, 3) for x in v]
                                                         for s, v in sites.items()}),
                                "method": input_kurtosis.METHOD}
  notes = "".join(f"\nNot measured: {f}\n" for f in failed)
  if not stored:
    return notes
  rows = sorted(stored.values(), key=lambda r: (int(r["d"]), order.index(r["precision"])))
  _write_csv(rows, path)
  sites = input_kurtosis.ORDER
  lines = [f"\n### Kurtosis of the linear layers' inputs (G = 32, D = "
           f"{KURTOSIS_TOKENS_M:g}M; per token over the features, mean over tokens and "
           "blocks; 3 is Gaussian)\n",
           f"| d | precision | {' | '.join(sites)} |", "|---|---|" + "---|" * len(sites)]
  lines += [f"| {r['d']} | {r['precision']} | "
            + " | ".join(f"{float(r[s]):.1f}" for s in sites) + " |" for r in rows]
  return "\n".join(lines) + "\n" + notes


def _same(a: float, b: float) -> bool:
  return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9
