"""PHD-Transformer's tables at the shared tiny scale (char-level Tiny Shakespeare, 128 original
tokens per window, 3 seeds): the digest's tiny plan, plus the FLOP-matched controls the paper
lacks.

  research sweep phd_transformer --group main     # first: vanilla, naive, PHD, SWA, CSWA
  research sweep phd_transformer --group window   # Fig. 6: W in {1, 4, 16} against PHD
  research sweep phd_transformer --group chunk    # Fig. 7: C in {16, 32} against no chunks
  research sweep phd_transformer --group flops    # every arm against vanilla at 2x / 3x compute
  research report phd_transformer

Arms that recur in several groups have one config, so the sweep reuses a finished run. The
flops group has no claims (the paper makes none at equal compute): its reference is vanilla
trained 2x the steps, and the report's analysis (analysis.py) sets each arm against the
control of nearest training FLOPs.
"""

from research.experiments import Arm, Headline, Sweep

ARG = "scale=tiny"  # the complete works of Shakespeare (4.6M training characters): README
P = "model.phd."


def phd(kind, k=2, **settings):
  return {P + "kind": kind, P + "repeats": k, **{P + n: v for n, v in settings.items()}}


VANILLA = {P + "kind": "none"}
ARMS = {  # name -> overrides (get_config's default is PHD-CSWA-2-16-32)
    "vanilla": VANILLA,
    "naive_k2": phd("naive"),
    "naive_k3": phd("naive", 3),
    "phd_k2": phd("phd"),
    "phd_k3": phd("phd", 3),
    "swa_k2_w1": phd("swa", window=1),
    "swa_k2_w4": phd("swa", window=4),
    "swa_k2_w16": phd("swa", window=16),
    "swa_k3_w16": phd("swa", 3, window=16),
    "cswa_k2_w16_c16": phd("cswa", window=16, chunk=16),
    "cswa_k2_w16_c32": phd("cswa", window=16, chunk=32),
    # FLOP-matched vanilla controls (2.0x, 2.0x and 3.0x the vanilla's training FLOPs)
    "vanilla_2x_layers": {**VANILLA, "model.num_layers": 8},
    "vanilla_2x_steps": {**VANILLA, "train.steps": 4000},
    "vanilla_3x_steps": {**VANILLA, "train.steps": 6000},
}


def arm(name, claim=None, paper=None):
  return Arm(name, ARMS[name], claim=claim, paper=paper)


def get_sweep() -> Sweep:
  # The paper's training losses: 1.2B, 500B tokens, PHD-CSWA-K-16-32 (Table 1); 550M, 300B
  # tokens, PHD-SWA-K-16 (Table 2). Not comparable in level with a tiny char-level model: the
  # differences to vanilla are the paper's claim.
  main = [arm("vanilla", paper={"1.2B loss": 2.601, "550M loss": 2.782}),
          arm("naive_k2", "lower"), arm("naive_k3", "lower"),
          arm("phd_k2", "lower"), arm("phd_k3", "lower"),
          arm("swa_k2_w16", "lower", paper={"550M loss": 2.753}),
          arm("swa_k3_w16", "lower", paper={"550M loss": 2.739}),
          arm("cswa_k2_w16_c32", "lower", paper={"1.2B loss": 2.576})]
  window = [arm("phd_k2"), arm("swa_k2_w1", "lower"), arm("swa_k2_w4", "lower"),
            arm("swa_k2_w16", "lower")]
  chunk = [arm("swa_k2_w16"), arm("cswa_k2_w16_c16", "same"), arm("cswa_k2_w16_c32", "same")]
  flops = [arm("vanilla_2x_steps"), arm("vanilla"), arm("vanilla_2x_layers"),
           arm("vanilla_3x_steps"), arm("naive_k2"), arm("phd_k2"), arm("swa_k2_w16"),
           arm("cswa_k2_w16_c32"), arm("naive_k3"), arm("phd_k3"), arm("swa_k3_w16")]
  return Sweep(groups={"main": main, "window": window, "chunk": chunk, "flops": flops},
               arg=ARG, seeds=3, default_group="main",
               headline=(Headline("main", "cswa_k2_w16_c32"),),
               varies={"flops": ("model.num_layers", "train.steps")})
