"""The derived `common` sweep group (research/scoreboard.py `common_group`): every experiment's
headline arms and baselines at the common scoreboard setting. Over this repository's
experiments: the arms' configs are the common setting's outside what their tables vary, the
architecture is each experiment's, the dense baselines are the common dense baseline itself
and are reused from the committed rows; on synthetic experiments: the rules (the method's keys,
the FFN width, a key the method needs), the scoreboard's preference for a measured common row,
the section of rows not yet there; and `research sweep NAME --group common` at the smoke
scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from research import config as config_lib
from research import experiments, run_config, scoreboard
from research import sweep as sweep_lib
from research.errors import ConfigError
from research.train.workdir import config_differences

COMMON = experiments.COMMON_GROUP
NAMES = [n for n in experiments.list_experiments()
         if experiments.get_sweep(n, common=False).headline]
KINDS = {key: kind for _, key, kind in scoreboard.SETTING}
FORCED = [key for key, kind in KINDS.items() if kind in scoreboard.COMMON_KINDS]
MODEL = [key for key, kind in KINDS.items() if kind == "model"]
# diagnostics a dense baseline may log beyond the common setting's (they change no number)
DIAGNOSTICS = ("train.log_layer_grad_norms", "eval.evaluators")


def resolved(name: str, arg: str, overrides: dict) -> dict:
  return run_config.resolve(experiments.get_config(f"{name}:{arg}", overrides)).to_dict()


def own_arms(sweep) -> dict[str, tuple[str, experiments.Arm]]:
  """Common arm name -> (its own group, its arm there)."""
  out = {}
  for h in sweep.headline:
    for arm in sweep.groups[h.group]:
      out.setdefault(arm.name, (h.group, arm))
  return out


def test_every_headline_experiment_has_a_common_group():
  assert len(NAMES) >= 18
  for name in NAMES:
    sweep = experiments.get_sweep(name)
    assert COMMON in sweep.groups and not sweep.unavailable, name
    assert sweep.arg_of(COMMON) == scoreboard.COMMON_ARG
    arms = {a.name for a in sweep.groups[COMMON]}
    for h in sweep.headline:  # the names the scoreboard matches
      assert {h.arm, h.baseline or sweep.reference(h.group)} <= arms, name
    assert sweep.references[COMMON] in arms


@pytest.mark.parametrize("name", NAMES)
def test_common_arms_are_at_the_common_setting(name):
  """Every shape / init / run key of every arm is the common setting's, outside what the
  arm's group varies and the run keys the group keeps (each because the common value does not
  build); every architecture key is its own arm's, the FFN width by the width rule."""
  sweep = experiments.get_sweep(name)
  _, _, kept = scoreboard.common_group(name, experiments.get_sweep(name, common=False))
  assert set(kept) <= {k for k in FORCED if KINDS[k] == "run"}
  common = scoreboard.common_config().to_dict()
  target = {k: config_lib.get_dotted(common, k) for k in FORCED + MODEL}
  carg = sweep.arg_of(COMMON)
  for arm in sweep.groups[COMMON]:
    group, own_arm = own_arms(sweep)[arm.name]
    varies = sweep.varies.get(group, ())
    mine = resolved(name, carg, arm.overrides)
    own = resolved(name, sweep.arg, own_arm.overrides)
    for key in FORCED:
      value = config_lib.get_dotted(mine, key)
      if key in varies and key in own_arm.overrides:  # the method
        assert value == config_lib.get_dotted(own, key), (name, arm.name, key)
      elif key in kept:
        assert value == config_lib.get_dotted(own, key), (name, arm.name, key)
        with pytest.raises(ConfigError):  # kept because the common value does not build
          resolved(name, carg, {**arm.overrides, key: target[key]})
      else:
        assert value == target[key], (name, arm.name, key, value, target[key])
    for key in MODEL:
      if key != scoreboard.FFN_WIDTH:
        assert config_lib.get_dotted(mine, key) == config_lib.get_dotted(own, key), (
            name, arm.name, key)
    ffn, own_ffn = (config_lib.get_dotted(c, scoreboard.FFN_WIDTH) for c in (mine, own))
    width, own_width = mine["model"]["d_model"], own["model"]["d_model"]
    if width == own_width:
      assert ffn == own_ffn, (name, arm.name)
    elif scoreboard.FFN_WIDTH in own_arm.overrides:
      assert ffn == pytest.approx(own_ffn * width / own_width, abs=4)
    else:  # a width the experiment derived or set at its own shape: the common shape's
      assert ffn == config_lib.get_dotted(
          resolved(name, carg, {**arm.overrides, scoreboard.FFN_WIDTH: 0}), scoreboard.FFN_WIDTH)
    # the arm's own overrides are kept where they are not the setting's
    for key, value in own_arm.overrides.items():
      if key not in FORCED or (key in varies) or key in kept:
        if key != scoreboard.FFN_WIDTH or width == own_width:
          assert arm.overrides[key] == value, (name, arm.name, key)


