"""MaxScore against top-k routing at the tiny MoE setting, 3 seeds per arm (the digest's plan).

  research sweep max_score_routing --group capacity   # top-2 at CF 1.0 and 1.25 (drops) vs
                                                      # MaxScore at CF 1.0, boosted and not
  research sweep max_score_routing --group dropless   # top-2 without capacity (4x the step)
  research report max_score_routing

The CF 1.25 top-k arm is erc_loss's `moe` baseline (the same config: the sweep reuses its runs).
"""

from research.experiments import Arm, Headline, Sweep

TOPK = {"model.channel.moe.router": "topk"}


def get_sweep() -> Sweep:
  capacity = [Arm("topk_cf1", TOPK),
              Arm("topk_cf1.25", {**TOPK, "model.channel.moe.capacity_factor": 1.25}),
              Arm("maxscore", {}, claim="lower"),
              Arm("maxscore_tau1", {"model.channel.moe.maxscore.boost": 1.0})]
  dropless = [Arm("topk_cf1", TOPK),
              Arm("topk_dropless", {**TOPK, "model.channel.moe.dispatch": "dropless"}),
              Arm("maxscore", {})]
  return Sweep(groups={"capacity": capacity, "dropless": dropless},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="capacity",
               headline=(Headline("capacity", "maxscore"),))
