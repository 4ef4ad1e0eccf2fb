"""`research report virtual_width` calls analyze(): per sweep group, the log-linear fit of the
final valid loss against log2 of the virtual width r (the paper's Fig. 8: loss = -0.0069
log2(r) + 1.6212, R^2 = 0.9986 on r = 2, 4, 8), a plot of it, and the connection heat maps.

The fit is ordinary least squares over every finished seed of every VWN arm of the group (so
3 seeds x 4 widths = 12 points), with the slope's standard error; it needs two widths or more.
The baseline (r = 1, no GHC) is drawn for reference, not fitted: it is a different model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from research.eval import connections

PAPER_SLOPE = -0.0069  # loss per doubling of r (Fig. 8)


def fit_log_linear(widths, losses) -> dict | None:
  """OLS of loss = slope * log2(r) + intercept; None with fewer than two distinct widths."""
  x = np.log2(np.asarray(widths, np.float64))
  y = np.asarray(losses, np.float64)
  if len(np.unique(x)) < 2:
    return None
  slope, intercept = np.polyfit(x, y, 1)
  pred = slope * x + intercept
  ss_res = float(np.sum((y - pred) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  dof = len(x) - 2
  se = (math.sqrt(ss_res / dof / float(np.sum((x - x.mean()) ** 2))) if dof > 0 else math.nan)
  return {"slope": float(slope), "slope_se": se, "intercept": float(intercept),
          "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan, "points": len(x)}


def _points(group: dict) -> tuple[list, list, list]:
  """(widths, losses) of every finished VWN seed, and the baseline's losses."""
  widths, losses, base = [], [], []
  for row in group["arms"]:
    values = row["valid_loss"]["values"]
    if row["overrides"].get("model.residual.kind") == "vwn":
      r = float(row["overrides"]["model.residual.expansion"])
      widths += [r] * len(values)
      losses += list(values)
    elif row["overrides"].get("model.residual.kind") == "plain":
      base += list(values)
  return widths, losses, base


def _plot(name: str, widths, losses, base, fit: dict, out_png: Path) -> None:
  fig = Figure(figsize=(6, 4.2))
  ax = fig.subplots()
  x = np.log2(widths)
  ax.scatter(x, losses, color="tab:blue", s=14, label="VWN seeds")
  grid = np.linspace(0.0, max(x) + 0.2, 50)
  ax.plot(grid, fit["slope"] * grid + fit["intercept"], color="tab:blue",
          label=f"fit: {fit['slope']:+.4f} per doubling (R^2 {fit['r2']:.3f})")
  if base:
    ax.scatter(np.zeros(len(base)), base, color="black", marker="x", s=20, label="baseline (r = 1)")
  ax.set_xlabel("log2(virtual width r)")
  ax.set_ylabel("final valid loss (nats/token)")
  ax.set_title(f"virtual_width / {name} (paper: {PAPER_SLOPE:+.4f} per doubling)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


def analyze(experiment, runs_root, groups, out_dir) -> str:
  out_dir = Path(out_dir)
  lines = ["## Log-linear fit of loss against virtual width", "",
           f"Paper (Fig. 8, MoE-A0.8B, 500B tokens): {PAPER_SLOPE:+.4f} nats per doubling of r.",
           "", "| group | points | slope per doubling ± s.e. | intercept | R^2 |",
           "|---|---|---|---|---|"]
  plots = []
  for group in groups:
    widths, losses, base = _points(group)
    fit = fit_log_linear(widths, losses) if widths else None
    if fit is None:
      continue
    lines.append(f"| {group['group']} | {fit['points']} | {fit['slope']:+.4f} ± "
                 f"{fit['slope_se']:.4f} | {fit['intercept']:.4f} | {fit['r2']:.3f} |")
    png = f"{group['group']}_loglinear.png"
    _plot(group["group"], widths, losses, base, fit, out_dir / png)
    plots.append(f"![{group['group']} log-linear fit]({png})\n")
  text = "\n".join(lines) + "\n\n" + "\n".join(plots) if plots else ""
  heat = connections.report_section(experiment, runs_root, [g["group"] for g in groups], out_dir)
  return "\n".join(x for x in (text, heat) if x)
