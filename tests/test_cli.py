"""The `research` command end to end: run, sweep + report, list, data, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from research import cli


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(err: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("research: error: ")
  return lines[0]


@pytest.mark.needs_data
def test_run_smoke_writes_the_run(tmp_path, capsys):
  """`research run baseline:scale=smoke` on the 8-device mesh (data parallel)."""
  code, out, err = run(capsys, "run", "baseline:scale=smoke,corpus=tinyshakespeare", "--workdir", str(tmp_path),
                       "--config.train.progress=False")
  assert code == 0, err
  for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png"):
    assert (tmp_path / name).is_file(), name
  assert (tmp_path / "checkpoints" / "12").is_dir()
  record = json.loads((tmp_path / "config.json").read_text())
  assert record["experiment"] == "baseline" and record["arg"] == "scale=smoke,corpus=tinyshakespeare"
  assert record["config"]["model"]["vocab_size"] == 65
  assert record["git_revision"] and "jax" in record["packages"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if l["split"] == "train"]
  valid = [l for l in lines if l["split"] == "valid"]
  assert [l["step"] for l in train] == [1, 4, 8, 12]  # step 1, then every log_every
  assert [l["step"] for l in valid] == [6, 12]
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
    assert key in train[0]
  assert 0 < train[-1]["mfu"] < 1
  assert valid[-1]["bpb"] == pytest.approx(valid[-1]["loss"] / 0.6931471805599453, rel=1e-6)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["step"] == 12 and summary["valid_loss"] == valid[-1]["loss"]
  assert "data=8" in out  # 8-way data parallel
  assert "parameters" in out and "MFLOPs/token" in out


@pytest.mark.needs_data
def test_sweep_and_report(tmp_path, capsys):
  runs = tmp_path / "runs"
  args = ("sweep", "baseline", "--group", "lr", "--arg", "scale=smoke,corpus=tinyshakespeare", "--arms", "lr=3e-4,lr=1e-3",
          "--seeds", "2", "--runs_dir", str(runs), "--config.train.progress=False")
  code, out, err = run(capsys, *args)
  assert code == 0, err
  manifest = json.loads((runs / "baseline" / "lr" / "manifest.json").read_text())
  assert [(e["arm"], e["seed"], e["status"]) for e in manifest["arms"]] == [
      ("lr=3e-4", 0, "done"), ("lr=3e-4", 1, "done"), ("lr=1e-3", 0, "done"), ("lr=1e-3", 1, "done"),
      ("lr=3e-3", 0, "pending"), ("lr=3e-3", 1, "pending")]  # the whole group, the rest not run
  # a second invocation skips the finished runs
  code, out, _ = run(capsys, *args)
  assert code == 0 and out.count("finished, skipped") == 4
  out_dir = tmp_path / "results"
  code, out, err = run(capsys, "report", "baseline", "--runs_dir", str(runs), "--out", str(out_dir))
  assert code == 0, err
  table = (out_dir / "results.md").read_text()
  assert "lr=3e-4" in table and "lr=1e-3" in table and "2/2" in table
  assert "paper: valid_loss (nanoGPT)" in table
  for png in ("lr_curves.png", "lr_final.png"):
    assert (out_dir / png).stat().st_size > 5000


@pytest.mark.needs_data
def test_sweep_reuses_a_finished_twin_from_another_group(tmp_path, capsys):
  """MoDA's table3 baseline is table6's pre-norm baseline: trained once, listed in both."""
  runs = tmp_path / "runs"
  common = ("--arg", "scale=smoke,corpus=tinyshakespeare", "--seeds", "1", "--runs_dir", str(runs),
            "--config.train.progress=False")
  code, _, err = run(capsys, "sweep", "moda", "--group", "table6", "--arms", "pre_baseline", *common)
  assert code == 0, err
  interrupted = runs / "moda" / "table3" / "baseline" / "seed0"
  interrupted.mkdir(parents=True)  # an own run stopped before its first checkpoint
  code, out, err = run(capsys, "sweep", "moda", "--group", "table3", "--arms", "baseline,depth_kv",
                       *common)
  assert code == 0, err
  assert "baseline seed 0: same config as moda/table6/pre_baseline/seed0, reused" in out
  assert "interrupted run" in out and not any(interrupted.iterdir())  # the twin wins, not a resume
  manifest = json.loads((runs / "moda" / "table3" / "manifest.json").read_text())
  entries = {e["arm"]: e for e in manifest["arms"]}
  assert entries["baseline"]["reused"] == "moda/table6/pre_baseline/seed0"
  assert entries["baseline"]["status"] == entries["depth_kv"]["status"] == "done"
  assert (runs / "moda" / "table3" / "depth_kv" / "seed0" / "summary.json").is_file()  # no twin
  code, out, _ = run(capsys, "sweep", "moda", "--group", "table3", "--arms", "baseline", *common)
  assert code == 0 and "finished, skipped" in out  # the reuse is remembered
  out_dir = tmp_path / "results"
  code, _, err = run(capsys, "report", "moda", "--runs_dir", str(runs), "--out", str(out_dir))
  assert code == 0, err
  table3 = json.loads((out_dir / "results.json").read_text())["groups"][0]
  rows = {row["arm"]: row for row in table3["arms"]}
  assert table3["group"] == "table3" and rows["baseline"]["seeds_finished"] == 1


@pytest.mark.needs_data
def test_sweep_skips_arms_already_reported(tmp_path):
  """--skip_reported: arms that results.json holds with every seed are not trained again."""
  from research import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  arg = "scale=smoke,corpus=tinyshakespeare"
  results = tmp_path / "results"
  results.mkdir()
  row = {"arm": "lr=3e-4", "seeds_finished": 1, "diverged": 0, "date": "2026-01-02",
         "overrides": {"train.lr": 3e-4, "seed": 0}}
  (results / "results.json").write_text(json.dumps(
      {"experiment": "baseline", "date": "2026-01-02",
       "groups": [{"group": "lr", "arg": arg, "arms": [row]}]}))
  lines = []
  path = sweep_lib.run_sweep("baseline", group="lr", seeds=1, arg=arg, arms=["lr=3e-4", "lr=1e-3"],
                             runs_dir=tmp_path / "runs", overrides={"train.progress": False},
                             skip_reported=True, results_dir=results, log=lines.append)
  assert any("lr=3e-4: all 1 seeds reported" in line and "2026-01-02" in line for line in lines)
  assert not (tmp_path / "runs" / "baseline" / "lr" / "lr=3e-4").exists()
  assert (tmp_path / "runs" / "baseline" / "lr" / "lr=1e-3" / "seed0" / "summary.json").is_file()
  entries = {e["arm"]: e["status"] for e in json.loads(path.read_text())["arms"]}
  assert entries == {"lr=3e-4": "pending", "lr=3e-3": "pending", "lr=1e-3": "done"}


def test_sweep_and_report_use_a_reported_twin_from_another_experiment(tmp_path):
  """FC's hc_vs_fc table lists DHC x1, which HC's table1 already reports: not trained again,
  and the report shows HC's row, marked with where it was measured."""
  from research import experiments  # pylint: disable=import-outside-toplevel
  from research import report as report_lib  # pylint: disable=import-outside-toplevel
  from research import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  arg = "scale=smoke,corpus=tinyshakespeare"
  hyper = {"model.residual.kind": "hyper", "model.residual.dynamic": True,
           "model.residual.tanh": True, "model.init_std": 0.02}  # the init table1 pins
  stats = lambda v: {"mean": v, "std": None, "values": [v]}  # noqa: E731
  rows = [{"arm": f"dhc{n}", "seeds_total": 1, "seeds_finished": 1, "diverged": 0,
           "valid_loss": stats(loss), "valid_bpb": stats(loss / 0.693), "tokens_per_s": 1.0,
           "paper": {}, "curves": None, "date": "2026-01-02",
           "overrides": {**hyper, "model.residual.streams": n, "seed": 0}}
          for n, loss in ((8, 3.25), (1, 3.5))]  # dhc8 first: a row of another config
  root = tmp_path / "experiments"
  (root / "hyper_connections" / "results").mkdir(parents=True)
  (root / "hyper_connections" / "results" / "results.json").write_text(json.dumps(
      {"experiment": "hyper_connections", "date": "2026-01-02",
       "groups": [{"group": "table1", "arg": arg, "arms": rows}]}))
  runs, lines = tmp_path / "runs", []
  path = sweep_lib.run_sweep("frac_connections", group="hc_vs_fc", seeds=1, arg=arg, arms=["dhc1"],
                             runs_dir=runs, skip_reported=True, results_root=root,
                             log=lines.append)
  assert any("dhc1: same config as hyper_connections/table1/dhc1, reported" in l for l in lines)
  assert not (runs / "frac_connections" / "hc_vs_fc" / "dhc1").exists()
  entries = {e["arm"]: e for e in json.loads(path.read_text())["arms"]}
  assert entries["dhc1"]["status"] == "reported"
  assert entries["dhc1"]["reported"] == "hyper_connections/table1/dhc1"
  assert entries["dhc2"]["status"] == "pending" and "reported" not in entries["dhc2"]
  # a later invocation for other arms keeps the mark
  sweep_lib.run_sweep("frac_connections", group="hc_vs_fc", seeds=1, arg=arg, arms=["dhc2"],
                      runs_dir=runs, skip_reported=False, log=lambda _: None)
  entries = {e["arm"]: e for e in json.loads(path.read_text())["arms"]}
  assert entries["dhc1"]["reported"] == "hyper_connections/table1/dhc1"

  out = root / "frac_connections" / "results"
  md = report_lib.report("frac_connections", runs, out, results_root=root).read_text()
  row = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["groups"][0]["arms"]}
  assert row["dhc1"]["valid_loss"]["mean"] == 3.5 and row["dhc1"]["from"] == \
      "hyper_connections/table1/dhc1"
  assert row["dhc1"]["overrides"] == entries["dhc1"]["overrides"]  # its own, for later reports
  assert "| dhc1 † | 1/1 |" in md and "hyper_connections/table1/dhc1` (2026-01-02)" in md
  assert row["dhc2"]["seeds_finished"] == 1 and not row["dhc2"].get("carried")
  # a row shown for another names that one, not itself, as the source of the numbers
  config = experiments.get_config(f"frac_connections:{arg}", entries["dhc1"]["overrides"])
  assert sweep_lib.ReportedRows(root).find(config, 1, exclude=(
      "hyper_connections", "table1", "dhc1")) == ("hyper_connections/table1/dhc1", "2026-01-02")


