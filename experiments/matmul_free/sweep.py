"""The MatMul-free LM against its full-precision twins (the digest's tiny plan), at the shared
tiny recurrent setting.

  research sweep matmul_free --group main       # T-fp, T-tern, G-fp, G-tern
  research sweep matmul_free --group ablation   # no lower bound; the paper's output gate
  research sweep matmul_free --group lr         # the ternary model at 2e-3 and 4e-3
  research report matmul_free

main: the reference is the full-precision Transformer (T-fp); the paper's claim is that the
MatMul-free LM (G-tern) stays close to it ("same"). ablation: the reference is G-tern; the
lower bound's claim is that it helps (removing it raises the loss).
"""

from research.experiments import Arm, Headline, Sweep

ARG = "scale=tiny,corpus=tinyshakespeare"
M = "model.attention.mlgru."
DENSE = {"model.attention.kind": "dense", "model.channel.d_ff": 0}
FP = {"model.linear.kind": "plain"}


def get_sweep() -> Sweep:
  main = [Arm("t_fp", {**DENSE, **FP}),
          Arm("t_tern", dict(DENSE)),
          Arm("g_fp", dict(FP)),
          Arm("g_tern", {}, claim="same")]
  ablation = [Arm("g_tern", {}),
              Arm("g_tern_nolb", {M + "lower_bound": False}, claim="higher"),
              Arm("g_tern_paper_gate", {M + "output": "paper"})]
  lr = [Arm("g_tern", {}),
        Arm("g_tern_lr2e-3", {"train.lr": 2e-3}),
        Arm("g_tern_lr4e-3", {"train.lr": 4e-3})]
  return Sweep(groups={"main": main, "ablation": ablation, "lr": lr}, arg=ARG, seeds=3,
               default_group="main", varies={"lr": ("train.lr",)},
               headline=(Headline("main", "g_tern"),))