def test_the_rules_on_the_experiments_that_exercise_them():
  """The shape and the FFN width of the 16 x 64 tables, the architecture kept, a depth the
  table varies through another arm, the method's optimizer, matched FFN widths, and the steps
  SPARKLING's expansion needs."""
  def common_arm(name, arm):
    return next(a for a in experiments.get_sweep(name).groups[COMMON] if a.name == arm)
  # 16 x 64 -> 4 x 128; the FFN width is derived from the width (192 -> 352)
  for name, arm in (("hyper_connections", "dhc4"), ("frac_connections", "dfc4"),
                    ("virtual_width", "vwn4")):
    c = resolved(name, scoreboard.COMMON_ARG, common_arm(name, arm).overrides)
    assert (c["model"]["num_layers"], c["model"]["d_model"]) == (4, 128)
    assert c["model"]["channel"]["d_ff"] == 352
  assert not resolved("virtual_width", scoreboard.COMMON_ARG,
                      common_arm("virtual_width", "pre").overrides)["model"]["head"][
                          "tie_embeddings"]  # the paper's untied head: architecture, kept
  # MoDA: its table varies the depth through another arm (13 blocks): ffn_kv takes 4 blocks
  moda = resolved("moda", scoreboard.COMMON_ARG, common_arm("moda", "ffn_kv").overrides)
  assert (moda["model"]["num_layers"], moda["model"]["num_kv_heads"]) == (4, 4)
  assert moda["model"]["attention"]["kind"] == "moda"
  # the low-bit optimizer's settings are the method, β2 0.999 included (swamping needs β2
  # near 1), for its fp32 AdamW reference too
  solo = resolved("lowbit_optimizer", scoreboard.COMMON_ARG,
                  common_arm("lowbit_optimizer", "solo_4_2").overrides)["train"]
  assert (solo["optimizer"], solo["b1"], solo["b2"]) == ("lowbit_adamw", 0.8, 0.999)
  assert solo["lowbit"]["v_grid"] == "qema"
  fp32 = resolved("lowbit_optimizer", scoreboard.COMMON_ARG,
                  common_arm("lowbit_optimizer", "adamw_fp32").overrides)["train"]
  assert (fp32["optimizer"], fp32["b1"], fp32["b2"]) == ("adamw", 0.9, 0.999)
  # parameter matching at the common shape: the recurrent arms keep their matched FFN width
  for name, arm in (("retnet", "retnet"), ("gla", "gla"), ("deltaproduct", "dp2")):
    own = next(a for a in experiments.get_sweep(name).groups[
        next(h.group for h in experiments.get_sweep(name).headline)] if a.name == arm)
    assert common_arm(name, arm).overrides[scoreboard.FFN_WIDTH] == own.overrides[
        scoreboard.FFN_WIDTH]
  # SPARKLING expands at step 2000: its group keeps its 4000 steps, and says why
  _, arms, kept = scoreboard.common_group("sparkling", experiments.get_sweep("sparkling",
                                                                            common=False))
  assert list(kept) == ["train.steps"] and "train.expand.step=2000" in kept["train.steps"]
  spark = resolved("sparkling", scoreboard.COMMON_ARG, arms[1].overrides)
  assert spark["train"]["steps"] == 4000 and spark["train"]["expand"]["step"] == 2000
  assert spark["model"]["init_std"] == 0.0 and spark["data"]["corpus"] == "tinyshakespeare"


