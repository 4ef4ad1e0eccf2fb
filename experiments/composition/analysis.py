"""`research report composition` calls analyze(): do the parts' gains add up?

Three tables, from the `compose` group of the report (results.json rows; lower loss is better):

1. Each arm against `pre` (and the vwn4 arms also against `pre_untied`, which separates
   the untied head that VWN needs): Δ valid loss = mean(arm) - mean(pre) with its 95% interval
   (research/verdict.py `interval`: on the paired per-seed differences when both arms finished
   every seed, seed i of each being the same data order and init, else Welch's), and the
   differences in parameters, forward FLOPs per token and measured seconds per step (means over
   seeds; the sweeps share a CPU, so step time is a rough guide).

2. Additivity of each pair (hc4_moda = hc4 + moda, vwn4_moda = vwn4 + moda, and the same two
   with phd), with Δ_x the arm's Δ against `pre`:

     I = Δ_pair - (Δ_a + Δ_b) = mean(pair) - mean(a) - mean(b) + mean(pre)

   and its 95% interval, Student t:
     paired   when all four arms finished every seed (index s is seed s in each):
              I_s = pair_s - a_s - b_s + pre_s, mean(I_s) +- t(n-1) sd(I_s) / sqrt(n)
     Welch    otherwise (results.json keeps only the finished seeds' values, so which seed is
              missing is not known): I +- t(df) sqrt(sum_k var_k / n_k) over the four arms,
              df by Welch-Satterthwaite: (sum_k v_k)^2 / sum_k (v_k^2 / (n_k - 1)),
              v_k = var_k / n_k
   The table says which. No interval (n/a) when a paired I has fewer than 2 seeds, or an arm of
   a Welch I has fewer than 2 values.

   The word, from the interval [lo, hi] of I:
     sub-additive     lo > 0: the pair gains resolvedly less than the sum of its parts (the parts
                      overlap; I > 0 because lower loss is better)
     super-additive   hi < 0: the pair gains resolvedly more than the sum
     additive         lo <= 0 <= hi and the whole interval lies within +-|Δ_a + Δ_b| / 2: it
                      excludes the pair losing (or adding) half of the parts' summed gain
     additive (not resolved)
                      lo <= 0 <= hi but the interval reaches past +-|Δ_a + Δ_b| / 2: no
                      interaction is resolved, and neither is additivity (the seeds cannot tell
                      the sum from half of it)
     not resolved (fewer than 2 seeds)
                      no interval
     not measured     one of the four arms has no finished seed

3. The measured cost of each pair against `pre`: seconds per step, parameters and forward FLOPs
   per token, each as the pair's difference and as the sum of its parts' differences.

Arms or seeds not run yet do not fail the analysis: their rows say "not measured".
"""

from __future__ import annotations

import math

from research import experiments, verdict
from research.scoreboard import count_cell, delta_cell, signed

GROUP = "compose"
BASELINE = "pre"
UNTIED = "pre_untied"
# the sweep's arms (experiments/composition/sweep.py), read from it: every arm but the
# baseline; of the arms with a claim (the baselines have none), those with VWN also against
# the untied baseline, and each pair with its two parts (the config's parse of the name)
_COMPOSE = experiments.get_sweep("composition", common=False).groups[GROUP]
_PARTS = {a.name: experiments.load_config_module("composition").variant_parts(a.name)
          for a in _COMPOSE if a.claim is not None}
ARMS = tuple(a.name for a in _COMPOSE if a.name != BASELINE)
ALSO_VS_UNTIED = tuple(n for n, parts in _PARTS.items() if "vwn4" in parts)
PAIRS = tuple((n, *parts) for n, parts in _PARTS.items() if len(parts) == 2)
LEVEL = 0.95
WIDE = 0.5  # "additive" needs I's interval within +-WIDE x |Δ_a + Δ_b|
NOT_MEASURED = "not measured"


# ------------------------------------------------------------------------------- per-seed values

def _values(row: dict | None) -> list[float]:
  return list(((row or {}).get("valid_loss") or {}).get("values") or [])


def _every_seed(rows: list[dict]) -> bool:
  """Whether index i of every row's per-seed values is the same seed: each finished every seed,
  and as many."""
  counts = {len(_values(r)) for r in rows}
  return len(counts) == 1 and all(
      r.get("seeds_finished") == r.get("seeds_total") for r in rows)


def _missing(row: dict | None) -> str:
  """'not measured', with the arm's status where there is one."""
  status = (row or {}).get("status")
  return NOT_MEASURED if status in (None, "done", "not run") else f"{NOT_MEASURED} ({status})"


