"""`research scoreboard`: rows from synthetic experiments' results.json (the interval arithmetic
checked by hand, paired and Welch; the sorting; the like-for-like flag; the verdict's source; a
new experiment appearing with no code change), the CLI and its hook in `research report`, and
one build over the committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from research import cli, experiments, scoreboard, verdict

ARG = "scale=tiny,corpus=tinyshakespeare"
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 10: 2.228139}  # Student t tables, 97.5%


def _mean(xs):
  return sum(xs) / len(xs)


def _var(xs):
  m = _mean(xs)
  return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def arm_row(name, values, *, total=None, params=1e6, flops=2e6, step=0.1, verdict_word=None,
            overrides=None):
  """A results.json row as `research report` writes it (only what the scoreboard reads)."""
  row = {"arm": name, "seeds_total": total or len(values), "seeds_finished": len(values),
         "valid_loss": {"mean": _mean(values) if values else None, "values": values,
                        "std": math.sqrt(_var(values)) if len(values) > 1 else None},
         "params": params, "params_activated": params, "flops_per_token_fwd": flops,
         "step_time_s": step, "overrides": overrides or {}}
  if verdict_word:
    row["verdict"] = verdict_word
  return row


def make_experiment(root: Path, name: str, rows: list[dict] | None, *, headline: str,
                    config: str = "", claims: dict | None = None, superseded: bool = False):
  """experiments/<name>/ with a config.py (the common setting, then `config` lines), a
  sweep.py whose group "main" has an arm per row (the first the reference) and the given
  `headline` declaration, and results/results.json holding `rows` (none: not measured)."""
  d = root / name
  d.mkdir(parents=True)
  (d / "config.py").write_text(
      "from research.scales import SCALES, apply_common_setting, scaled_config  # noqa: F401\n"
      f"CLAIM = 'a synthetic paper'\n\n\ndef get_config(arg=''):\n"
      f"  c = apply_common_setting(scaled_config(arg, {name!r})[0])\n  m = c.model\n{config}"
      "  return c\n")
  names = [r["arm"] for r in rows] if rows else ["base", "method"]
  claims = claims or {}
  arms = ", ".join(f"Arm({n!r}, claim={claims.get(n)!r})" for n in names)
  (d / "sweep.py").write_text(
      "from research.experiments import Arm, Headline, Sweep  # noqa: F401\n\n\n"
      f"def get_sweep():\n  return Sweep(groups={{'main': [{arms}]}}, arg={ARG!r}, "
      f"superseded={({'main': 'unfair'} if superseded else {})!r}, headline={headline})\n")
  if rows is not None:
    (d / "results").mkdir()
    group = {"group": "main", "arg": ARG, "reference": names[0], "arms": rows}
    (d / "results" / "results.json").write_text(json.dumps(
        {"experiment": name, "date": "2026-01-01", "groups": [group]}))


HEADLINE = "(Headline('main', 'method'),)"
BASE, METHOD = [1.1, 1.25, 1.3], [1.0, 1.2, 1.1]


def rows_by_experiment(board):
  return {r.experiment: r for r in board.rows}


def test_paired_interval_by_hand(root):
  make_experiment(root, "paired", [arm_row("base", BASE, params=1000, flops=2000, step=0.2),
                                   arm_row("method", METHOD, params=1100, flops=2500, step=0.3)],
                  headline=HEADLINE)
  row = rows_by_experiment(scoreboard.build())["paired"]
  d = [a - b for a, b in zip(METHOD, BASE)]  # -0.1, -0.05, -0.2
  half = T975[2] * math.sqrt(_var(d) / 3)
  assert row.seeds == "3 paired" and row.interval.paired
  assert row.interval.delta == pytest.approx(-0.35 / 3)
  assert row.interval.low == pytest.approx(-0.35 / 3 - half, abs=1e-6)
  assert row.interval.high == pytest.approx(-0.35 / 3 + half, abs=1e-6)
  assert half == pytest.approx(0.18973, abs=1e-5)
  assert (row.params, row.flops, row.step) == ((1000, 1100), (2000, 2500), (0.2, 0.3))
  assert row.loss == pytest.approx(_mean(BASE))
  assert row.shape == "4×128" and row.like_for_like


def test_unpaired_rows_use_welch(root):
  """A baseline with a seed that did not finish: index i is no longer seed i, so Welch."""
  base = [1.1, 1.3]
  make_experiment(root, "welch", [arm_row("base", base, total=3), arm_row("method", METHOD)],
                  headline=HEADLINE)
  row = rows_by_experiment(scoreboard.build())["welch"]
  va, vb = _var(METHOD) / 3, _var(base) / 2  # 0.01 / 3, 0.02 / 2
  df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
  assert df == pytest.approx(1.6842, abs=1e-4)
  half = verdict.t_quantile(0.95, df) * math.sqrt(va + vb)
  assert not row.interval.paired and row.seeds == "3 vs 2, Welch"
  assert row.interval.df == pytest.approx(df)
  assert row.interval.delta == pytest.approx(_mean(METHOD) - 1.2)
  assert (row.interval.low, row.interval.high) == pytest.approx((row.interval.delta - half,
                                                                 row.interval.delta + half))


def test_t_quantile_matches_the_tables():
  for df, t in T975.items():
    assert verdict.t_quantile(0.95, df) == pytest.approx(t, abs=1e-6)
  assert verdict.t_quantile(0.95, 1e6) == pytest.approx(1.959966, abs=1e-5)
  assert verdict.t_quantile(0.90, 5) == pytest.approx(2.015048, abs=1e-6)


def test_interval_edge_cases():
  one = verdict.interval([1.0], [2.0], paired=True)
  assert one.delta == -1.0 and math.isnan(one.low) and math.isnan(one.high)
  flat = verdict.interval([1.0, 1.0], [2.0, 2.0], paired=True)
  assert (flat.low, flat.high) == (-1.0, -1.0)
  with pytest.raises(ValueError):
    verdict.interval([1.0, 2.0], [1.0], paired=True)


def test_rows_are_sorted_by_loss_and_by_loss_per_flops(root):
  # (Δ loss, Δ FLOPs): a -0.02 at +10%, b -0.005 at no extra FLOPs, c -0.03 at +50%
  for name, delta, flops in (("a", -0.02, 1.1), ("b", -0.005, 1.0), ("c", -0.03, 1.5)):
    make_experiment(root, name, [arm_row("base", BASE, flops=1000),
                                 arm_row("method", [v + delta for v in BASE], flops=1000 * flops)],
                    headline=HEADLINE)
  board = scoreboard.build()
  assert [r.experiment for r in scoreboard.by_loss(board.rows)] == ["c", "a", "b"]
  # b: no extra compute, first; then a (-0.02 per +10%) before c (-0.006 per +10%)
  assert [r.experiment for r in scoreboard.by_loss_per_flops(board.rows)] == ["b", "a", "c"]
  md = scoreboard.markdown(board)
  by_loss, by_flops = md.split("## Sorted by Δ loss per Δ FLOPs")
  assert by_loss.index("| c |") < by_loss.index("| a |") < by_loss.index("| b |")
  assert by_flops.index("| b |") < by_flops.index("| a |") < by_flops.index("| c |")
  assert "no extra FLOPs" in by_flops and "-0.0200" in by_flops and "-0.0060" in by_flops


def test_a_baseline_off_the_common_setting_is_flagged(root):
  rows = [arm_row("base", BASE), arm_row("method", METHOD)]
  make_experiment(root, "deep", rows, headline=HEADLINE,
                  config="  m.num_layers, m.d_model = 16, 64\n  m.init_std = 0.02\n")
  make_experiment(root, "common", rows, headline=HEADLINE)
  board = scoreboard.build()
  deep, common = rows_by_experiment(board)["deep"], rows_by_experiment(board)["common"]
  assert not deep.like_for_like and deep.shape == "16×64"
  assert set(deep.differs) == {"shape", "init"}
  assert "layers 16" in deep.setting and "init std 0.02" in deep.setting
  assert common.like_for_like
  md = scoreboard.markdown(board)
  line = next(l for l in md.splitlines() if l.startswith("| 1 | deep") or "| deep |" in l)
  assert "not like-for-like" in line and "layers 16, width 64" in line
  assert "| like-for-like |" in next(l for l in md.splitlines() if "| common |" in l)
  assert "1 are like-for-like" in md


def test_an_arm_that_differs_from_its_baseline_beyond_the_table_is_flagged(root):
  make_experiment(root, "lr", [arm_row("base", BASE),
                               arm_row("method", METHOD, overrides={"train.lr": 0.01})],
                  headline=HEADLINE)
  row = rows_by_experiment(scoreboard.build())["lr"]
  assert row.setting == ["arm's lr 0.01"]


def test_verdict_comes_from_the_report_or_the_rule(root):
  rows = [arm_row("base", BASE), arm_row("method", METHOD, verdict_word="reproduced"),
          arm_row("other", [v + 0.5 for v in BASE])]
  make_experiment(root, "stored", rows, headline=HEADLINE)  # the report's word, as it is
  make_experiment(root, "claimed", [rows[0], arm_row("method", METHOD)], headline=HEADLINE,
                  claims={"method": "higher"})  # no stored word: the rule on the claim
  make_experiment(root, "vs_other", rows, headline=(
      "(Headline('main', 'method', baseline='other', claim='lower'), "
      "Headline('main', 'base', baseline='other'))"))
  make_experiment(root, "unfair", rows, headline=HEADLINE, superseded=True)
  board = scoreboard.build()
  by = {(r.experiment, r.arm): r.verdict for r in board.rows}
  assert by["stored", "method"] == "reproduced"
  assert by["claimed", "method"] == verdict.verdict(verdict.compare(METHOD, BASE), "higher")
  assert by["vs_other", "method"] == "reproduced"  # 0.5 lower on every seed
  assert by["vs_other", "base"] == scoreboard.NO_CLAIM
  assert by["unfair", "method"] == scoreboard.SUPERSEDED


def test_a_new_experiment_appears_with_no_code_change(root):
  make_experiment(root, "first", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  assert [r.experiment for r in scoreboard.build().rows] == ["first"]
  make_experiment(root, "second", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  make_experiment(root, "pending", None, headline=HEADLINE)  # declared, no results yet
  make_experiment(root, "undeclared", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline="()")
  board = scoreboard.build()
  assert sorted(r.experiment for r in board.rows) == ["first", "pending", "second"]
  assert board.without == ["undeclared"]
  md = scoreboard.markdown(board)
  assert "## Declared, not yet measured" in md and "- pending: method (main)" in md


def test_a_headline_must_name_two_arms_of_its_group():
  arms = {"main": [experiments.Arm("base"), experiments.Arm("method")]}
  with pytest.raises(experiments.ExperimentError, match="missing"):
    experiments.Sweep(groups=arms, headline=(experiments.Headline("main", "missing"),))
  with pytest.raises(experiments.ExperimentError, match="base"):
    experiments.Sweep(groups=arms, headline=(experiments.Headline("main", "base"),))


def test_write_makes_the_markdown_and_the_png(root, tmp_path):
  make_experiment(root, "one", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  md, png = scoreboard.write(out_dir=tmp_path / "out")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = md.read_text()
  assert "The common scoreboard setting" in text and scoreboard.COMMON_ARG in text
  assert "4 blocks × width 128" in text and "init std 1/√(2.5d)" in text and "0.95" in text


def test_no_results_and_no_declarations_are_clear_errors(root):
  with pytest.raises(scoreboard.ScoreboardError, match="no committed results"):
    scoreboard.build()
  make_experiment(root, "undeclared", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline="()")
  with pytest.raises(scoreboard.ScoreboardError, match="declares a headline"):
    scoreboard.build()


def test_an_unreadable_experiment_is_reported_not_fatal(root, capsys):
  make_experiment(root, "good", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  make_experiment(root, "broken", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  (root / "broken" / "sweep.py").write_text("raise RuntimeError('broken sweep')\n")
  assert cli.main(["scoreboard"]) == 0
  out, err = capsys.readouterr()
  assert "SCOREBOARD.md" in out and "broken: RuntimeError: broken sweep" in err
  assert "broken sweep" in (root / "SCOREBOARD.md").read_text()


def test_cli_scoreboard_errors_in_one_line(root, capsys):
  assert cli.main(["scoreboard"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("research: error: no committed results") and "\n" not in err


def test_report_regenerates_the_scoreboard_and_survives_its_failure(root, capsys, monkeypatch):
  from research import report  # pylint: disable=import-outside-toplevel
  make_experiment(root, "one", [arm_row("base", BASE), arm_row("method", METHOD)],
                  headline=HEADLINE)
  monkeypatch.setattr(report, "report", lambda name, runs, out, groups=None: Path(out) / "x.md")
  assert cli.main(["report", "one", "--runs_dir", str(root)]) == 0
  assert (root / "SCOREBOARD.md").is_file() and (root / "scoreboard.png").is_file()
  assert "SCOREBOARD.md" in capsys.readouterr().out
  (root / "SCOREBOARD.md").unlink()
  assert cli.main(["report", "one", "--out", str(root / "elsewhere")]) == 0  # not committed
  assert not (root / "SCOREBOARD.md").exists()

  def fail():
    raise RuntimeError("boom")
  monkeypatch.setattr(scoreboard, "build", fail)
  assert cli.main(["report", "one"]) == 0  # the report stands
  assert "scoreboard was not regenerated (RuntimeError: boom)" in capsys.readouterr().err


def test_the_committed_results_make_a_scoreboard(tmp_path):
  """Over this repository's experiments: every experiment that declares a headline has a row,
  and one with results has a measured one."""
  board = scoreboard.build()
  md, png = scoreboard.write(board, tmp_path)
  assert md.is_file() and png.is_file() and not board.problems
  root = experiments.experiments_dir()
  for name in experiments.list_experiments():
    if experiments.get_sweep(name).headline:
      rows = [r for r in board.rows if r.experiment == name]
      assert rows, name
      if (root / name / "results" / "results.json").is_file():
        assert any(r.measured for r in rows), name
  assert "| 1 |" in md.read_text()
