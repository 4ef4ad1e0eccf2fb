"""Quantization-aware training (arXiv:2505.14302): group-wise AbsMax fake quantization by hand,
straight-through gradients, the FC2 site, W4A16 / W16A4, and the scaling-law fit tool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config as config_lib
from research import experiments
from research import run_config
from research.errors import ConfigError
from research.model.lm import DecoderLM
from research.model.linear import group_absmax_quantize


def model_config(**qat):
  c = run_config.default_config()
  c.model.vocab_size = 61
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 64, 4
  overrides = {"model.linear.kind": "qat", **{f"model.linear.qat.{k}": v for k, v in qat.items()}}
  config_lib.apply_overrides(c, overrides)
  return run_config.resolve(c).model


def test_group_absmax_by_hand():
  """4 bits, groups of 4: s = max|x| / 7 per group, codes round(x / s) clipped to [-8, 7]."""
  x = jnp.asarray([[0.7, -0.35, 0.1, 0.0, 7.0, 1.4, -2.0, 3.6]])
  got = np.asarray(group_absmax_quantize(x, 4, 4))
  s1, s2 = 0.7 / 7, 7.0 / 7
  want = [[7 * s1, round(-3.5) * s1, 1 * s1, 0.0, 7 * s2, 1 * s2, -2 * s2, 4 * s2]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # per token (group 0): one scale for the row; 16 bits: unchanged
  np.testing.assert_allclose(group_absmax_quantize(x, 4, 0), np.round(x / 1.0) * 1.0, atol=1e-6)
  np.testing.assert_array_equal(group_absmax_quantize(x, 16, 4), x)


def test_qat_linear_forward_and_straight_through_gradient():
  m = DecoderLM(model_config(w_bits=4, a_bits=4, group=16), rngs=nnx.Rngs(0))
  lin = m.blocks[0].attn.q
  x = jax.random.normal(jax.random.key(1), (2, 5, 64))
  w = lin.proj.kernel[...]
  want = group_absmax_quantize(x, 4, 16) @ group_absmax_quantize(w.T, 4, 16).T
  np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-5)
  # backward: the identity's gradient through both quantizers (straight-through)
  g = jax.grad(lambda x: jnp.sum(lin(x) * 1.0))(x)
  np.testing.assert_allclose(g, jnp.broadcast_to(group_absmax_quantize(w.T, 4, 16).T.sum(1),
                                                 x.shape), rtol=1e-5, atol=1e-5)


def test_fc2_reads_its_input_at_its_own_bits():
  m = DecoderLM(model_config(w_bits=4, a_bits=4, group=16, fc2_a_bits=8), rngs=nnx.Rngs(0))
  blk = m.blocks[0]
  assert blk.channel.down.a_bits == 8 and blk.channel.up.a_bits == 4
  assert blk.attn.o.a_bits == 4  # the attention output projection is not FC2
  w16a4 = DecoderLM(model_config(w_bits=16, a_bits=4), rngs=nnx.Rngs(0))
  lin = w16a4.blocks[0].attn.q
  x = jax.random.normal(jax.random.key(2), (3, 64))
  np.testing.assert_allclose(lin(x), group_absmax_quantize(x, 4, 32) @ lin.proj.kernel[...],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qat, match", [
    (dict(w_bits=1), "w_bits=1"), (dict(a_bits=17), "a_bits=17"), (dict(group=24), "divide"),
])
def test_qat_config_errors(qat, match):
  with pytest.raises(ConfigError, match=match):
    DecoderLM(model_config(**qat), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------ research fit

def _law_rows(noise=0.0, seed=0):
  """delta = 0.16 D^0.07 (log2 G)^0.78 / N^0.22 on a 4 x 4 x 3 grid (Table 1's W4A4 law)."""
  rng = np.random.default_rng(seed)
  rows = []
  for n in (0.4e6, 0.8e6, 1.6e6, 3.2e6):
    for d in (1.25e6, 2.5e6, 5e6, 10e6):
      for g in (16, 32, 64):
        delta = 0.16 * d ** 0.07 * np.log2(g) ** 0.78 / n ** 0.22
        rows.append({"N": n, "D": d, "G": g, "delta": delta * np.exp(rng.normal(0, noise))})
  return rows


def test_fit_recovers_the_law_and_predicts_the_held_out_corner():
  from research import fit
  exact = fit.fit(_law_rows(), "delta", ["N", "D", "log2:G"], holdout="N=max,D=max",
                  bootstrap=200)
  assert exact.coef["N"] == pytest.approx(-0.22) and exact.coef["D"] == pytest.approx(0.07)
  assert exact.coef["log2(G)"] == pytest.approx(0.78)
  assert exact.coef["log_k"] == pytest.approx(np.log(0.16))
  assert exact.holdout["rows"] == 3 and exact.holdout["mean_abs_rel_error"] < 1e-9
  noisy = fit.fit(_law_rows(noise=0.05), "delta", ["N", "D", "log2:G"], bootstrap=500)
  lo, hi = noisy.interval["N"]
  assert lo < -0.22 < hi and hi - lo < 0.2
  rows = _law_rows()
  rows[0]["delta"] = -0.01  # a seed-noise negative delta cannot enter the log fit
  assert fit.fit(rows, "delta", ["N", "D", "log2:G"], bootstrap=10).dropped == 1


def test_research_fit_command(tmp_path, capsys):
  import csv
  from research import cli
  path = tmp_path / "grid.csv"
  other = [dict(r, delta=2 * r["delta"] * r["D"] ** 0.1, precision="B") for r in _law_rows()]
  with path.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["N", "D", "G", "delta", "precision"])
    w.writeheader()
    w.writerows([dict(r, precision="A") for r in _law_rows()] + other)
  assert cli.main(["fit", str(path), "--target", "delta", "--terms", "N,D,log2:G",
                   "--holdout", "N=max,D=max", "--bootstrap", "50", "--where", "precision=A",
                   "--out", str(tmp_path / "fit.json")]) == 0
  out = capsys.readouterr().out
  assert "N^-0.2200" in out and "D^+0.0700" in out and "held out N=max,D=max: 3 rows" in out
  assert (tmp_path / "fit.json").is_file()
  assert cli.main(["fit", str(path), "--target", "delta", "--terms", "N,D",
                   "--bootstrap", "0", "--where", "precision=B, G = 32"]) == 0
  out = capsys.readouterr().out  # the other law (D^0.17), on its G = 32 rows alone
  assert "D^+0.1700" in out and "16 rows" in out
  assert cli.main(["fit", str(path), "--target", "delta", "--terms", "P"]) == 2
  assert "no column 'P'" in capsys.readouterr().err
  assert cli.main(["fit", str(path), "--target", "delta", "--terms", "N",
                   "--where", "precision=C"]) == 2
  assert "matches no row" in capsys.readouterr().err
  assert cli.main(["fit", str(path), "--target", "delta", "--terms", "N,D,log2:G",
                   "--where", "G=32"]) == 2  # G constant: its exponent and k are one
  assert "term log2(G) is the same in every row" in capsys.readouterr().err