def delta(arm: dict, ref: dict) -> tuple[verdict.Interval, str]:
  """Δ valid loss of `arm` against `ref` and its interval; the seeds column ("3 paired")."""
  values, reference = _values(arm), _values(ref)
  paired = _every_seed([arm, ref])
  seeds = f"{len(values)} paired" if paired else f"{len(values)} vs {len(reference)}, Welch"
  return verdict.interval(values, reference, paired, LEVEL), seeds


def _var(xs: list[float]) -> float:
  m = sum(xs) / len(xs)
  return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def interaction(pair: dict, a: dict, b: dict, pre: dict) -> verdict.Interval:
  """I = Δ_pair - (Δ_a + Δ_b) and its interval: paired on I_s when the four rows finished every
  seed (verdict.interval on I_s against 0), else Welch-Satterthwaite over the four arms."""
  rows = [pair, a, b, pre]
  vals = [_values(r) for r in rows]
  nan = float("nan")
  if _every_seed(rows):
    per_seed = [p - x - y + r for p, x, y, r in zip(*vals)]
    return verdict.interval(per_seed, [0.0] * len(per_seed), True, LEVEL)
  means = [sum(v) / len(v) for v in vals]
  value = means[0] - means[1] - means[2] + means[3]
  if any(len(v) < 2 for v in vals):
    return verdict.Interval(value, nan, nan, False, nan, LEVEL)
  parts = [_var(v) / len(v) for v in vals]  # v_k = var_k / n_k
  se = math.sqrt(sum(parts))
  if se == 0:  # no spread at all: the interval is the point
    return verdict.Interval(value, value, value, False, nan, LEVEL)
  df = sum(parts) ** 2 / sum(p * p / (len(v) - 1) for p, v in zip(parts, vals))
  half = verdict.t_quantile(LEVEL, df) * se
  return verdict.Interval(value, value - half, value + half, False, df, LEVEL)


def word(i: verdict.Interval, parts_sum: float) -> str:
  """The additivity word for I's interval, `parts_sum` = Δ_a + Δ_b (module docstring)."""
  if math.isnan(i.low):
    return "not resolved (fewer than 2 seeds)"
  if i.low > 0:
    return "sub-additive"
  if i.high < 0:
    return "super-additive"
  if max(-i.low, i.high) <= WIDE * abs(parts_sum):
    return "additive"
  return "additive (not resolved)"


# ------------------------------------------------------------------------------------ cells

def _cost(arm: dict, ref: dict, key: str, fmt) -> str:
  """The difference arm - ref of a mean cost and its percentage; a dash where one is missing."""
  a, r = arm.get(key), ref.get(key)
  if a is None or r is None:
    return "–"
  if a == r:
    return "0"
  return f"{fmt(a - r)} ({100 * (a / r - 1):+.1f}%)" if r else fmt(a - r)


def _parts_cost(a: dict, b: dict, ref: dict, key: str, fmt) -> str:
  """Δ_a + Δ_b of a mean cost against `ref`, and its percentage of ref's."""
  if any(row.get(key) is None for row in (a, b, ref)):
    return "–"
  total = a[key] + b[key] - 2 * ref[key]
  if total == 0:
    return "0"
  return f"{fmt(total)} ({100 * total / ref[key]:+.1f}%)" if ref[key] else fmt(total)


_MS = lambda v: f"{1e3 * v:+.1f} ms"  # noqa: E731
_MFLOPS = lambda v: f"{v / 1e6:+.3f}M"  # noqa: E731
COSTS = (("params", count_cell), ("flops_per_token_fwd", _MFLOPS), ("step_time_s", _MS))


def _measured(row: dict | None) -> bool:
  return bool(_values(row))


# ------------------------------------------------------------------------------------ tables

def delta_table(rows: dict[str, dict]) -> list[str]:
  lines = ["### Each arm against the baseline", "",
           f"Δ valid loss: mean(arm) - mean(reference), {LEVEL:.0%} interval (research/verdict.py "
           "`interval`: paired per-seed differences when both arms finished every seed, else "
           "Welch's); Δ params, Δ forward FLOPs/token and Δ step time: differences of the "
           "means over seeds (step time measured on a shared CPU: a rough guide).", "",
           "| arm | vs | Δ valid loss [95%] | seeds | Δ params | Δ FLOPs/token | Δ step time |",
           "|---|---|---|---|---|---|---|"]
  comparisons = [(name, BASELINE) for name in ARMS]
  comparisons += [(name, UNTIED) for name in ALSO_VS_UNTIED]
  for name, ref_name in comparisons:
    arm, ref = rows.get(name), rows.get(ref_name)
    if not (_measured(arm) and _measured(ref)):
      missing = _missing(arm) if not _measured(arm) else f"{ref_name}: {_missing(ref)}"
      lines.append(f"| {name} | {ref_name} | {missing} | – | – | – | – |")
      continue
    i, seeds = delta(arm, ref)
    lines.append(f"| {name} | {ref_name} | {delta_cell(i)} | {seeds} | "
                 + " | ".join(_cost(arm, ref, key, fmt) for key, fmt in COSTS) + " |")
  return lines


