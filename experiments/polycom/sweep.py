"""PolyCom ablations at the tiny setting, 3 seeds per arm.

  research sweep polycom --group activations   # the activation comparison at equal parameters
  research sweep polycom --group order         # PolyNorm's order r in {2, 3, 4}
  research report polycom

Paper numbers are the 1B dense model's training loss at about 250B tokens, read off the
official repository's figure (approximate; the paper's tables were not available).
"""

from research.experiments import Arm, Sweep



def _act(name: str, paper: float | None = None, **extra) -> Arm:
  return Arm(name, {"model.channel.activation": name, **extra},
             {"train_loss (paper, digitised)": paper} if paper else None)


def get_sweep() -> Sweep:
  activations = [_act("swiglu", 2.19), _act("gelu", 2.21), _act("relu2"), _act("polyrelu", 2.18),
                 _act("polynorm", 2.17)]
  order = [Arm(f"polynorm_r{r}", {"model.channel.activation": "polynorm",
                                   "model.channel.poly_order": r}) for r in (2, 3, 4)]
  return Sweep(groups={"activations": activations, "order": order},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="activations")