def test_dense_baselines_are_the_common_dense_baseline():
  """A common baseline with the common architecture is the common dense baseline's config
  (the row polycom's `swiglu` reports), up to the diagnostics its experiment logs; where its
  experiment logs none, exactly. The committed rows report it (with the layer gradient norms
  too: sdd's `pre`), so it is not trained; the recurrent mixers' Transformer, which adds the
  extrapolation evaluator, is one config for all of them, trained once (the first of their
  common groups reports it)."""
  common = scoreboard.common_config().to_dict()
  reported = sweep_lib.ReportedRows(experiments.experiments_dir())
  dense, recurrent = {}, []
  for name in NAMES:
    sweep = experiments.get_sweep(name)
    base = next(a for a in sweep.groups[COMMON] if a.name == sweep.references[COMMON])
    c = resolved(name, sweep.arg_of(COMMON), base.overrides)
    if all(config_lib.get_dotted(c, k) == config_lib.get_dotted(common, k) for k in MODEL):
      dense[name] = sorted(set(config_differences(common, c)) | set(config_differences(c, common)))
      if name == "lowbit_optimizer":  # its fp32 AdamW reference keeps the method's β2 0.999
        assert dense[name] == ["train.b2"] and c["train"]["b2"] == 0.999, dense[name]
        continue
      assert all(k in DIAGNOSTICS for k in dense[name]), (name, dense[name])
      found = reported.find(experiments.get_config(f"{name}:{sweep.arg_of(COMMON)}",
                                                   base.overrides), sweep.seeds)
      if "eval.evaluators" in dense[name]:  # the recurrent mixers' Transformer: its own row,
        # reported (once one of them has run it) by a recurrent mixer's common group only
        assert found is None or found[0].split("/")[1] == COMMON, (name, found)
        recurrent.append(c)
      else:
        assert found is not None, name
  # the experiments whose own baselines were at 12 x 128, init 0.02, β2 0.99 or context 128
  for name in ("moda", "phd_transformer", "over_tokenized", "polycom", "ultramem"):
    assert dense[name] == [], name
  assert {"sdd", "hybridnorm", "hyper_connections", "frac_connections"} <= set(dense)
  assert len(recurrent) >= 3 and all(sweep_lib.same_config(recurrent[0], c) for c in recurrent)


def test_common_arg():
  assert scoreboard.common_arg("scale=tiny") == scoreboard.COMMON_ARG
  assert scoreboard.common_arg("scale=tiny,corpus=shakespeare,variant=dhc4") == (
      "scale=tiny,corpus=tinyshakespeare,variant=dhc4")
  assert scoreboard.common_arg("scale=tiny", "scale=smoke") == "scale=smoke,corpus=tinyshakespeare"
  smoke = scoreboard.common_config("scale=smoke,corpus=tinyshakespeare")
  assert (smoke.model.num_layers, smoke.model.d_model, smoke.train.steps) == (2, 32, 12)
  assert smoke.model.init_std == 0.0 and smoke.train.b2 == 0.95


# --------------------------------------------------------------------- synthetic experiments

ARG = "scale=tiny,corpus=tinyshakespeare"


def write_experiment(root: Path, name: str, *, config: str = "", arms: str,
                     varies: str = "{}", results: dict[str, list[dict]] | None = None):
  """experiments/<name>/ with a config.py (the common setting, then `config` lines), a sweep
  whose group "main" has `arms` (a Python list of Arm) and the headline main/method against
  the first arm, and a results.json holding `results` (`write_results`), if given."""
  d = root / name
  d.mkdir(parents=True)
  (d / "config.py").write_text(
      "from research.scales import SCALES, apply_common_setting, scaled_config  # noqa: F401\n"
      "CLAIM = 'a synthetic paper'\n\n\ndef get_config(arg=''):\n"
      f"  c = apply_common_setting(scaled_config(arg, {name!r})[0])\n  m = c.model\n{config}"
      "  return c\n")
  (d / "sweep.py").write_text(
      "from research.experiments import Arm, Headline, Sweep  # noqa: F401\n\n\n"
      f"def get_sweep():\n  return Sweep(groups={{'main': {arms}}}, arg={ARG!r}, "
      f"varies={varies}, headline=(Headline('main', 'method'),))\n")
  if results is not None:
    write_results(root, name, results)


def write_results(root: Path, name: str, results: dict[str, list[dict]], arg: str = ARG):
  """<root>/<name>/results/results.json holding `results`: group -> rows (`row`)."""
  d = root / name / "results"
  d.mkdir(parents=True, exist_ok=True)
  groups = [{"group": g, "arg": arg, "arms": rows} for g, rows in results.items()]
  (d / "results.json").write_text(json.dumps(
      {"experiment": name, "date": "2026-01-01", "groups": groups}))


def row(name: str, values: list[float], overrides: dict) -> dict:
  """A results.json row as `research report` writes it (what the scoreboard and the sweep's
  ReportedRows read)."""
  mean = sum(values) / len(values)
  std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
         if len(values) > 1 else None)
  return {"arm": name, "seeds_total": len(values), "seeds_finished": len(values),
          "valid_loss": {"mean": mean, "values": values, "std": std}, "params": 1e6,
          "params_activated": 1e6, "flops_per_token_fwd": 2e6, "step_time_s": 0.1,
          "diverged": 0, "overrides": {**overrides, "seed": 0}}


