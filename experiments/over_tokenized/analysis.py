"""`research report over_tokenized` calls analyze(): training and validation loss of every arm
against the baseline (the paper's main metric is training loss: its gains show there first),
and the fit of loss = a + b log10(m) over the scaling group's over-encoding arms, every seed a
point, with the slope's standard error and 95% interval (paper: b = -0.0256 on training loss,
Fig. 5, OLMoE-1.3B, 500B tokens)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

ROWS_KEY = "model.embed.over_encoding.rows"
PAPER_SLOPE = -0.0256


def _cell(s: dict | None) -> str:
  if not s or s.get("mean") is None:
    return "-"
  std = "n/a" if s["std"] is None else f"{s['std']:.4f}"
  return f"{s['mean']:.4f} ± {std}"


def _delta(s: dict | None, ref: dict | None) -> str:
  if not s or not ref or s.get("mean") is None or ref.get("mean") is None:
    return "-"
  return f"{s['mean'] - ref['mean']:+.4f}"


def loss_table(group: dict) -> str:
  rows = group["arms"]
  ref = next((r for r in rows if r["arm"] == "baseline"), None)
  lines = [f"### {group['group']}: training and validation loss (mean ± std over seeds)\n",
           "| arm | train loss | Δ train | valid loss | Δ valid | params | step time (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    train, valid = r.get("train_loss"), r.get("valid_loss")
    step = r.get("step_time_s")
    params = r.get("params")
    lines.append(
        f"| {r['arm']} | {_cell(train)} | {_delta(train, ref and ref.get('train_loss'))} "
        f"| {_cell(valid)} | {_delta(valid, ref and ref.get('valid_loss'))} "
        f"| {'-' if params is None else f'{params / 1e6:.2f}M'} "
        f"| {'-' if step is None else f'{step:.3f}'} |")
  return "\n".join(lines) + "\n"


def fit(points: list[tuple[float, float]]) -> dict | None:
  """Least squares loss = a + b x over (x, loss) points: b, its standard error, the 95%
  interval (Student t, n - 2 degrees of freedom) and R^2; None with fewer than 3 points or
  one x."""
  if len(points) < 3 or len({x for x, _ in points}) < 2:
    return None
  x, y = np.asarray(points, np.float64).T
  design = np.stack([np.ones_like(x), x], axis=1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  resid = y - design @ coef
  n = len(x)
  sigma2 = float(resid @ resid) / (n - 2)
  se = math.sqrt(sigma2 / float(((x - x.mean()) ** 2).sum()))
  half = float(scipy_stats.t.ppf(0.975, n - 2)) * se
  r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
  return dict(a=float(coef[0]), b=float(coef[1]), se=se, lo=float(coef[1]) - half,
              hi=float(coef[1]) + half, r2=r2, n=n)


def scaling_points(group: dict, metric: str) -> list[tuple[float, float]]:
  points = []
  for r in group["arms"]:
    rows = (r.get("overrides") or {}).get(ROWS_KEY)
    values = (r.get(metric) or {}).get("values") or []
    if rows and r["arm"].startswith("oe_"):
      points += [(math.log10(rows), v) for v in values]
  return points


def fit_section(group: dict) -> str:
  lines = ["### Loss against log10(m) over the OE arms (every seed a point)\n",
           "| metric | b (per decade of m) | std error | 95% interval | R² | points | paper b |",
           "|---|---|---|---|---|---|---|"]
  for metric in ("train_loss", "valid_loss"):
    f = fit(scaling_points(group, metric))
    if f is None:
      lines.append(f"| {metric} | not enough finished arms | | | | | {PAPER_SLOPE} |")
      continue
    lines.append(f"| {metric} | {f['b']:+.4f} | {f['se']:.4f} | [{f['lo']:+.4f}, {f['hi']:+.4f}] "
                 f"| {f['r2']:.2f} | {f['n']} | {PAPER_SLOPE} |")
  return "\n".join(lines) + "\n"


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del experiment, runs_root, out_dir
  sections = ["## Over-encoding analysis\n"]
  for group in groups:
    sections.append(loss_table(group))
    if group["group"] == "scaling":
      sections.append(fit_section(group))
  return "\n".join(sections)
