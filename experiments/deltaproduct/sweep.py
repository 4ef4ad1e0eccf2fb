"""DeltaProduct's language-modelling comparison at equal parameters (the digest's plan (B)),
at the shared tiny recurrent setting.

  research sweep deltaproduct --group lm               # Tiny Shakespeare, equal parameters
  research sweep deltaproduct --group state_tracking   # the S3 word problem, one layer
  research report deltaproduct

The reference is DeltaNet with negative eigenvalues (n_h = 1, beta in (0, 2)); the claims are
the paper's: n_h = 2 and 3 lower the loss. DeltaNet [0, 1] (beta in (0, 1)) and the softmax
Transformer carry no claim here; the extrapolation columns of the report hold the length
claim. Each arm's FFN width matches the Transformer's parameters.

state_tracking: the word problem of S3 in the paper's format (research/data/synthetic.py,
corpus `group` with products="targets": the sequence holds the input elements alone, the target
at each position is the running product, which is never an input), one block, trained on
instances of 64 elements at lr 3e-3 for 4000 steps (at the LM's 1e-3 and 2000 steps
DeltaProduct_2 had not learnt even the parity of the product); the extrapolation evaluator
scores exact match (per-position accuracy) on held-out instances of 64 .. 512 elements. The
digest's expectations: DeltaNet [-1, 1] in one layer cannot solve S3 (a 3-cycle is a rotation,
a product of two reflections), DeltaProduct_2 [-1, 1] can; [0, 1] eigenvalues, a diagonal
(GLA) state and softmax attention do not extrapolate.
"""

from research.experiments import Arm, Headline, Sweep
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
  task = {"data.corpus": "group", "data.tokenizer": "synthetic", "data.synthetic.group": "S3",
          "data.synthetic.products": "targets", "model.num_layers": 1,
          "train.lr": 3e-3, "train.steps": 4000}  # at 1e-3 / 2000 steps no arm got past parity
  state = [arm("st_deltanet", {**task, P + "householder": 1}),
           arm("st_dp2", {**task, P + "householder": 2}, "lower"),
           arm("st_deltanet_01", {**task, P + "householder": 1, P + "neg_eigval": False}),
           arm("st_dp2_01", {**task, P + "householder": 2, P + "neg_eigval": False}),
           arm("st_gla", {**task, "model.attention.kind": "gla"}),
           Arm("st_transformer", {**task, "model.attention.kind": "dense", "model.channel.d_ff": 0})]
  return Sweep(groups={"lm": lm, "state_tracking": state}, arg=ARG, seeds=3, default_group="lm",
               headline=(Headline("lm", "dp2"),),
               varies={"lm": ("model.channel.d_ff",),
                       "state_tracking": ("model.channel.d_ff", "model.attention.kind")})