DEEP = "  if arg.startswith('scale=tiny'):\n    m.num_layers, m.d_model = 16, 64\n"
BASE, METHOD = [1.30, 1.32, 1.31], [1.25, 1.28, 1.26]  # own setting: -0.0467
C_BASE, C_METHOD = [1.20, 1.21, 1.22], [1.19, 1.20, 1.20]  # common setting: -0.0133


def test_the_rules_on_a_synthetic_experiment(root):
  """16 x 64 at init 0.02 with an FFN width set for it; the method sets a matched FFN width
  and a learning rate its table varies; the table varies the depth through another arm."""
  write_experiment(
      root, "deep", config=DEEP + "  m.init_std = 0.02\n  m.channel.d_ff = 128\n",
      arms="[Arm('base'), Arm('method', {'model.channel.d_ff': 96, 'train.lr': 2e-3}), "
           "Arm('deeper', {'model.num_layers': 20})]",
      varies="{'main': ('train.lr', 'model.num_layers')}")
  sweep = experiments.get_sweep("deep")
  arms = {a.name: a.overrides for a in sweep.groups[COMMON]}
  assert list(arms) == ["base", "method"]  # the headline's baseline and arm only
  base = resolved("deep", ARG, arms["base"])
  method = resolved("deep", ARG, arms["method"])
  for c in (base, method):
    assert (c["model"]["num_layers"], c["model"]["d_model"]) == (4, 128)  # depth not the method's
    assert c["model"]["init_std"] == 0.0
  assert base["model"]["channel"]["d_ff"] == 352  # the config's 128 (at width 64) reset
  assert method["model"]["channel"]["d_ff"] == 192  # the arm's 96 scaled with the width
  assert method["train"]["lr"] == 2e-3 and base["train"]["lr"] == 1e-3  # the method's lr


def test_a_group_that_cannot_be_built_says_why(root):
  """An FFN of 128 at width 64 that the method grows to 256: at width 128 the FFN is the
  common 352, which 256 does not grow, and no run key of the experiment's fixes it."""
  write_experiment(root, "odd", config=DEEP + "  m.channel.d_ff = 128\n",
                   arms="[Arm('base'), Arm('method', {'train.expand.step': 100, "
                        "'train.expand.d_ff': 256})]")
  sweep = experiments.get_sweep("odd")
  assert COMMON not in sweep.groups and "must exceed" in sweep.unavailable[COMMON]
  with pytest.raises(experiments.ExperimentError, match="cannot be built"):
    sweep.group(COMMON)
  assert sweep.group("main")[0] == "main"  # the experiment's own groups are unaffected


def test_the_scoreboard_prefers_a_measured_common_row(root):
  """`measured` has its common group in results.json: its row is that group's, like-for-like,
  with its own-setting Δ beside; `pending` (off the common setting, no common group yet) is
  listed with its command and runs; `already` (at the common setting) needs nothing."""
  def arms(norm):
    return f"[Arm('base'), Arm('method', {{'model.norm.kind': {norm!r}}}, claim='lower')]"

  def own(norm):
    return {"main": [row("base", BASE, {}), row("method", METHOD, {"model.norm.kind": norm})]}

  write_experiment(root, "measured", config=DEEP + "  m.init_std = 0.02\n", arms=arms("post"))
  common = {a.name: a.overrides for a in experiments.get_sweep("measured").groups[COMMON]}
  write_results(root, "measured", {**own("post"), COMMON: [
      row("base", C_BASE, common["base"]), row("method", C_METHOD, common["method"])]})
  write_experiment(root, "pending", config="  m.init_std = 0.02\n", arms=arms("pre_post"),
                   results=own("pre_post"))
  write_experiment(root, "already", arms=arms("hybridnorm"), results=own("hybridnorm"))
  board = scoreboard.build()
  rows = {r.experiment: r for r in board.rows}
  measured = rows["measured"]
  assert measured.at_common and measured.group == COMMON and measured.like_for_like
  assert measured.shape == "4×128" and measured.own.shape == "16×64"
  assert measured.interval.delta == pytest.approx(sum(C_METHOD) / 3 - sum(C_BASE) / 3)
  assert measured.own.interval.delta == pytest.approx(sum(METHOD) / 3 - sum(BASE) / 3)
  assert not measured.own.like_for_like and measured.todo is None
  pending, already = rows["pending"], rows["already"]
  assert not pending.at_common and not pending.like_for_like
  # its baseline at the common setting is `already`'s (and `measured`'s common) row: shown
  assert pending.todo.train == ["method"] and pending.todo.runs == 3
  assert pending.todo.reused == {"base": "already/main/base"}
  assert not already.at_common and already.like_for_like and already.todo is None
  md = scoreboard.markdown(board)
  line = next(l for l in md.splitlines() if "| measured |" in l)
  assert "method (common; own: main)" in line and "like-for-like (common group)" in line
  assert "-0.0467 [" in line and " at 16×64" in line  # the own-setting Δ, at its shape
  assert "-0.0133 [" in line
  assert "| — |" in next(l for l in md.splitlines() if "| pending |" in l)
  section = md.split("## Not yet at the common setting")[1].split("\n## ")[0]
  assert ("- pending: method (main) against base: `research sweep pending --group common "
          "--skip_reported`, then `research report pending`: 3 runs (method × 3 seeds); base is "
          "already/main/base's row" in section)
  assert "measured:" not in section and "already:" not in section
  assert "In all 3 runs." in section  # no config shared: no "when ... trains once" clause
  assert "1 rows are at the common setting as they stand" in md


