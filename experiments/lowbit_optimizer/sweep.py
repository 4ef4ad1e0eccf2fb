"""SOLO's ablation at the tiny scale (the digest's eight arms), 3 seeds:

  research sweep lowbit_optimizer && research report lowbit_optimizer

The reference is fp32 AdamW (beta 0.9, 0.999). Claims: 8-bit states and SOLO at 4/2 and 2/2
bits "same"; naive 4/2 (v on a 2-bit linear grid, nearest rounding) and naive 2/2 "higher".
The v-grid arms without a claim isolate each piece (4/4 linear; 4/2 linear with stochastic
rounding; SOLO 4/2 at beta1 0.9, the beta effect). SOLO 2/2's beta1 comes from the momentum
rule (research/train/lowbit.py solo_beta1) against the 4-bit DE m at beta1 0.8: 0.41. The
report's statistics columns hold the swamping diagnostics (stat/opt_v_codes_unchanged,
stat/opt_v_zero, stat/opt_update_rms).
"""

from research.experiments import Arm, Headline, Sweep

Q = "train.lowbit."
B2 = 0.999  # every arm's (config.py's): set here so that the common group keeps it (sweep below)


def lowbit(m_bits, m_grid, v_bits, v_grid, v_rounding, b1):
  return {"train.optimizer": "lowbit_adamw", "train.b1": b1, "train.b2": B2, Q + "m_bits": m_bits,
          Q + "m_grid": m_grid, Q + "m_rounding": "nearest", Q + "v_bits": v_bits,
          Q + "v_grid": v_grid, Q + "v_rounding": v_rounding}


SOLO_2_2_BETA1 = 0.41  # solo_beta1(Codec(2, de), reference=Codec(4, de), 0.8) = 0.408


def get_sweep() -> Sweep:
  arms = [Arm("adamw_fp32", {"train.optimizer": "adamw", "train.b1": 0.9, "train.b2": B2}),
          Arm("de8_de8", lowbit(8, "de", 8, "de", "nearest", 0.9), claim="same"),
          Arm("de4_lin4", lowbit(4, "de", 4, "linear", "nearest", 0.9)),
          Arm("de4_lin2_naive", lowbit(4, "de", 2, "linear", "nearest", 0.9), claim="higher"),
          Arm("de4_lin2_sr", lowbit(4, "de", 2, "linear", "stochastic", 0.9)),
          Arm("solo_4_2", lowbit(4, "de", 2, "qema", "stochastic", 0.8), claim="same"),
          Arm("solo_4_2_b09", lowbit(4, "de", 2, "qema", "stochastic", 0.9)),
          Arm("de2_lin2_naive", lowbit(2, "de", 2, "linear", "nearest", 0.9), claim="higher"),
          Arm("solo_2_2", lowbit(2, "de", 2, "qema", "stochastic", SOLO_2_2_BETA1),
              claim="same")]
  return Sweep(groups={"main": arms}, arg="scale=tiny,corpus=tinyshakespeare", seeds=3,
               default_group="main",
               headline=(Headline("main", "solo_4_2"),),
               # b2 with the method: swamping (the problem SOLO solves) needs beta2 near 1, so
               # the common group keeps 0.999 rather than the common setting's 0.95
               varies={"main": ("train.b1", "train.b2", "train.optimizer") + tuple(
                   Q + k for k in ("m_bits", "m_grid", "m_rounding", "v_bits", "v_grid",
                                   "v_rounding", "block", "quantile", "min_size"))})
