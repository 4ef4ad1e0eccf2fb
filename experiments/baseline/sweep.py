"""Baseline sweep: learning rate at the tiny scale (nanoGPT baby on Tiny Shakespeare), 3 seeds.

  research sweep baseline --group lr && research report baseline
"""

from research.experiments import Arm, Sweep


def get_sweep() -> Sweep:
  lr = [
      Arm("lr=3e-4", {"train.lr": 3e-4}),
      Arm("lr=1e-3", {"train.lr": 1e-3}, paper={"valid_loss (nanoGPT)": 1.88}),
      Arm("lr=3e-3", {"train.lr": 3e-3}),
  ]
  return Sweep(groups={"lr": lr}, arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="lr")
