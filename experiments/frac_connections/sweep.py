"""Frac-connection ablations at the deep-narrow tiny setting, 3 seeds per arm.

  research sweep frac_connections --group frac_rate   # m in {2, 4}, static vs dynamic, no tanh
  research sweep frac_connections --group hc_vs_fc    # DHC n in {1, 2, 4} beside frac_rate's FC
  research report frac_connections

The paper gives no loss table for its ablations (Fig. 4 curves only); the numbers attached are
the training-loss differences to the baseline that its text states (OLMoE-1.3B, ~500B tokens).
"""

from research.experiments import Arm, Sweep, load_config_module

PAPER = {"dfc4": {"train loss - baseline (OLMoE-1.3B)": -0.014}}


def _arms(names: list[str]) -> list[Arm]:
  variant = load_config_module("frac_connections").variant_overrides
  return [Arm(n, variant(n), PAPER.get(n)) for n in names]


def get_sweep() -> Sweep:
  frac_rate = _arms(["pre", "sfc2", "dfc2", "sfc4", "dfc4", "dfc4_notanh"])
  # Equal state memory: FC's stream is d_model wide per token, like DHC x1's; DHC x2 / x4 keep
  # 2x / 4x that. The FC rows to compare with are frac_rate's.
  hc_vs_fc = _arms(["dhc1", "dhc2", "dhc4"])
  return Sweep(groups={"frac_rate": frac_rate, "hc_vs_fc": hc_vs_fc},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="frac_rate")
