"""GatePro ablations at the tiny MoE setting, 3 seeds per arm (the digest's plan, §6).

  research sweep gatepro --group lambda     # top-k + LBL against GatePro at lambda 1e-4, 0.5, 1e9
  research sweep gatepro --group no_lbl     # both without the balance loss (lambda 0.5)
  research sweep gatepro --group hotswap    # GatePro on for the first 25 / 50 / 75% of steps
  research sweep gatepro --group extra      # lambda 1e-2; mutual competition
  research report gatepro

Every arm uses the gates of a softmax within the top-k (norm_topk). Paper numbers: benchmark
scores of 7B / 13B MoEs after 100B+ tokens (no LM-loss table); the claim the tiny arms test is
the direction: GatePro below the top-k baseline.
"""

from research.experiments import Arm, Headline, Sweep

TOPK = {"model.channel.moe.router": "topk"}
NO_LBL = {"model.channel.moe.aux_coef": 0.0}


def gatepro(lam: float, **extra) -> dict:
  return {"model.channel.moe.router": "gatepro", "model.channel.moe.gatepro.lam": lam, **extra}


def get_sweep() -> Sweep:
  lam = [Arm("topk", TOPK),
         Arm("gp_1e-4", gatepro(1e-4), claim="lower"),
         Arm("gp_0.5", gatepro(0.5), claim="lower"),
         Arm("gp_1e9", gatepro(1e9))]
  no_lbl = [Arm("topk_nolbl", {**TOPK, **NO_LBL}),
            Arm("gp_0.5_nolbl", gatepro(0.5, **NO_LBL), claim="lower")]
  hotswap = [Arm("topk", TOPK)] + [
      Arm(f"gp_0.5_until{int(f * 100)}", gatepro(0.5, **{"model.channel.moe.gatepro.until": f}))
      for f in (0.25, 0.5, 0.75)] + [Arm("gp_0.5", gatepro(0.5))]
  extra = [Arm("topk", TOPK),
           Arm("gp_1e-2", gatepro(1e-2)),
           Arm("gp_0.5_mutual", gatepro(0.5, **{"model.channel.moe.gatepro.competition":
                                                "mutual"}))]
  return Sweep(groups={"lambda": lam, "no_lbl": no_lbl, "hotswap": hotswap, "extra": extra},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="lambda",
               headline=(Headline("lambda", "gp_0.5"),))
