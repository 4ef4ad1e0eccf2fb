"""The QAT scaling grid at the tiny scale (digest §6), cut to fit about 11 core-hours:

  research sweep qat_scaling --group fp32    # 12 runs: N x D in full precision
  research sweep qat_scaling --group w4a4    # 36 runs: N x D x G (16, 32, 64)
  research sweep qat_scaling --group split   # 36 runs at G = 32: W4A16, W16A4, FC2 input 8-bit
  research sweep qat_scaling --group seeds   # 4 more runs: seed noise of delta at one cell
  research sweep qat_scaling --group long    # 4 runs: d = 64 at D = 10M and 20M (D/N 47, 94)
  research report qat_scaling

N: 4 layers of width 64, 128, 192, 256 (0.2M-3.2M non-embedding parameters); D: 1, 2,
4M tokens (the digest asks for 1.25-10M; 10M would double the cost). One seed per cell: the
fit's bootstrap over cells carries the uncertainty; the seeds group measures delta's seed noise
at d = 128, D = 4M, G = 32 (seeds 1 and 2 of fp32 and W4A4). The long group (the digest's
"known risk": at small D/N the rise of delta with D may be masked) trains the smallest width,
fp32 and W4A4 at G = 32, to 10M tokens (still one epoch) and 20M (1.85 epochs of the training
text): D/N up to 94, outside the grid's 0.3-19; it is not part of the grid's fit, which
predicts it. Per-channel / per-token groups
are not in the grid (AbsMax throughout, the paper's LAC for G >= 256 is not here). No arm
carries a claim: delta and its law are computed by analysis.py.
"""

from research import experiments
from research.experiments import Arm, Sweep

WIDTHS = (64, 128, 192, 256)
TOKENS_M = (1.0, 2.0, 4.0)
LONG_TOKENS_M = (10.0, 20.0)  # the long group: d = 64 only
GROUPS = (16, 32, 64)
Q = "model.linear.qat."
FP32 = {"model.linear.kind": "plain"}


def cell(d: int, tokens: float) -> str:
  return f"d{d}_D{tokens:g}M"


def arm(name, d, tokens, overrides, suffix=""):
  # the width and the token count as the settings they derive (d_model, heads, FFN, steps)
  config = experiments.load_config_module("qat_scaling")
  steps = max(int(round(tokens * 1e6 / config.TOKENS_PER_STEP)), 1)
  size = {"model.d_model": d, "model.num_heads": d // 32,
          "model.channel.d_ff": config.ffn_width(d),
          "train.steps": steps, "train.checkpoint_every": max(steps // 2, 1),
          "eval.every": max(steps // 4, 1)}
  return Arm(f"{name}_{cell(d, tokens)}{suffix}", {**size, **overrides})


def get_sweep() -> Sweep:
  grid = [(d, D) for d in WIDTHS for D in TOKENS_M]
  fp32 = [arm("fp32", d, D, FP32) for d, D in grid]
  w4a4 = [arm(f"w4a4_g{g}", d, D, {Q + "group": g}) for g in GROUPS for d, D in grid]
  split = ([arm("w4a16_g32", d, D, {Q + "a_bits": 16}) for d, D in grid]
           + [arm("w16a4_g32", d, D, {Q + "w_bits": 16}) for d, D in grid]
           + [arm("w4a4fc2a8_g32", d, D, {Q + "fc2_a_bits": 8}) for d, D in grid])
  seeds = [arm(name, 128, 4.0, {**over, "seed": s}, suffix=f"_s{s}")
           for s in (1, 2) for name, over in (("fp32", FP32), ("w4a4_g32", {}))]
  long = [arm(name, 64, D, over) for D in LONG_TOKENS_M
          for name, over in (("fp32", FP32), ("w4a4_g32", {}))]
  varies = ("model.d_model", "model.num_heads", "model.num_kv_heads", "train.steps",
            "train.checkpoint_every",
            "eval.every")
  groups = {"fp32": fp32, "w4a4": w4a4, "split": split, "seeds": seeds, "long": long}
  return Sweep(groups=groups, arg="scale=tiny", seeds=1, default_group="fp32",
               references={g: "" for g in groups}, varies={g: varies for g in groups})
