"""RetNet Table 6 (200M, in-domain validation perplexity) at the shared tiny recurrent setting.

  research sweep retnet --group table6
  research report retnet

Every retention arm has the softmax Transformer's non-embedding parameters (the FFN width
takes up what the mixer adds or gives back: an arm's overrides state its d_ff). The reference
is RetNet; each ablation's claim is the paper's: removing the component raises the loss. The
Transformer row carries no claim at this scale (the paper's crossover is above 2B; its Table 5
has no Transformer row).
"""

from research.experiments import Arm, Headline, Sweep
from research.scales import matched_arm

ARG = "scale=tiny,corpus=tinyshakespeare"
PAPER = {"retnet": 26.05, "no_gate": 27.84, "no_head_norm": 27.54, "gamma_one": 27.86,
         "single_gamma": 27.02, "heads_8": 27.68}  # in-domain perplexity, Table 6


def arm(name, overrides, claim=None):
  paper = {"valid_ppl": PAPER[name]} if name in PAPER else None
  return Arm(name, matched_arm("retnet", ARG, overrides), paper=paper, claim=claim)


def get_sweep() -> Sweep:
  r = "model.attention.retention."
  table6 = [arm("retnet", {}),
            arm("no_gate", {r + "gate": False}, "higher"),
            arm("no_head_norm", {r + "head_norm": False}, "higher"),
            arm("gamma_one", {r + "decay": "fixed", r + "gamma": 1.0}, "higher"),
            arm("single_gamma", {r + "decay": "fixed", r + "gamma": 0.9921875}, "higher"),
            arm("heads_8", {"model.num_heads": 8}, "higher"),
            Arm("transformer", {"model.attention.kind": "dense", "model.channel.d_ff": 0})]
  return Sweep(groups={"table6": table6}, arg=ARG, seeds=3, default_group="table6",
               headline=(Headline("table6", "retnet", baseline="transformer"),),
               varies={"table6": ("model.channel.d_ff", "model.num_heads",
                                  "model.num_kv_heads")})
