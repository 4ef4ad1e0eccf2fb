"""ERC ablations at the tiny setting, 3 seeds per arm (the digest's plan, §6).

  research sweep erc_loss --group alpha      # MoE + LBL against ERC at alpha 1, 0.75, 0.5
  research sweep erc_loss --group ablation   # ERC without the proxies' noise; ERC weight 0.1;
                                             # ERC's gradient kept off the router rows
  research report erc_loss

Paper numbers: downstream accuracies of 3B / 15B MoEs (no LM-loss table); the claim the tiny
arms test is the direction: ERC below the MoE baseline, the no-noise arm above ERC.
"""

from research.experiments import Arm, Headline, Sweep

BASE = {"model.channel.moe.erc_coef": 0.0}


def erc(alpha: float, **extra) -> dict:
  return {"model.channel.moe.erc_coef": 1.0, "model.channel.moe.erc_alpha": alpha, **extra}


def get_sweep() -> Sweep:
  alpha = [Arm("moe", BASE),
           Arm("erc_a1", erc(1.0), claim="lower"),
           Arm("erc_a075", erc(0.75)),
           Arm("erc_a05", erc(0.5))]
  ablation = [Arm("moe", BASE),
              Arm("erc_a1", erc(1.0), claim="lower"),
              Arm("erc_a1_nonoise", erc(1.0, **{"model.channel.moe.erc_noise": False})),
              Arm("erc_a1_w01", {**erc(1.0), "model.channel.moe.erc_coef": 0.1}),
              Arm("erc_a1_router_frozen", erc(1.0, **{"model.channel.moe.erc_router_grad": False}))]
  return Sweep(groups={"alpha": alpha, "ablation": ablation},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="alpha",
               headline=(Headline("alpha", "erc_a1"),))
