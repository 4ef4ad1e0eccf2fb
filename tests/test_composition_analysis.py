"""experiments/composition/analysis.py on a report's groups built by hand: each arm's Δ against
`pre`, the interaction I = Δ_pair - (Δ_a + Δ_b) of each pair with its interval and word, the
pairs' cost, and "not measured" rows for arms not run yet."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from research import experiments
from research import report
from research import run_config
from research.errors import ConfigError
from research.model import create_model

analysis = experiments._load_module(  # pylint: disable=protected-access
    "composition", "analysis.py")

T2 = 4.302652729749464  # Student t, 2 df, two-sided 95% (tables: 4.303)


def row(arm: str, values: list[float], total: int = 3, params: float = 800_000.0,
        flops: float = 1_600_000.0, step: float = 0.100, status: str = "done") -> dict:
  """A results.json row as `report._group_results` writes it (the keys analysis.py reads)."""
  return {"arm": arm, "seeds_total": total, "seeds_finished": len(values), "diverged": 0,
          "status": status if values else ("not run" if status == "done" else status),
          "valid_loss": report._stats(values),  # pylint: disable=protected-access
          "step_time_s": step if values else None, "params": params if values else None,
          "flops_per_token_fwd": flops if values else None, "overrides": {}, "paper": {}}


def groups(rows: list[dict]) -> list[dict]:
  return [{"group": "compose", "arg": "", "seeds_per_arm": [3], "arms": rows}]


def line(md: str, start: str) -> str:
  return next(l for l in md.splitlines() if l.startswith(start))


def cells(md: str, start: str) -> list[str]:
  return [c.strip() for c in line(md, start).strip("|").split("|")]


PRE = [2.0, 2.125, 2.25]  # dyadic: sums and differences below are exact in floats


def additive_rows() -> list[dict]:
  """Every part shifts every seed by a constant, and the pairs by the sums: I_s = 0 exactly."""
  shift = {"pre": 0.0, "pre_untied": -0.03125, "hc4": -0.0625, "moda": -0.125,
           "vwn4": -0.25, "hc4_moda": -0.1875, "vwn4_moda": -0.375}
  return [row(name, [v + d for v in PRE], params=800_000.0 + 10_000 * i, step=0.1 + 0.01 * i)
          for i, (name, d) in enumerate(shift.items())]


def test_exactly_additive_pair_has_zero_interaction(tmp_path):
  md = analysis.analyze("composition", tmp_path, groups(additive_rows()), tmp_path)
  hc = cells(md, "| hc4_moda = hc4 + moda")
  assert hc[1:] == ["-0.1875", "-0.1875", "+0.0000 [+0.0000, +0.0000]", "3 seeds paired",
                    "additive"]
  vwn = cells(md, "| vwn4_moda = vwn4 + moda")
  assert vwn[3] == "+0.0000 [+0.0000, +0.0000]" and vwn[5] == "additive"
  i = analysis.interaction(*(row(n, [v + d for v in PRE]) for n, d in (
      ("p", -0.1875), ("a", -0.0625), ("b", -0.125), ("pre", 0.0))))
  assert i.paired and i.delta == i.low == i.high == 0.0
  # table 1: every arm against pre, and VWN's also against pre_untied (vwn4: -0.25 + 0.03125)
  assert cells(md, "| hc4 | pre")[2:4] == ["-0.0625 [-0.0625, -0.0625]", "3 paired"]
  assert cells(md, "| vwn4 | pre_untied")[2] == "-0.2188 [-0.2188, -0.2188]"
  assert cells(md, "| vwn4_moda | pre_untied")[2] == "-0.3438 [-0.3438, -0.3438]"
  # costs: hc4 is row 2 (+20,000 params, +20 ms), moda row 3, hc4_moda row 5
  assert cells(md, "| hc4 | pre")[4:] == ["+0.020M (+2.5%)", "0", "+20.0 ms (+20.0%)"]
  cost = cells(md, "| hc4_moda = hc4 + moda | 100.0")
  assert cost[1:] == ["100.0 → 150.0 ms (x1.50)", "+50.0 ms (+50.0%)", "+50.0 ms (+50.0%)",
                      "+0.050M (+6.2%)", "+0.050M (+6.2%)", "0", "0"]


@pytest.mark.parametrize("per_seed, low, high, word", [
    ([-0.01, 0.0, 0.01], -T2 * 0.01 / math.sqrt(3), T2 * 0.01 / math.sqrt(3),
     "additive"),  # [-0.0248, +0.0248]: holds 0, within +-0.5 x 0.07
    ([0.01, 0.02, 0.03], 0.02 - T2 * 0.01 / math.sqrt(3), 0.02 + T2 * 0.01 / math.sqrt(3),
     "additive (not resolved)"),  # [-0.0048, +0.0448]: holds 0, but reaches past +0.035
    ([0.03, 0.04, 0.05], 0.04 - T2 * 0.01 / math.sqrt(3), 0.04 + T2 * 0.01 / math.sqrt(3),
     "sub-additive"),  # [0.0152, 0.0648]: the pair gains less than the sum
    ([-0.05, -0.04, -0.03], -0.04 - T2 * 0.01 / math.sqrt(3), -0.04 + T2 * 0.01 / math.sqrt(3),
     "super-additive"),
    ([-0.05, 0.0, 0.05], -T2 * 0.05 / math.sqrt(3), T2 * 0.05 / math.sqrt(3),
     "additive (not resolved)"),  # [-0.124, +0.124]
])
def test_paired_interaction_by_hand(tmp_path, per_seed, low, high, word):
  """pre, a (Δ -0.05), b (Δ -0.02) and pair_s = I_s + a_s + b_s - pre_s: I = mean(I_s),
  interval mean +- t(2) sd / sqrt(3)."""
  pre, a, b = [2.00, 2.02, 2.04], [1.95, 1.96, 2.00], [1.98, 2.00, 2.02]
  pair = [i + x + y - r for i, x, y, r in zip(per_seed, a, b, pre)]
  rows = [row("pre", pre), row("hc4", a), row("moda", b), row("hc4_moda", pair)]
  i = analysis.interaction(rows[3], rows[1], rows[2], rows[0])
  assert i.paired and i.df == 2
  assert i.delta == pytest.approx(sum(per_seed) / 3, abs=1e-12)
  assert (i.low, i.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
  md = analysis.analyze("composition", tmp_path, groups(rows), tmp_path)
  got = cells(md, "| hc4_moda = hc4 + moda")
  assert got[2] == "-0.0700" and got[4] == "3 seeds paired" and got[5] == word
  assert got[3] == f"{sum(per_seed) / 3:+.4f} [{low:+.4f}, {high:+.4f}]"


def test_welch_interaction_when_a_seed_is_missing():
  """An arm with 2 of 3 seeds: the seeds do not pair, so I's interval combines the four arms'
  variances: I +- t(df) sqrt(sum var_k / n_k), df by Welch-Satterthwaite."""
  pre, a, b, pair = [2.00, 2.02, 2.04], [1.95, 1.96, 2.00], [1.98, 2.00, 2.02], [1.94, 1.98]
  i = analysis.interaction(row("p", pair), row("a", a), row("b", b), row("pre", pre))
  # means 1.96, 1.97, 2.00, 2.02: I = 1.96 - 1.97 - 2.00 + 2.02 = 0.01
  # variances / n: pair 0.0008 / 2, a 0.00070 / 3, b 0.0004 / 3, pre 0.0004 / 3
  v = [0.0008 / 2, 0.0007 / 3, 0.0004 / 3, 0.0004 / 3]
  df = sum(v) ** 2 / (v[0] ** 2 / 1 + sum(x * x / 2 for x in v[1:]))
  half = scipy_stats.t.ppf(0.975, df) * math.sqrt(sum(v))
  assert not i.paired and i.delta == pytest.approx(0.01, abs=1e-12)
  assert i.df == pytest.approx(df, rel=1e-9)
  assert (i.low, i.high) == (pytest.approx(0.01 - half, abs=1e-9),
                             pytest.approx(0.01 + half, abs=1e-9))
  rows = [row("pre", pre), row("hc4", a), row("moda", b), row("hc4_moda", pair)]
  md = analysis.analyze("composition", None, groups(rows), None)
  got = cells(md, "| hc4_moda = hc4 + moda")
  assert got[4] == "Welch, seeds pair/a/b/pre 2/3/3/3"
  assert cells(md, "| hc4_moda | pre")[3] == "2 vs 3, Welch"
  # one seed of an arm: no interval, and the word says so
  one = analysis.interaction(row("p", [1.9]), row("a", a), row("b", b), row("pre", pre))
  assert math.isnan(one.low) and analysis.word(one, -0.07) == "not resolved (fewer than 2 seeds)"


def test_missing_arms_print_not_measured():
  rows = additive_rows()
  rows = [r for r in rows if r["arm"] != "vwn4_moda"]  # not in the sweep's results yet
  rows[[r["arm"] for r in rows].index("moda")] = row("moda", [], status="running")
  md = analysis.analyze("composition", None, groups(rows), None)
  assert line(md, "| vwn4_moda | pre |").startswith("| vwn4_moda | pre | not measured |")
  assert "| moda | pre | not measured (running) |" in md
  for pair in ("hc4_moda = hc4 + moda", "vwn4_moda = vwn4 + moda"):
    assert cells(md, f"| {pair} |")[-1] == "not measured"
  assert cells(md, "| vwn4_moda = vwn4 + moda | not measured")[1] == "not measured"
  assert cells(md, "| vwn4 | pre_untied")[2] == "-0.2188 [-0.2188, -0.2188]"
  # no compose group at all (nothing run): every table still prints, all rows not measured
  empty = analysis.analyze("composition", None, [], None)
  assert "No `compose` group" in empty and "Traceback" not in empty
  rows = [l for l in empty.splitlines() if l.startswith("| ") and "not measured" in l]
  assert len(rows) == 12 + 4 + 4  # table 1 (9 arms vs pre, 3 vs pre_untied), 4 pairs, 4 costs


def test_every_compose_arm_builds_and_runs_at_smoke_scale():
  """Every combination the sweep trains builds at smoke scale and gives finite, causal logits
  (the pairs with PHD run the repeated layout through hyper-connections and virtual width)."""
  sweep = experiments.get_sweep("composition")
  for arm in sweep.groups["compose"]:
    cfg = run_config.resolve(experiments.get_config("composition:scale=smoke", arm.overrides))
    cfg.model.vocab_size = cfg.model.vocab_size or 65
    model = create_model(cfg.model)
    x = jnp.arange(2 * 16).reshape(2, 16) % cfg.model.vocab_size
    y = x.at[:, 9:].set((x[:, 9:] + 3) % cfg.model.vocab_size)
    a, b = np.asarray(model(x)), np.asarray(model(y))
    assert a.shape == (2, 16, cfg.model.vocab_size) and np.all(np.isfinite(a)), arm.name
    np.testing.assert_array_equal(a[:, :9], b[:, :9], err_msg=arm.name)


def test_exclusive_parts_are_errors():
  config = experiments.load_config_module("composition")
  for variant in ("hc4_vwn4", "moda_phd", "hc4_hc4"):
    with pytest.raises(ConfigError, match=variant):
      config.variant_overrides(variant)
