"""Tests for research/report.py on hand-written run directories (the file formats are the fixture)."""

import json
import math

import jax
import numpy as np
import pytest

from research import experiments
from research import report as rp

jax.config.update("jax_numpy_rank_promotion", "raise")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = list(range(0, 101, 10))
EVAL_STEPS = [50, 100]

# Final valid loss / bpb / tokens/s per (arm, seed) of the finished seeds.
FINAL = {
  ("lr=1e-3", 0): (1.90, 2.74, 1000.0),
  ("lr=1e-3", 1): (1.93, 2.78, 1100.0),
  ("lr=1e-3", 2): (1.95, 2.81, 1200.0),
  ("lr=3e-3", 0): (1.85, 2.67, 900.0),
  ("lr=3e-3", 1): (1.87, 2.70, 950.0),
}


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _train(step, loss):
  return {"split": "train", "step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5,
      "tokens_per_s": 1000.0, "mfu": 0.01, "time": step * 0.1, "aux/load_balance": 0.01}


def _make_run(workdir, final, diverged=False, resumed=False, finished=True):
  """Writes config.json, metrics.jsonl and (if finished) summary.json for one run."""
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({
    "experiment": "baseline", "arg": "scale=tiny", "overrides": {}, "config": {"train": {"lr": 1e-3}},
    "git_revision": "abc123", "packages": {"jax": "0.10.2"}}))
  valid_loss, bpb, tps = final
  records = []
  for step in STEPS if finished else STEPS[:4]:
    loss = math.nan if diverged and step >= 60 else valid_loss + 2.0 * (1 - step / 100)
    records.append(_train(step, loss))
    if step in EVAL_STEPS:
      v = valid_loss if step == 100 else valid_loss + 0.5
      records.append({"split": "valid", "step": step, "loss": math.nan if diverged and step >= 60 else v,
              "bpb": bpb})
  if resumed:  # Crashed after step 80, resumed from the step-50 checkpoint: steps 60-80 written twice.
    stale = [_train(s, 99.0) for s in (60, 70, 80)]
    cut = next(i for i, r in enumerate(records) if r["step"] == 60)
    records = records[:cut] + stale + records[cut:]
  _write_jsonl(workdir / "metrics.jsonl", records)
  if finished:
    (workdir / "summary.json").write_text(json.dumps({
      "step": 100, "valid_loss": math.nan if diverged else valid_loss, "valid_bpb": bpb,
      "train_loss": valid_loss, "tokens_per_s": tps, "wall_time_s": 10.0}))


@pytest.fixture
def runs_dir(tmp_path):
  """baseline/lr: lr=1e-3 (3 finished, one resumed), lr=3e-3 (2 finished, 1 diverged),
  lr=1e-2 (1 running, 2 pending). Workdirs mix absolute and manifest-relative paths."""
  root = tmp_path / "runs"
  sweep = root / "baseline" / "lr"
  arms = []
  for arm, paper in (("lr=1e-3", {"valid_loss": 1.88}), ("lr=3e-3", {"valid_loss": 1.84, "bpb": 2.6}),
            ("lr=1e-2", None)):
    for seed in range(3):
      rel = f"{arm}/seed{seed}"
      status = "done"
      if arm == "lr=3e-3" and seed == 2:
        _make_run(sweep / rel, (0.0, 0.0, 800.0), diverged=True)
      elif arm == "lr=1e-2":
        status = "running" if seed == 0 else "pending"
        if seed == 0:
          _make_run(sweep / rel, (2.0, 2.9, 500.0), finished=False)
      else:
        _make_run(sweep / rel, FINAL[(arm, seed)], resumed=(arm, seed) == ("lr=1e-3", 1))
      workdir = rel if seed % 2 else str(sweep / rel)
      arms.append({"arm": arm, "seed": seed, "workdir": workdir, "overrides": {"train.lr": float(arm[3:])},
             "paper": paper, "status": status})
  (sweep / "manifest.json").write_text(json.dumps(
    {"experiment": "baseline", "group": "lr", "arg": "scale=tiny", "arms": arms}))
  return root


