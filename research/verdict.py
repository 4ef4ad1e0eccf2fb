"""The verdict rule: one word for how an arm's result stands against the paper's claim.

Every experiment README uses these words in this sense, and `research report` prints them
(docs/architecture.md, "Verdicts"). An arm is compared with its group's reference arm (the
baseline) on per-seed values where lower is better (validation loss):

  delta       mean(arm) - mean(reference)
  t           Welch's t of that difference (unequal variances; seeds are few)
  agreement   how many seeds' paired differences (the same seed index: the same data order)
              have the sign of delta, out of the seeds both arms finished

  claim "lower" (the paper says the arm beats the reference) or "higher":
    reproduced     delta has the claimed sign, |t| >= 2, and every paired seed agrees
    contradicted   delta has the opposite sign, |t| >= 2, and every paired seed agrees
    not resolved   anything else: |t| < 2, or the seeds disagree, or fewer than 2 seeds
  claim "same" (the paper says the arm does not help, or matches the reference):
    reproduced     |t| < 2 (no difference resolved at this scale)
    contradicted   |t| >= 2 and every paired seed agrees
    not resolved   otherwise

A stress test (the paper's control fails under a perturbation, the method does not) is judged
on its control first: when the control neither diverges nor degrades, the verdict is "not
testable at this scale", whatever the method arm does (`stress_verdict`).

`interval` gives delta a confidence interval (Student's t): from the paired differences when
the seeds pair (both arms finished the same seeds), else Welch's (`research scoreboard`).
"""

from __future__ import annotations

import dataclasses
import math

T_RESOLVED = 2.0
CLAIMS = ("lower", "higher", "same")
WORDS = ("reproduced", "contradicted", "not resolved", "not testable at this scale")


@dataclasses.dataclass(frozen=True)
class Comparison:
  delta: float  # mean(arm) - mean(reference)
  t: float  # Welch's t (nan when either side has fewer than 2 values or no spread)
  agree: int  # paired seeds whose difference has delta's sign
  paired: int  # seeds both arms finished

  def describe(self) -> str:
    t = "n/a" if math.isnan(self.t) else f"{self.t:+.1f}"
    return f"{self.delta:+.4f} (t {t}, {self.agree}/{self.paired} seeds)"


def _mean(xs):
  return sum(xs) / len(xs)


def _var(xs):
  m = _mean(xs)
  return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def compare(values: list[float], reference: list[float]) -> Comparison:
  """The arm's `values` against the reference's (index i of each: seed i)."""
  if not values or not reference:
    raise ValueError("compare needs at least one value on each side")
  delta = _mean(values) - _mean(reference)
  t = float("nan")
  if len(values) > 1 and len(reference) > 1:
    se = math.sqrt(_var(values) / len(values) + _var(reference) / len(reference))
    if se > 0:
      t = delta / se
  pairs = [a - b for a, b in zip(values, reference)]
  agree = sum((d > 0) == (delta > 0) and d != 0 for d in pairs)
  return Comparison(delta, t, agree, len(pairs))


def verdict(c: Comparison, claim: str) -> str:
  """The rule's word for a comparison against the paper's claim ("lower", "higher", "same")."""
  if claim not in CLAIMS:
    raise ValueError(f"claim must be one of {', '.join(CLAIMS)}, got {claim!r}")
  resolved = not math.isnan(c.t) and abs(c.t) >= T_RESOLVED
  unanimous = c.paired >= 2 and c.agree == c.paired
  if claim == "same":
    if not math.isnan(c.t) and not resolved:
      return "reproduced"
    return "contradicted" if resolved and unanimous else "not resolved"
  claimed_sign = -1 if claim == "lower" else 1
  if resolved and unanimous:
    return "reproduced" if math.copysign(1, c.delta) == claimed_sign else "contradicted"
  return "not resolved"


def stress_verdict(control_failed: bool, method: Comparison | None = None,
                   claim: str = "lower") -> str:
  """A stress test's word: untestable unless the control failed (diverged on some seed, or
  degraded by a resolved margin); then the method arm's comparison decides."""
  if not control_failed:
    return "not testable at this scale"
  return verdict(method, claim) if method is not None else "not resolved"


@dataclasses.dataclass(frozen=True)
class Interval:
  """delta = mean(arm) - mean(reference) and its `level` confidence interval [low, high]
  (nan where a side has fewer than 2 values), from the paired differences when `paired`, else
  Welch's; df: the Student t degrees of freedom used."""
  delta: float
  low: float
  high: float
  paired: bool
  df: float
  level: float = 0.95


def interval(values: list[float], reference: list[float], paired: bool,
             level: float = 0.95) -> Interval:
  """delta's `level` interval: paired, on d_i = values[i] - reference[i] (seed i of each; the
  lists must be as long), mean(d) +- t(n-1) sd(d) / sqrt(n); else Welch's, delta +-
  t(df) sqrt(var_a / n_a + var_r / n_r) with the Welch-Satterthwaite df."""
  if not values or not reference:
    raise ValueError("interval needs at least one value on each side")
  if paired and len(values) != len(reference):
    raise ValueError(f"paired values need as many on each side ({len(values)} vs {len(reference)})")
  delta = _mean(values) - _mean(reference)
  nan = float("nan")
  if paired:
    diffs = [a - b for a, b in zip(values, reference)]
    if len(diffs) < 2:
      return Interval(delta, nan, nan, True, nan, level)
    se, df = math.sqrt(_var(diffs) / len(diffs)), float(len(diffs) - 1)
  else:
    if len(values) < 2 or len(reference) < 2:
      return Interval(delta, nan, nan, False, nan, level)
    va, vr = _var(values) / len(values), _var(reference) / len(reference)
    se = math.sqrt(va + vr)  # Welch-Satterthwaite df below
    df = ((va + vr) ** 2 / (va ** 2 / (len(values) - 1) + vr ** 2 / (len(reference) - 1))
          if se else nan)
  if se == 0:  # no spread at all: the interval is the point
    return Interval(delta, delta, delta, paired, df, level)
  half = t_quantile(level, df) * se
  return Interval(delta, delta - half, delta + half, paired, df, level)


def t_quantile(level: float, df: float) -> float:
  """The t with P(|T| <= t) = level for Student's T with df (> 0, not necessarily integer)
  degrees of freedom: bisection on the two-sided tail I_{df/(df+t^2)}(df/2, 1/2)."""
  if not 0 < level < 1 or not df > 0:
    raise ValueError(f"t_quantile needs 0 < level < 1 and df > 0 (got {level}, {df})")
  tail = lambda t: _betainc(df / 2, 0.5, df / (df + t * t))  # noqa: E731  P(|T| > t)
  lo, hi = 0.0, 1.0
  while tail(hi) > 1 - level:
    lo, hi = hi, 2 * hi
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if tail(mid) > 1 - level else (lo, mid)
    if hi - lo < 1e-12 * hi:
      break
  return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b) (Numerical Recipes 6.4: the continued
  fraction, evaluated where it converges fast)."""
  if x <= 0 or x >= 1:
    return 0.0 if x <= 0 else 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1) / (a + b + 2):
    return front * _beta_fraction(a, b, x) / a
  return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
  tiny = 1e-300
  clamp = lambda v: v if abs(v) > tiny else tiny  # noqa: E731
  c, d = 1.0, 1 / clamp(1 - (a + b) * x / (a + 1))
  h = d
  for m in range(1, 500):
    for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
               -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1 / clamp(1 + aa * d)
      c = clamp(1 + aa / c)
      h *= d * c
    if abs(d * c - 1) < 1e-15:
      break
  return h
