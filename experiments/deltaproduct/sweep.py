"""DeltaProduct's language-modelling comparison at equal parameters (the digest's plan (B)),
at the shared tiny recurrent setting.

  research sweep deltaproduct --group lm
  research report deltaproduct

The reference is DeltaNet with negative eigenvalues (n_h = 1, beta in (0, 2)); the claims are
the paper's: n_h = 2 and 3 lower the loss. DeltaNet [0, 1] (beta in (0, 1)) and the softmax
Transformer carry no claim here; the extrapolation columns of the report hold the length
claim. Each arm's FFN width matches the Transformer's parameters.
"""

from research.experiments import Arm, Sweep
from research.scales import matched_arm

ARG = "scale=tiny,corpus=tinyshakespeare"
P = "model.attention.deltaproduct."


def arm(name, overrides, claim=None):
  return Arm(name, matched_arm("deltaproduct", ARG, overrides), claim=claim)


def get_sweep() -> Sweep:
  lm = [arm("deltanet", {P + "householder": 1}),
        arm("dp2", {P + "householder": 2}, "lower"),
        arm("dp3", {P + "householder": 3}, "lower"),
        arm("deltanet_01", {P + "householder": 1, P + "neg_eigval": False}),
        Arm("transformer", {"model.attention.kind": "dense", "model.channel.d_ff": 0})]
  return Sweep(groups={"lm": lm}, arg=ARG, seeds=3, default_group="lm",
               varies={"lm": ("model.channel.d_ff",)})
