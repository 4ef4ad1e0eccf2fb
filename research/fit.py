"""Power-law fits of a grid of runs, with bootstrap uncertainty and a held-out prediction.

  research fit TABLE.csv --target delta --terms N,D,log2:G [--holdout N=max,D=max]
                         [--where precision=W4A4] [--bootstrap 2000] [--seed 0] [--out F]

A law  y = k * prod_i t_i^gamma_i  (t_i a column, or log2 of one: `log2:G`) is linear in logs,
log y = log k + sum_i gamma_i log t_i, so it is fitted by least squares in log space (the
QAT scaling law's delta(N, D, G) = k D^g_D (log2 G)^g_G / N^g_N has gamma_N = -g_N). Rows
with y <= 0 cannot enter a log fit and are dropped (and counted). Uncertainty: the rows are
resampled with replacement `bootstrap` times and refitted; each coefficient's 95% interval is
the 2.5 / 97.5 percentiles. Held-out check: the rows matching `holdout` (column=value, `max`
or `min` meaning the column's extreme; all conditions must hold: a corner of the grid) are left
out of a second fit, which predicts them; the relative errors are reported. `--where` fits a
subset of the table (`select`: rows whose columns equal the values given).

The table is a CSV with a header, or a JSON list of objects; experiments build theirs from
their runs (experiments/qat_scaling/analysis.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from research.errors import ResearchError


class FitError(ResearchError, ValueError):
  """A fit that cannot be made: missing columns, too few rows, a bad term."""


@dataclasses.dataclass(frozen=True)
class Term:
  column: str
  log2: bool = False  # the factor is log2(column)

  @classmethod
  def parse(cls, text: str) -> "Term":
    if text.startswith("log2:"):
      return cls(text[len("log2:"):], log2=True)
    if ":" in text:
      raise FitError(f"term '{text}': a term is a column or log2:COLUMN")
    return cls(text)

  @property
  def name(self) -> str:
    return f"log2({self.column})" if self.log2 else self.column

  @classmethod
  def from_name(cls, name: str) -> "Term":
    """The term whose `name` this is (a Fit keeps its terms by name)."""
    if name.startswith("log2(") and name.endswith(")"):
      return cls(name[len("log2("):-1], log2=True)
    return cls(name)

  def values(self, rows: list[dict]) -> np.ndarray:
    try:
      x = np.asarray([float(r[self.column]) for r in rows], np.float64)
    except KeyError as e:
      raise FitError(f"no column '{self.column}' in the table (columns: "
                     f"{sorted(rows[0]) if rows else []})") from e
    x = np.log2(x) if self.log2 else x
    if np.any(x <= 0):
      raise FitError(f"term {self.name} must be positive in every row (log2 of 1 is 0)")
    return x


@dataclasses.dataclass
class Fit:
  target: str
  terms: list[str]
  coef: dict[str, float]  # "log_k" and one exponent per term
  interval: dict[str, tuple[float, float]]
  r2: float
  rows: int
  dropped: int
  holdout: dict | None = None

  def describe(self) -> str:
    law = " * ".join(f"{t}^{self.coef[t]:+.4f}" for t in self.terms)
    lines = [f"{self.target} = {math.exp(self.coef['log_k']):.4g} * {law}   "
             f"(R^2 {self.r2:.3f}, {self.rows} rows, {self.dropped} dropped with "
             f"{self.target} <= 0)"]
    for name in ["log_k"] + self.terms:
      lo, hi = self.interval[name]
      lines.append(f"  {name:>14s} {self.coef[name]:+.4f}   95% [{lo:+.4f}, {hi:+.4f}]")
    if self.holdout:
      h = self.holdout
      lines.append(f"  held out {h['where']}: {h['rows']} rows, predicted from the other "
                   f"{h['fit_rows']}: mean |relative error| {h['mean_abs_rel_error']:.1%}")
    return "\n".join(lines)

  def predict(self, rows: list[dict]) -> np.ndarray:
    """The fitted law's value at each row (rows hold the terms' columns)."""
    coef = np.asarray([self.coef[n] for n in ["log_k"] + self.terms])
    return np.exp(_design(rows, [Term.from_name(n) for n in self.terms]) @ coef)


def select(rows: list[dict], where: str) -> list[dict]:
  """The rows whose columns equal every `column=value` of the comma-separated `where`
  (compared as numbers where both parse as numbers, else as text)."""
  out = rows
  for cond in filter(None, (c.strip() for c in where.split(","))):
    column, sep, value = (x.strip() for x in cond.partition("="))
    if not sep:
      raise FitError(f"--where '{cond}' is not of the form column=value")
    if not any(column in r for r in rows):
      raise FitError(f"--where: no column '{column}' in the table (columns: "
                     f"{sorted(rows[0]) if rows else []})")
    out = [r for r in out if column in r and _equal(r[column], value)]
  if not out:
    raise FitError(f"--where '{where}' matches no row")
  return out


def _equal(a, b) -> bool:
  try:
    return math.isclose(float(a), float(b))
  except (TypeError, ValueError):
    return str(a) == str(b)


def load_table(path: str | Path) -> list[dict]:
  path = Path(path)
  if not path.is_file():
    raise FitError(f"no table at {path}")
  if path.suffix == ".json":
    rows = json.loads(path.read_text())
  else:
    with path.open(newline="") as f:
      rows = list(csv.DictReader(f))
  if not rows:
    raise FitError(f"{path} holds no rows")
  return rows


def _design(rows, terms):
  return np.stack([np.ones(len(rows))] + [np.log(t.values(rows)) for t in terms], axis=1)


def _lstsq(x, y):
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  return coef


def fit(rows: list[dict], target: str, terms: list[str], *, holdout: str = "",
        bootstrap: int = 2000, seed: int = 0) -> Fit:
  parsed = [Term.parse(t) for t in terms]
  try:
    y_all = np.asarray([float(r[target]) for r in rows], np.float64)
  except KeyError as e:
    raise FitError(f"no column '{target}' in the table") from e
  keep = y_all > 0
  rows = [r for r, k in zip(rows, keep) if k]
  if len(rows) < len(parsed) + 2:
    raise FitError(f"{len(rows)} rows with {target} > 0 cannot fit {len(parsed) + 1} "
                   "coefficients with a residual")
  x, y = _design(rows, parsed), np.log(y_all[keep])
  for term, column in zip(parsed, x.T[1:]):
    if np.ptp(column) == 0:
      raise FitError(f"term {term.name} is the same in every row: its exponent and k cannot be "
                     "told apart (leave it out, or fit rows where it varies)")
  coef = _lstsq(x, y)
  resid = y - x @ coef
  r2 = 1.0 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-300)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(bootstrap):
    pick = rng.integers(0, len(rows), len(rows))
    if np.linalg.matrix_rank(x[pick]) == x.shape[1]:
      draws.append(_lstsq(x[pick], y[pick]))
  draws = np.asarray(draws) if draws else coef[None]
  names = ["log_k"] + [t.name for t in parsed]
  out = Fit(target=target, terms=names[1:], coef=dict(zip(names, map(float, coef))),
            interval={n: (float(np.percentile(draws[:, i], 2.5)),
                          float(np.percentile(draws[:, i], 97.5))) for i, n in enumerate(names)},
            r2=r2, rows=len(rows), dropped=int((~keep).sum()))
  if holdout:
    out.holdout = _holdout(rows, x, y, holdout)
  return out


def _holdout(rows, x, y, spec: str) -> dict:
  mask = np.ones(len(rows), bool)
  for cond in spec.split(","):
    column, _, value = cond.partition("=")
    try:
      col = np.asarray([float(r[column]) for r in rows])
    except KeyError as e:
      raise FitError(f"holdout: no column '{column}'") from e
    target = col.max() if value == "max" else col.min() if value == "min" else float(value)
    mask &= np.isclose(col, target)
  if not mask.any() or mask.all():
    raise FitError(f"holdout '{spec}' must select some but not all of the {len(rows)} rows "
                   "with a positive target (rows <= 0 are dropped before it is applied)")
  if (~mask).sum() < x.shape[1] + 1:
    raise FitError(f"holdout '{spec}' leaves too few rows to fit")
  coef = _lstsq(x[~mask], y[~mask])
  pred, true = np.exp(x[mask] @ coef), np.exp(y[mask])
  rel = (pred - true) / true
  return {"where": spec, "rows": int(mask.sum()), "fit_rows": int((~mask).sum()),
          "predicted": pred.tolist(), "measured": true.tolist(),
          "mean_abs_rel_error": float(np.mean(np.abs(rel)))}