def test_two_sweeps_of_one_group_keep_each_others_marks(tmp_path, monkeypatch):
  """Two chains on one group (one per core, disjoint arms): the one that started first and
  finishes last must not write back its stale copy of the other's entries (it erased the
  other's "reported" mark, and the report then showed that arm as not run)."""
  from research import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  arg = "scale=smoke,corpus=tinyshakespeare"
  hyper = {"model.residual.kind": "hyper", "model.residual.dynamic": True,
           "model.residual.tanh": True, "model.init_std": 0.02, "model.residual.streams": 1}
  row = {"arm": "dhc1", "seeds_total": 1, "seeds_finished": 1, "diverged": 0, "date": "2026-01-02",
         "overrides": {**hyper, "seed": 0}}  # HC's table1 reports FC's dhc1
  root = tmp_path / "experiments"
  (root / "hyper_connections" / "results").mkdir(parents=True)
  (root / "hyper_connections" / "results" / "results.json").write_text(json.dumps(
      {"experiment": "hyper_connections", "date": "2026-01-02",
       "groups": [{"group": "table1", "arg": arg, "arms": [row]}]}))
  runs, lines = tmp_path / "runs", []
  common = dict(group="hc_vs_fc", seeds=1, arg=arg, runs_dir=runs, log=lines.append)
  run, calls = sweep_lib.Trainer.run, []

  def second_chain_meanwhile(trainer):  # while the first chain trains dhc2
    if not calls:
      calls.append(1)
      sweep_lib.run_sweep("frac_connections", arms=["dhc1"], skip_reported=True,
                          results_root=root, **common)
    return run(trainer)

  monkeypatch.setattr(sweep_lib.Trainer, "run", second_chain_meanwhile)
  path = sweep_lib.run_sweep("frac_connections", arms=["dhc2"], **common)
  assert any("dhc1: same config as hyper_connections/table1/dhc1, reported" in l for l in lines)
  entries = {e["arm"]: e for e in json.loads(path.read_text())["arms"]}
  assert entries["dhc2"]["status"] == "done"
  assert entries["dhc1"]["status"] == "reported"
  assert entries["dhc1"]["reported"] == "hyper_connections/table1/dhc1"