def test_qat_scaling_analysis_pairs_runs_and_fits(tmp_path):
  """analysis.py on a report's groups: delta = QAT loss - fp32 loss per cell, the law's fit,
  the decomposition table and the CSV that `research fit` reads."""
  from research import fit  # pylint: disable=import-outside-toplevel
  analysis = experiments._load_module("qat_scaling", "analysis.py")  # pylint: disable=protected-access
  sweep = experiments.get_sweep("qat_scaling")
  groups = []
  for name, arms in sweep.groups.items():
    rows = []
    for arm in arms:
      m = analysis.NAME.match(arm.name)
      d, tokens, g = int(m["d"]), float(m["D"]) * 1e6, int(m["g"] or 32)
      loss = 2.0 - 0.1 * np.log(d) - 0.02 * np.log(tokens)
      if m["prec"] != "fp32":
        loss += 0.16 * tokens ** 0.07 * np.log2(g) ** 0.78 / (d * d * 4 * 12) ** 0.22
      rows.append({"arm": arm.name, "valid_loss": {"values": [float(loss)]},
                   "overrides": arm.overrides})
    groups.append({"group": name, "arg": sweep.arg, "arms": rows})
  md = analysis.analyze("qat_scaling", None, groups, tmp_path)
  assert "| W4A4 | -" not in md and "### Decomposition at G = 32" in md
  table = fit.load_table(tmp_path / "qat_deltas.csv")  # the grid alone
  assert len([r for r in table if r["precision"] == "W4A4"]) == 36
  extra = fit.load_table(tmp_path / "qat_deltas_extra.csv")  # seed-noise and long runs
  assert sorted((r["group"], r["precision"]) for r in extra) == [
      ("long", "W4A4")] * 2 + [("seeds", "W4A4")] * 2
  long = md[md.index("### Long runs"):].splitlines()
  assert sum(line.endswith("| grid |") for line in long) == 3
  assert sum(line.endswith("| long |") for line in long) == 2
  for line in (x for x in long if x.endswith("| long |")):  # the grid's law extrapolates
    delta, predicted = (float(v) for v in line.split(" | ")[4:6])
    assert predicted == pytest.approx(delta, rel=0.1)
  w4a4 = [r for r in table if r["precision"] == "W4A4" and r["seed"] == "0"]
  f = fit.fit(w4a4, "delta", ["N", "D", "log2:G"], bootstrap=100)
  assert f.coef["D"] == pytest.approx(0.07, abs=0.01) and f.coef["log2(G)"] == pytest.approx(0.78, abs=0.01)
  assert f.coef["N"] < 0  # delta falls with size


