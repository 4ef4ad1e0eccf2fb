"""PolyCom ablations at the tiny setting, 3 seeds per arm.

  research sweep polycom --group activations   # the activation comparison at equal parameters
  research sweep polycom --group order         # PolyNorm's order r in {2, 3, 4}
  research report polycom

Paper numbers are the 1B dense model's training loss at about 250B tokens, read off the
official repository's figure (approximate; the paper's tables were not available).
"""

from research.experiments import Arm, Headline, Sweep



def _act(name: str, paper: float | None = None, claim: str | None = None, **extra) -> Arm:
  return Arm(name, {"model.channel.activation": name, **extra},
             {"train_loss (paper, digitised)": paper} if paper else None, claim)


# Claims (research/verdict.py) against SwiGLU, from the 1B dense figure: GELU above it,
# PolyReLU and PolyNorm below it; no ReLU^2 number was available. The order ablation is known
# only from the reviews: the paper settles on r = 3 (so r = 2 is worse) and says higher orders
# add cost and overflow risk, not loss (so r = 4 is no better).
ORDER_CLAIMS = {2: "higher", 3: None, 4: "same"}


def get_sweep() -> Sweep:
  activations = [_act("swiglu", 2.19), _act("gelu", 2.21, "higher"), _act("relu2"),
                 _act("polyrelu", 2.18, "lower"), _act("polynorm", 2.17, "lower")]
  order = [Arm(f"polynorm_r{r}", {"model.channel.activation": "polynorm",
                                   "model.channel.poly_order": r}, claim=ORDER_CLAIMS[r])
           for r in (2, 3, 4)]
  return Sweep(groups={"activations": activations, "order": order},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="activations",
               headline=(Headline("activations", "polynorm"),),
               references={"order": "polynorm_r3"})  # the paper's order
