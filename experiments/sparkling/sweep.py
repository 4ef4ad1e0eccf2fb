"""SPARKLING's tiny plan (digest §6), 3 seeds, expansion at step 2000 of 4000:

  research sweep sparkling                  # inner 2x: d_ff 256 -> 512 (the main group)
  research sweep sparkling --group hidden   # hidden 2x: d_model 128 -> 256, 4 heads of 32 kept
  research sweep sparkling --group rewarm   # re-warmup length tau_w 50 / 100 / 250
  research report sparkling

The reference of `inner` and `hidden` is naive FP scaling (copy-copy rescaled, which at 2x is
function preserving, with the optimizer state copied into the new slices and no re-warmup),
the paper's "Naive FP scaled" row of Table 1. Arms in the digest's order: the small model
throughout; the large model from scratch at the paper's step-law lr for the larger size (Table
5's ratio, inner 2x 8.988e-4 / 1.449e-3 = 0.62, hidden 8.630e-4 / 1.449e-3 = 0.60) and at the
small model's lr; copy-copy unscaled; naive FP; RMS-scaled random-random, random-zero, zero-copy
(state copied, as the reference); reset-all state (symmetric); the asymmetric reset; + re-warmup
(= SPARKLING); SPARKLING with symmetric state (copied, or all reset). Claims against the
reference: Table 1 (scratch and SPARKLING below naive), Fig. 1 (unscaled ends higher; copy-copy
the worst RMS-scaled init before the symmetry fixes), Fig. 2 (the asymmetric reset below the
symmetric treatments); the small model above every expansion (the digest's expected ordering).
"""

from research.experiments import Arm, Headline, Sweep

X = "train.expand."
STEP = 2000
EXPAND_KEYS = tuple(X + k for k in ("step", "d_ff", "d_model", "init", "rescale", "state",
                                    "rewarm", "rho", "warmup"))
LR = 1e-3  # the tiny scale's peak lr (the small model's)
LR_RATIO = {"inner": 8.988e-4 / 1.449e-3, "hidden": 8.630e-4 / 1.449e-3}  # Table 5
OFF = {X + "step": 0}
NAIVE = {X + "init": "copy_copy", X + "rescale": "rms", X + "state": "copy", X + "rewarm": False}
# Table 1 (final pretraining loss after 200B tokens, OLMoE-style MoE): small 2.3673
PAPER = {"inner": {"scratch": 2.3096, "naive": 2.3276, "sparkling": 2.3153},
         "hidden": {"scratch": 2.2795, "naive": 2.3082, "sparkling": 2.2933}}


def arms(group: str, grow: dict, large: dict, full: bool) -> list[Arm]:
  """The arms of one width axis: `grow` the expansion's widths, `large` the large model;
  `full`: every arm of the plan (the main group), else the Table 1 rows and the reset."""
  p = PAPER[group]
  out = [Arm("small", OFF, paper={"loss": 2.3673}, claim="higher"),
         Arm("large_scratch", {**OFF, **large, "train.lr": round(LR * LR_RATIO[group], 6)},
             paper={"loss": p["scratch"]}, claim="lower")]
  if full:
    out.append(Arm("large_scratch_small_lr", {**OFF, **large}))
    out.append(Arm("copy_unscaled", {**grow, **NAIVE, X + "rescale": "none"}, claim="higher"))
  out.append(Arm("naive_fp", {**grow, **NAIVE}, paper={"loss": p["naive"]}))
  if full:
    out += [Arm(init, {**grow, **NAIVE, X + "init": init}, claim="lower")
            for init in ("random_random", "random_zero", "zero_copy")]
    out.append(Arm("reset_all", {**grow, **NAIVE, X + "state": "reset_all"}))
  out.append(Arm("reset_new", {**grow, **NAIVE, X + "state": "reset_new"}, claim="lower"))
  sparkling = {**grow, **NAIVE, X + "state": "reset_new", X + "rewarm": True}
  out.append(Arm("sparkling", sparkling, paper={"loss": p["sparkling"]}, claim="lower"))
  if full:  # the symmetry-lock controls: SPARKLING with symmetric optimizer state
    out += [Arm("sparkling_state_copy", {**sparkling, X + "state": "copy"}),
            Arm("sparkling_reset_all", {**sparkling, X + "state": "reset_all"})]
  return out


def get_sweep() -> Sweep:
  inner = arms("inner", {X + "step": STEP, X + "d_ff": 512},
               {"model.channel.d_ff": 512}, full=True)
  hidden = arms("hidden", {X + "step": STEP, X + "d_ff": 0, X + "d_model": 256},
                {"model.d_model": 256, "model.head_dim": 32}, full=False)
  sparkling = {X + "step": STEP, X + "d_ff": 512, X + "init": "copy_copy", X + "rescale": "rms",
               X + "state": "reset_new", X + "rewarm": True}
  rewarm = [Arm("sparkling", sparkling)] + [
      Arm(f"sparkling_tw{w}", {**sparkling, X + "warmup": w}) for w in (50, 100)]
  return Sweep(groups={"inner": inner, "hidden": hidden, "rewarm": rewarm}, arg="scale=tiny",
               seeds=3, default_group="inner",
               references={"inner": "naive_fp", "hidden": "naive_fp", "rewarm": "sparkling"},
               varies={"inner": EXPAND_KEYS + ("train.lr",),
                       "hidden": EXPAND_KEYS + ("train.lr", "model.d_model"),
                       "rewarm": (X + "warmup",)},
               headline=(Headline("inner", "sparkling"),))