def test_qat_scaling_decomposition_by_hand():
  """The G = 32 decomposition: ratio = W4A4 / (W4A16 + W16A4), R = W16A4 / W4A16 only where
  W4A16's delta is positive, the activations' share and the FC2 fix, summarized over cells."""
  analysis = experiments._load_module("qat_scaling", "analysis.py")  # pylint: disable=protected-access
  cells = {(64, 1e6): (0.03, 0.01, 0.02, 0.015), (64, 4e6): (0.04, -0.002, 0.03, None),
           (128, 1e6): (0.02, 0.005, 0.02, 0.01), (128, 4e6): (0.02, 0.02, 0.015, 0.025)}
  rows = []
  for (d, tokens), deltas in cells.items():
    for prec, delta in zip(("W4A4", "W4A16", "W16A4", "W4A4 FC2 8-bit"), deltas):
      if delta is not None:
        rows.append({"precision": prec, "G": 32, "d": d, "N": d * 1000, "D": tokens,
                     "delta": delta})
  md = analysis._decomposition(rows)  # pylint: disable=protected-access
  table = {tuple(line.split(" | ")[:2]): line.strip("| ").split(" | ")
           for line in md.splitlines() if line.startswith("| 64 ") or line.startswith("| 128 ")}
  first = table[("| 64", "1M")]
  assert first[6:] == ["1.00", "2.00", "0.67", "+0.0150", "0.50"]
  second = table[("| 64", "4M")]  # W4A16 <= 0: no R; no FC2 run: no fix
  assert second[6:] == ["1.43", "–", "0.75", "–", "–"]
  assert "defined in 3 of 4 cells" in md and "> 1 in 2 of them" in md
  # R: 2.0 at D/N 15.6, 4.0 at 7.8, 0.75 at 31.2: it falls as D/N grows, rank correlation -1
  assert "Spearman rank correlation of R with D/N over the 3 defined cells: -1.00" in md
  assert ("lowers W4A4's delta in 2 of 3 cells, by a mean 25% (range -25% to 50%"
          in md)  # cuts 1 - 0.5, 1 - 0.5, 1 - 1.25


def test_qat_scaling_fit_without_its_corner_when_the_corner_is_dropped():
  """W4A16's delta can be <= 0 at the held-out corner (seed noise): the fit goes on without
  holding it out and says why."""
  analysis = experiments._load_module("qat_scaling", "analysis.py")  # pylint: disable=protected-access
  rows = [{"N": n, "D": d, "delta": 0.01 * (d / 1e6) ** 0.3 / (n / 1e5) ** 0.2}
          for n in (1e5, 2e5, 4e5) for d in (1e6, 2e6, 4e6)]
  rows[-1]["delta"] = -0.001  # N = max, D = max
  line = analysis._fit_line("W4A16 (G = 32)", "W4A16", rows, ["N", "D"])  # pylint: disable=protected-access
  assert "8 (1 ≤ 0 dropped)" in line and "the corner's delta ≤ 0" in line
  assert "+0.200 [" in line and "+0.300 [" in line  # g_N, g_D of the 8 noiseless rows