def _table_row(md, arm):
  line = next(line for line in md.splitlines() if line.startswith(f"| {arm} |"))
  return [cell.strip() for cell in line.strip("|").split("|")]


def _header(md):
  line = next(line for line in md.splitlines() if line.startswith("| arm |"))
  return [cell.strip() for cell in line.strip("|").split("|")]


def test_read_run_keeps_last_line_per_step(runs_dir):
  run = rp.read_run(runs_dir / "baseline" / "lr" / "lr=1e-3" / "seed1")
  steps, loss = run.curve("train")
  np.testing.assert_array_equal(steps, STEPS)
  assert not np.any(loss == 99.0)  # The stale pre-crash lines were replaced.
  np.testing.assert_allclose(loss[STEPS.index(70)], 1.93 + 2.0 * 0.3)
  assert "aux/load_balance" in run.metrics["train"]
  np.testing.assert_array_equal(run.curve("valid")[0], EVAL_STEPS)
  assert run.summary["valid_loss"] == 1.93 and run.finished and not run.diverged
  assert run.config["arg"] == "scale=tiny"


def test_read_run_flags_divergence(runs_dir):
  run = rp.read_run(runs_dir / "baseline" / "lr" / "lr=3e-3" / "seed2")
  assert run.diverged and not run.finished


def test_report_table_and_json(runs_dir, tmp_path):
  out = tmp_path / "results"
  md_path = rp.report("baseline", runs_dir, out)
  assert md_path == out / "results.md"
  md = md_path.read_text()
  assert "research report baseline" in md and "scale=tiny" in md

  header = _header(md)
  assert header[:4] == ["arm", "seeds", "valid loss", "valid bpb"]
  assert "diverged" in header and "paper: valid_loss" in header and "paper: bpb" in header
  col = {name: i for i, name in enumerate(header)}

  row = _table_row(md, "lr=1e-3")
  losses = [FINAL[("lr=1e-3", s)][0] for s in range(3)]
  bpbs = [FINAL[("lr=1e-3", s)][1] for s in range(3)]
  assert row[col["seeds"]] == "3/3"
  assert row[col["valid loss"]] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
  assert row[col["valid bpb"]] == f"{np.mean(bpbs):.4f} ± {np.std(bpbs, ddof=1):.4f}"
  assert row[col["tokens/s"]] == "1,100"
  assert row[col["paper: valid_loss"]] == "1.88" and row[col["paper: bpb"]] == "–"

  row = _table_row(md, "lr=3e-3")
  losses = [FINAL[("lr=3e-3", s)][0] for s in range(2)]
  assert row[col["seeds"]] == "2/3"
  assert row[col["valid loss"]] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
  assert row[col["diverged"]] == "1/3 diverged"
  assert row[col["paper: bpb"]] == "2.6"

  row = _table_row(md, "lr=1e-2")
  assert row[col["seeds"]] == "0/3" and row[col["valid loss"]] == "running"

  # Arms keep manifest order.
  assert md.index("| lr=1e-3 |") < md.index("| lr=3e-3 |") < md.index("| lr=1e-2 |")

  results = json.loads((out / "results.json").read_text())
  arms = {a["arm"]: a for a in results["groups"][0]["arms"]}
  np.testing.assert_allclose(arms["lr=3e-3"]["valid_loss"]["mean"], np.mean(losses))
  np.testing.assert_allclose(arms["lr=3e-3"]["valid_loss"]["std"], np.std(losses, ddof=1))
  assert arms["lr=3e-3"]["diverged"] == 1 and arms["lr=1e-2"]["status"] == "running"
  assert arms["lr=1e-2"]["valid_loss"]["mean"] is None


def test_single_seed_shows_na(runs_dir, tmp_path):
  manifest_path = runs_dir / "baseline" / "lr" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest["arms"] = [a for a in manifest["arms"] if a["arm"] == "lr=1e-3" and a["seed"] == 0]
  manifest_path.write_text(json.dumps(manifest))
  md = rp.report("baseline", runs_dir, tmp_path / "out").read_text()
  header = _header(md)
  assert "diverged" not in header
  assert _table_row(md, "lr=1e-3")[header.index("valid loss")] == "1.9000 ± n/a"


