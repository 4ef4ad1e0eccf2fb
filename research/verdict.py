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