def additivity_table(rows: dict[str, dict]) -> list[str]:
  lines = ["### Additivity of the pairs", "",
           "I = Δ_pair - (Δ_a + Δ_b), every Δ against `pre` (lower loss is better: I > 0 is a "
           f"smaller gain than the sum), with its {LEVEL:.0%} interval: paired on "
           "I_s = pair_s - a_s - b_s + pre_s (Student t, n-1 df) when all four arms finished "
           "every seed, else Welch-Satterthwaite over the four arms' variances. Word: "
           "sub-additive when the interval is above 0, super-additive when below, additive when "
           f"it holds 0 and lies within ±{WIDE:g} x |Δ_a + Δ_b|, \"additive (not resolved)\" "
           "when it holds 0 but reaches past that (the seeds cannot tell the sum from half of "
           "it).", "",
           "| pair | Δ_pair | Δ_a + Δ_b | I [95%] | interval | verdict |",
           "|---|---|---|---|---|---|"]
  pre = rows.get(BASELINE)
  for pair_name, a_name, b_name in PAIRS:
    label = f"{pair_name} = {a_name} + {b_name}"
    missing = [n for n in (pair_name, a_name, b_name, BASELINE) if not _measured(rows.get(n))]
    if missing:
      what = ", ".join(f"{n}: {_missing(rows.get(n))}" for n in missing)
      lines.append(f"| {label} | {what} | – | – | – | {NOT_MEASURED} |")
      continue
    pair, a, b = rows[pair_name], rows[a_name], rows[b_name]
    d_pair, d_a, d_b = (delta(r, pre)[0].delta for r in (pair, a, b))
    i = interaction(pair, a, b, pre)
    how = (f"{len(_values(pair))} seeds paired" if i.paired else
           "Welch, seeds pair/a/b/pre " + "/".join(str(len(_values(r))) for r in (pair, a, b, pre)))
    lines.append(f"| {label} | {signed(d_pair)} | {signed(d_a + d_b)} | {delta_cell(i)} "
                 f"| {how} | {word(i, d_a + d_b)} |")
  return lines


def cost_table(rows: dict[str, dict]) -> list[str]:
  lines = ["### Measured cost of the pairs against `pre`", "",
           "Each cost as the pair's difference from `pre` and as the sum of its parts' "
           "differences (means over finished seeds).", "",
           "| pair | step time of pre → pair | Δ step: pair | Δ step: a + b | Δ params: pair "
           "| Δ params: a + b | Δ FLOPs/token: pair | Δ FLOPs/token: a + b |",
           "|---|---|---|---|---|---|---|---|"]
  pre = rows.get(BASELINE)
  for pair_name, a_name, b_name in PAIRS:
    label = f"{pair_name} = {a_name} + {b_name}"
    if not (_measured(rows.get(pair_name)) and _measured(pre)):
      what = _missing(rows.get(pair_name)) if _measured(pre) else f"pre: {_missing(pre)}"
      lines.append(f"| {label} | {what} | – | – | – | – | – | – |")
      continue
    pair = rows[pair_name]
    parts = [rows.get(n) if _measured(rows.get(n)) else {} for n in (a_name, b_name)]
    step = pre.get("step_time_s"), pair.get("step_time_s")
    step_cell = ("–" if None in step else
                 f"{1e3 * step[0]:.1f} → {1e3 * step[1]:.1f} ms (x{step[1] / step[0]:.2f})")
    cells = [label, step_cell]
    for key, fmt in (("step_time_s", _MS), ("params", count_cell), ("flops_per_token_fwd", _MFLOPS)):
      cells += [_cost(pair, pre, key, fmt), _parts_cost(*parts, pre, key, fmt)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del experiment, runs_root, out_dir
  group = next((g for g in groups if g.get("group") == GROUP), {})
  rows = {row["arm"]: row for row in group.get("arms", [])}
  lines = ["## Composition: do the gains add up?", ""]
  if not group:
    lines += [f"No `{GROUP}` group in this report: every row below is {NOT_MEASURED}.", ""]
  pre = rows.get(BASELINE) or {}
  if pre.get("from"):
    lines += [f"`{BASELINE}` is the row of `{pre['from']}` (same config, seeds 0..n-1; measured "
              f"{pre.get('date', '?')}): its seeds pair with this sweep's.", ""]
  for table in (delta_table, additivity_table, cost_table):
    lines += table(rows) + [""]
  return "\n".join(lines)