def test_list_shows_experiments(capsys):
  code, out, _ = run(capsys, "list")
  assert code == 0
  assert "baseline" in out and "smoke" in out and "1.88" in out


def test_unknown_experiment(capsys):
  code, _, err = run(capsys, "run", "baselin:scale=smoke")
  assert code == 2
  assert "unknown experiment 'baselin'; did you mean baseline" in one_line_error(err)


def test_unknown_config_key(capsys):
  code, _, err = run(capsys, "run", "baseline:scale=smoke,corpus=tinyshakespeare", "--config.train.lrr=0.1")
  assert code == 2
  assert "unknown config key 'train.lrr'; did you mean train.lr" in one_line_error(err)


def test_unknown_experiment_argument(capsys):
  code, _, err = run(capsys, "run", "baseline:scale=smoke,sclae=tiny")
  assert code == 2
  assert "unknown experiment argument 'sclae'; did you mean scale?" in one_line_error(err)


def test_bad_value_type(capsys):
  code, _, err = run(capsys, "run", "baseline:scale=smoke,corpus=tinyshakespeare", "--config.train.steps=many")
  assert code == 2
  assert "config key 'train.steps' expects int" in one_line_error(err)


def test_mesh_that_does_not_divide_the_devices(capsys, tmp_path):
  code, _, err = run(capsys, "run", "baseline:scale=smoke,corpus=tinyshakespeare", "--workdir", str(tmp_path),
                     "--config.mesh.preset=fsdp_tp", "--config.mesh.tensor=3")
  assert code == 2
  assert "divisible by 3, but 8 devices are present" in one_line_error(err)