def test_seed_noise_arms_train_their_own_seeds():
  """qat_scaling's `seeds` group names seeds 1 and 2 in its arms: the sweep trains those, not
  seed 0 again (it did: the index replaced the arm's seed, and the fp32 arms were reused as
  twins of the grid's seed-0 cell), and a plain group's seeds are 0, 1, 2."""
  from research import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  sweep = experiments.get_sweep("qat_scaling")
  entries = sweep_lib.new_entries(sweep.groups["seeds"], 1, None)
  assert [(e["arm"], e["overrides"]["seed"]) for e in entries] == [
      ("fp32_d128_D4M_s1", 1), ("w4a4_g32_d128_D4M_s1", 1),
      ("fp32_d128_D4M_s2", 2), ("w4a4_g32_d128_D4M_s2", 2)]
  cell = next(a for a in sweep.groups["fp32"] if a.name == "fp32_d128_D4M")
  grid = sweep_lib.new_entries([cell], 1, None)[0]["overrides"]
  assert grid["seed"] == 0
  assert experiments.get_config("qat_scaling:scale=tiny", entries[0]["overrides"]).seed == 1
  assert {k: v for k, v in entries[0]["overrides"].items() if k != "seed"} == \
      {k: v for k, v in grid.items() if k != "seed"}  # otherwise the same run as the grid's
  plain = experiments.get_sweep("baseline")
  group = plain.groups[plain.default_group]
  assert [e["overrides"]["seed"] for e in sweep_lib.new_entries(group[:1], 3, None)] == [0, 1, 2]


@pytest.mark.needs_data
def test_qat_scaling_kurtosis_table_reads_the_runs_checkpoints(tmp_path, monkeypatch):
  """The analysis measures the input kurtosis of a finished run's checkpoint, keeps it in
  qat_kurtosis.csv, and reads it back from there without the run (no checkpoint is loaded)."""
  from research.eval import input_kurtosis  # pylint: disable=import-outside-toplevel
  from research.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  analysis = experiments._load_module("qat_scaling", "analysis.py")  # pylint: disable=protected-access
  arm = "w4a4_g32_d64_D4M"
  run = tmp_path / "runs" / "w4a4" / arm / "seed0"
  config = experiments.get_config("qat_scaling:scale=smoke", {
      "train.steps": 4, "train.checkpoint_every": 4, "train.log_every": 2, "eval.every": 4,
      "train.progress": False, "mesh.num_devices": 1})
  Trainer(config, run, experiment="qat_scaling", arg="scale=smoke", log=lambda *_: None).run()
  groups = [{"group": "w4a4", "arms": [{"arm": arm, "valid_loss": {"values": [1.0]}}]}]
  md = analysis._kurtosis(tmp_path / "runs", groups, tmp_path)  # pylint: disable=protected-access
  row = next(line for line in md.splitlines() if line.startswith("| 64 | W4A4 |"))
  values = [float(x) for x in row.strip("| ").split(" | ")[2:]]
  want = input_kurtosis.of_run(run)
  np.testing.assert_allclose(values, [np.mean(want[s]) for s in input_kurtosis.ORDER],
                             atol=0.051)
  def no_loading(_):
    raise AssertionError("the stored row should have been read")
  monkeypatch.setattr(input_kurtosis, "of_run", no_loading)
  assert analysis._kurtosis(None, groups, tmp_path) == md  # pylint: disable=protected-access
  assert analysis._kurtosis(tmp_path / "runs", groups, tmp_path) == md  # pylint: disable=protected-access


def test_qat_scaling_kurtosis_names_a_run_it_cannot_measure(tmp_path):
  """A finished run without checkpoints is named in the report, which goes on."""
  analysis = experiments._load_module("qat_scaling", "analysis.py")  # pylint: disable=protected-access
  run = tmp_path / "runs" / "fp32" / "fp32_d128_D4M" / "seed0"
  run.mkdir(parents=True)
  (run / "summary.json").write_text('{"valid_loss": 1.33}')
  groups = [{"group": "fp32",
             "arms": [{"arm": "fp32_d128_D4M", "valid_loss": {"values": [1.33]}}]}]
  md = analysis._kurtosis(tmp_path / "runs", groups, tmp_path)  # pylint: disable=protected-access
  assert "Not measured: fp32/fp32_d128_D4M" in md and "CheckpointError" in md
