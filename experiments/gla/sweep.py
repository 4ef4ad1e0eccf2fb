"""GLA's ablations (the digest's tiny plan: T / LA / Ret / GLA / GLA-tau1 / scalar gate / no
output gate) at the shared tiny recurrent setting.

  research sweep gla --group ablation
  research report gla

The reference is GLA; the paper's expected order is T <~ GLA < Ret < LA, with tau = 1 worse or
less stable than tau = 16. Each arm's FFN width matches the Transformer's parameters. The
Transformer row has no claim (the paper: competitive, not better).
"""

from research.experiments import Arm, Headline, Sweep
from research.scales import matched_arm

ARG = "scale=tiny,corpus=tinyshakespeare"
G = "model.attention.gla."


def arm(name, overrides, claim=None):
  return Arm(name, matched_arm("gla", ARG, overrides), claim=claim)


def get_sweep() -> Sweep:
  ablation = [arm("gla", {}),
              arm("linear_attention", {G + "gate": "none"}, "higher"),
              arm("fixed_decay", {G + "gate": "fixed"}, "higher"),
              arm("tau1", {G + "tau": 1.0}, "higher"),
              arm("scalar_gate", {G + "gate": "scalar"}, "higher"),
              arm("no_output_gate", {G + "output_gate": False}, "higher"),
              Arm("transformer", {"model.attention.kind": "dense", "model.channel.d_ff": 0})]
  return Sweep(groups={"ablation": ablation}, arg=ARG, seeds=3, default_group="ablation",
               headline=(Headline("ablation", "gla", baseline="transformer"),),
               varies={"ablation": ("model.channel.d_ff",)})
