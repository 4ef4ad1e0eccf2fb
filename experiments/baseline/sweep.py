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
  # The claim (valid loss <= 1.88 at nanoGPT's lr 1e-3) is against a number, not an arm, so no
  # arm carries a claim; the other learning rates are compared with nanoGPT's setting.
  return Sweep(groups={"lr": lr}, arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="lr",
               references={"lr": "lr=1e-3"}, varies={"lr": ("train.lr",)})