def test_report_plots_are_pngs(runs_dir, tmp_path):
  out = tmp_path / "results"
  rp.report("baseline", runs_dir, out, groups=["lr"])
  for name in ("lr_curves.png", "lr_final.png"):
    data = (out / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_plot_run_default_path(runs_dir):
  workdir = runs_dir / "baseline" / "lr" / "lr=3e-3" / "seed2"  # Diverged: NaNs must not break it.
  path = rp.plot_run(workdir)
  assert path == workdir / "loss.png"
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_missing_sweep_raises(tmp_path):
  with pytest.raises(rp.ReportError, match=r"runs/nope.*research sweep nope"):
    rp.report("nope", tmp_path / "runs", tmp_path / "out")


def test_unknown_group_raises(runs_dir, tmp_path):
  with pytest.raises(rp.ReportError, match="width"):
    rp.report("baseline", runs_dir, tmp_path / "out", groups=["width"])


def test_report_keeps_results_whose_runs_are_gone(runs_dir, tmp_path):
  """Regenerating from a runs directory that lacks some arms (or whole groups) keeps their
  earlier numbers and curves, marked as carried over; arms with runs are recomputed."""
  out = tmp_path / "results"
  rp.report("baseline", runs_dir, out)
  first = json.loads((out / "results.json").read_text())
  first["groups"].append({**first["groups"][0], "group": "width"})  # a group run elsewhere
  (out / "results.json").write_text(json.dumps(first))

  sweep = runs_dir / "baseline" / "lr"
  for seed in range(3):  # the lr=3e-3 runs are gone (another machine, a cleaned disk)
    for f in (sweep / f"lr=3e-3/seed{seed}").iterdir():
      f.unlink()
  md = rp.report("baseline", runs_dir, out, groups=["lr"]).read_text()
  results = json.loads((out / "results.json").read_text())
  assert [g["group"] for g in results["groups"]] == ["lr", "width"]
  rows = {row["arm"]: row for row in results["groups"][0]["arms"]}
  old = {row["arm"]: row for row in first["groups"][0]["arms"]}
  assert rows["lr=3e-3"]["carried"] and not rows["lr=1e-3"].get("carried")
  assert rows["lr=3e-3"]["valid_loss"] == old["lr=3e-3"]["valid_loss"]
  assert rows["lr=3e-3"]["curves"] == old["lr=3e-3"]["curves"]  # still plotted
  assert rows["lr=1e-2"]["status"] == "running"  # nothing to carry: it never finished
  header = _header(md)
  assert _table_row(md, "lr=3e-3 *")[header.index("seeds")] == "2/3"
  assert "arms marked * are carried over" in md and "## width" in md

  def set_warmup(steps):
    manifest = json.loads((sweep / "manifest.json").read_text())
    for entry in manifest["arms"]:
      if entry["arm"] == "lr=3e-3":
        entry["overrides"]["train.warmup_steps"] = steps
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    return rp.report("baseline", runs_dir, out, groups=["lr"]).read_text()

  # An arm that now spells out a value its config already had is the same arm: still carried.
  default = experiments.get_config("baseline:scale=tiny").train.warmup_steps
  assert default != 0
  md = set_warmup(default)
  assert _table_row(md, "lr=3e-3 *")[header.index("seeds")] == "2/3"
  # An arm whose overrides changed since is not carried: its old numbers are another config's.
  md = set_warmup(0)
  assert _table_row(md, "lr=3e-3")[header.index("valid loss")] == "not run"


def test_curves_are_stored_in_results_json(runs_dir, tmp_path):
  out = tmp_path / "results"
  rp.report("baseline", runs_dir, out)
  rows = {row["arm"]: row for row in json.loads((out / "results.json").read_text())["groups"][0]["arms"]}
  valid = rows["lr=1e-3"]["curves"]["valid"]
  assert valid["step"] == EVAL_STEPS
  np.testing.assert_allclose(valid["mean"][-1], np.mean([FINAL[("lr=1e-3", s)][0] for s in range(3)]),
                             atol=1e-5)  # rounded to 5 decimals
  np.testing.assert_allclose(valid["min"][-1], 1.90)
  assert rows["lr=1e-2"]["curves"] is None