def test_missing_corpus(capsys, tmp_path):
  code, _, err = run(capsys, "run", "baseline:scale=smoke,corpus=tinyshakespeare", "--workdir", str(tmp_path / "w"),
                     "--data_dir", str(tmp_path / "nowhere"))
  assert code == 2
  line = one_line_error(err)
  assert "tinyshakespeare" in line and "RESEARCH_DATA_DIR" in line


def test_unknown_sweep_group_and_report_without_runs(capsys, tmp_path):
  code, _, err = run(capsys, "sweep", "baseline", "--group", "lrr", "--runs_dir", str(tmp_path))
  assert code == 2
  assert "unknown sweep group 'lrr'; did you mean lr?" in one_line_error(err)
  code, _, err = run(capsys, "report", "baseline", "--runs_dir", str(tmp_path), "--out",
                     str(tmp_path / "out"))
  assert code == 2
  assert "research sweep baseline" in one_line_error(err)


def test_data_list(capsys):
  code, out, _ = run(capsys, "data", "list")
  assert code == 0
  for name in ("tinyshakespeare", "wikitext2", "shakespeare"):
    assert name in out


@pytest.mark.needs_data
def test_layer_grad_norm_logging_is_observation_only(tmp_path, capsys):
  """train.log_layer_grad_norms adds metrics and changes no loss (bit-identical), so a run that
  logged them is the twin of one that did not; not the reverse (its report plots them)."""
  from research import sweep  # pylint: disable=import-outside-toplevel
  metrics, configs = {}, {}
  for on in (False, True):
    code, _, err = run(capsys, "run", "hybridnorm:scale=smoke", "--workdir", str(tmp_path / str(on)),
                       "--config.train.progress=False", "--config.train.steps=8",
                       "--config.train.log_every=2", f"--config.train.log_layer_grad_norms={on}")
    assert code == 0, err
    lines = [json.loads(l) for l in (tmp_path / str(on) / "metrics.jsonl").read_text().splitlines()]
    metrics[on] = lines
    configs[on] = json.loads((tmp_path / str(on) / "config.json").read_text())["config"]
  losses = {on: [(l["split"], l["step"], l["loss"]) for l in metrics[on]] for on in metrics}
  assert losses[True] == losses[False] and len(losses[True]) >= 5
  assert any(k.startswith("grad_norm/block_") for l in metrics[True] for k in l)
  assert not any(k.startswith("grad_norm/block_") for l in metrics[False] for k in l)
  assert sweep.same_config(configs[True], configs[False])
  assert not sweep.same_config(configs[False], configs[True])


def test_twin_configs_ignore_settings_of_unselected_components():
  """A dense-FFN run never reads model.channel.moe.*: two such runs differing only there are
  twins (UltraMemV2's dense arm is UltraMem's), while the same difference under an MoE, or a
  difference in the switch itself, is not."""
  from research import config as config_lib, sweep  # pylint: disable=import-outside-toplevel
  from research import run_config

  def resolved(overrides):
    c = run_config.default_config()
    config_lib.apply_overrides(c, overrides)
    return run_config.resolve(c).to_dict()

  moe = "model.channel.moe.num_experts"
  dense_a = resolved({moe: 8})
  dense_b = resolved({moe: 32, "data.synthetic.pairs": 8})
  assert sweep.same_config(dense_a, dense_b) and sweep.same_config(dense_b, dense_a)
  # a run stored before resolved configs dropped the unselected options' settings holds all of
  # them, with values of its own: still the twin
  old = run_config.default_config()
  old.update(dense_a)
  config_lib.apply_overrides(old, {moe: 64})
  assert sweep.same_config(old.to_dict(), dense_a)
  moe_a = resolved({"model.channel.kind": "moe", moe: 8})
  moe_b = resolved({"model.channel.kind": "moe", moe: 32})
  assert not sweep.same_config(moe_a, moe_b)
  assert not sweep.same_config(dense_a, moe_a)  # the switch differs
  assert not sweep.same_config(dense_a, resolved({"model.channel.d_ff": 64}))  # a setting it reads
  # the plain residual reads none of the multi-stream residuals' settings; a hyper one does
  plain_a = resolved({"model.residual.streams": 4, "model.residual.fracs": 4})
  plain_b = resolved({"model.residual.streams": 2, "model.residual.fracs": 2})
  assert sweep.same_config(plain_a, plain_b)
  hyper_a = resolved({"model.residual.kind": "hyper", "model.residual.streams": 4})
  hyper_b = resolved({"model.residual.kind": "hyper", "model.residual.streams": 2})
  assert not sweep.same_config(hyper_a, hyper_b)
  assert not sweep.same_config(plain_a, hyper_a)  # the switch differs