# ------------------------------------------------------------------------ research sweep

SMOKE = "scale=smoke,corpus=tinyshakespeare"


def test_sweep_common_at_smoke_shows_committed_rows_of_other_experiments(tmp_path):
  """`research sweep hybridnorm --group common --arg scale=smoke --skip_reported`: the common
  group derived at the smoke scale; its pre-norm baseline is sdd's `pre` row and its two arms
  are its own table's rows (committed here at that argument): nothing is trained."""
  results = tmp_path / "results"

  write_results(results, "sdd", {"grid": [
      row("pre", [1.0], {"model.norm.kind": "pre", "model.linear.kind": "plain"})]}, SMOKE)
  write_results(results, "hybridnorm", {"table6": [
      row("hybridnorm", [1.0], {"model.norm.kind": "hybridnorm",
                                "model.init_out_scaling": "total_depth"}),
      row("hybridnorm_star", [1.0], {"model.norm.kind": "hybridnorm_star",
                                     "model.init_out_scaling": "total_depth"})]}, SMOKE)
  log = []
  path = sweep_lib.run_sweep("hybridnorm", group=COMMON, arg="scale=smoke", seeds=1,
                             runs_dir=tmp_path / "runs", skip_reported=True,
                             results_root=results, log=log.append)
  manifest = json.loads(path.read_text())
  assert manifest["group"] == COMMON and manifest["arg"] == SMOKE
  by_arm = {e["arm"]: e for e in manifest["arms"]}
  assert by_arm["pre"]["reported"] == "sdd/grid/pre"
  assert by_arm["hybridnorm"]["reported"] == "hybridnorm/table6/hybridnorm"
  assert {e["status"] for e in manifest["arms"]} == {"reported"}
  assert by_arm["pre"]["overrides"] == {"model.norm.kind": "pre",
                                        "model.init_out_scaling": "total_depth", "seed": 0}
  assert not (tmp_path / "runs" / "hybridnorm" / COMMON / "pre").exists()


@pytest.mark.needs_data
def test_sweep_common_trains_at_smoke(tmp_path):
  """One arm of MoDA's common group at the smoke scale: the common setting there (2 blocks,
  no grouped KV heads, init 1/sqrt(2.5 d), β2 0.95, Tiny Shakespeare), 12 steps."""
  path = sweep_lib.run_sweep("moda", group=COMMON, arg="scale=smoke", seeds=1, arms=["ffn_kv"],
                             runs_dir=tmp_path, log=lambda *_: None)
  entry = next(e for e in json.loads(path.read_text())["arms"] if e["arm"] == "ffn_kv")
  assert entry["status"] == "done"
  run = tmp_path / "moda" / COMMON / "ffn_kv" / "seed0"
  c = json.loads((run / "config.json").read_text())["config"]
  assert (c["model"]["num_layers"], c["model"]["num_kv_heads"], c["model"]["d_model"]) == (2, 2, 32)
  assert c["model"]["attention"]["kind"] == "moda" and c["model"]["init_std"] == 0.0
  assert c["train"]["b2"] == 0.95 and c["data"]["corpus"] == "tinyshakespeare"
  assert json.loads((run / "summary.json").read_text())["step"] == 12
