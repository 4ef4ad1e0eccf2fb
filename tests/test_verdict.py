"""The verdict rule (research/verdict.py) on hand-checked cases, and the report's judging of a
group: comparisons with the reference arm, verdict words, and the confound check."""

from __future__ import annotations

import math

import pytest

from research import experiments
from research import report as rp
from research import verdict


def test_compare_is_welch_t_with_paired_agreement():
  # arm 1, 2, 3 (mean 2, var 1); reference 4, 6, 8 (mean 6, var 4): se = sqrt(1/3 + 4/3)
  c = verdict.compare([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
  assert c.delta == -4.0 and c.t == pytest.approx(-4.0 / math.sqrt(5 / 3))
  assert (c.agree, c.paired) == (3, 3)
  c = verdict.compare([1.0, 7.0, 3.0], [4.0, 6.0, 8.0])  # seed 1 goes the other way
  assert (c.agree, c.paired) == (2, 3)
  assert math.isnan(verdict.compare([1.0], [2.0]).t)  # one seed: no t


@pytest.mark.parametrize("values,claim,word", [
    ([1.0, 1.1, 0.9], "lower", "reproduced"),  # delta -1, |t| large, 3/3 seeds
    ([1.0, 1.1, 0.9], "higher", "contradicted"),
    ([1.0, 2.1, 0.9], "lower", "not resolved"),  # seed 1 disagrees
    ([1.95, 2.05, 2.0], "lower", "not resolved"),  # |t| < 2
    ([1.95, 2.05, 2.0], "same", "reproduced"),
    ([1.0, 1.1, 0.9], "same", "contradicted"),
])
def test_verdict_words(values, claim, word):
  assert verdict.verdict(verdict.compare(values, [2.0, 2.1, 1.9]), claim) == word


def test_a_stress_test_whose_control_does_not_fail_is_not_testable():
  c = verdict.compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
  assert verdict.stress_verdict(False, c) == "not testable at this scale"
  assert verdict.stress_verdict(True, c) == "reproduced"
  with pytest.raises(ValueError, match="claim must be one of"):
    verdict.verdict(c, "better")


def test_confounds_flag_settings_the_table_does_not_vary():
  """HybridNorm's tables give pre/post-norm the Normal init and HybridNorm the Megatron one:
  flagged. The residual-stream fair table varies only the connection: nothing flagged."""
  sweep = experiments.get_sweep("hybridnorm")
  flagged = rp.confounds("hybridnorm", sweep.arg, sweep.groups["depth"])
  assert len(flagged) == 1 and flagged[0].startswith("model.init_out_scaling (")
  assert "'none': pre, post" in flagged[0] and "'total_depth': hybridnorm" in flagged[0]
  sweep = experiments.get_sweep("hyper_connections")
  assert rp.confounds("hyper_connections", sweep.arg, sweep.groups["fair"]) == []
  varied = [experiments.Arm("a", {"train.lr": 1e-3}), experiments.Arm("b", {"train.lr": 3e-3})]
  assert rp.confounds("baseline", "scale=smoke", varied) == [
      "train.lr (0.001: a; 0.003: b)"]
  assert rp.confounds("baseline", "scale=smoke", varied, varies=("train.lr",)) == []


def test_report_judges_each_arm_against_the_reference(tmp_path):
  """A group regenerated from its results.json alone gets Δ, t, agreement and the verdict of
  arms whose sweep states the paper's claim."""
  sweep = experiments.get_sweep("hyper_connections")
  values = {"pre": [1.70, 1.71, 1.69], "dhc1": [1.70, 1.72, 1.69], "dhc2": [1.68, 1.69, 1.67],
            "dhc4": [1.65, 1.66, 1.64], "dhc8": [1.72, 1.73, 1.71]}
  rows = [{"arm": a, "seeds_total": 3, "seeds_finished": 3, "diverged": 0, "status": "done",
           "valid_loss": rp._stats(v), "valid_bpb": rp._stats(v), "tokens_per_s": None,
           "overrides": {}, "paper": {}} for a, v in values.items()]
  group = {"group": "fair", "arg": sweep.arg, "seeds_per_arm": [3], "arms": rows,
           "date": "2026-12-04"}
  rp._judge("hyper_connections", group)
  by_arm = {r["arm"]: r for r in group["arms"]}
  assert group["reference"] == "pre" and "comparison" not in by_arm["pre"]
  assert by_arm["dhc4"]["comparison"]["delta"] == pytest.approx(-0.05)
  claims = {a.name: a.claim for a in sweep.groups["fair"]}
  for arm, row in by_arm.items():
    if claims.get(arm):
      assert row["verdict"] == verdict.verdict(verdict.compare(values[arm], values["pre"]),
                                               claims[arm])
  assert by_arm["dhc4"]["verdict"] == "reproduced" and by_arm["dhc8"]["verdict"] == "contradicted"
  text = rp._markdown("hyper_connections", group)
  assert "Δ vs pre (t, seeds agreeing)" in text and "| reproduced |" in text

def test_a_superseded_group_shows_comparisons_without_verdicts():
  """hyper_connections' init-0.02 tables are kept for the init's effect; `fair` carries the
  verdicts, so table1 gets Δ and t but no verdict word, and says why."""
  sweep = experiments.get_sweep("hyper_connections")
  assert "fair" in sweep.superseded["table1"]
  rows = [{"arm": a, "seeds_total": 3, "seeds_finished": 3, "diverged": 0, "status": "done",
           "valid_loss": rp._stats(v), "valid_bpb": rp._stats(v), "tokens_per_s": None,
           "overrides": {}, "paper": {}}
          for a, v in {"pre": [1.70, 1.71, 1.69], "dhc4": [1.65, 1.66, 1.64]}.items()]
  group = {"group": "table1", "arg": sweep.arg, "seeds_per_arm": [3], "arms": rows,
           "date": "2026-12-04"}
  rp._judge("hyper_connections", group)
  dhc4 = group["arms"][1]
  assert dhc4["comparison"]["delta"] == pytest.approx(-0.05) and "verdict" not in dhc4
  text = rp._markdown("hyper_connections", group)
  assert "no verdicts here" in text and "| reproduced |" not in text


def test_heat_maps_of_groups_carried_over_stay_linked(tmp_path):
  """A report made from a runs directory without a group's runs keeps linking the heat maps an
  earlier report drew for it, each under its own group (width's glob must not take width_mtp's)."""
  from research.eval import connections  # pylint: disable=import-outside-toplevel
  for name in ("width_vwn2_connections.png", "width_mtp_vwn2_mtp_connections.png"):
    (tmp_path / name).write_bytes(b"png")
  text = connections.report_section("virtual_width", tmp_path / "runs", ["width", "width_mtp"],
                                    tmp_path)
  assert text.count("(width_vwn2_connections.png)") == 1
  assert text.count("(width_mtp_vwn2_mtp_connections.png)") == 1
  assert "![width vwn2 connections]" in text and "![width_mtp vwn2_mtp connections]" in text
  assert connections.report_section("virtual_width", tmp_path / "runs", ["fair"], tmp_path) == ""
