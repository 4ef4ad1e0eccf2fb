"""UltraMem at the tiny setting, 3 seeds per arm; every arm at the dense model's FLOPs/token.

  research sweep ultramem --group main       # dense, dense at the MoE's total params, MoE, UltraMem
  research sweep ultramem --group ablations  # UltraMem minus TDQKR / IVE / MCS / value lr;
                                             # the paper's init
  research sweep ultramem --group mqar       # multi-query associative recall (exact match)
  research sweep ultramem --group facts      # fact recall (exact match)
  research report ultramem

Paper numbers: validation loss of the 151M-activated models (Table 1) for `main`, and the
cumulative ablation of Table 2 (151M, about 1.5B sparse parameters; a row's number is the loss
after adding that component) for `ablations`.
"""

from research.experiments import Arm, Headline, Sweep

DENSE = {"model.channel.kind": "ffn"}
# A dense FFN with the MoE's total parameters: 8 experts x d_ff/2 = 4 x d_ff (1408 at tiny).
DENSE_TOTAL = {"model.channel.kind": "ffn", "model.channel.d_ff": 1408}
MOE = {"model.channel.kind": "moe"}  # top-2 of 8, capacity factor 1.25 (config.py)
MOE_DROPLESS = {"model.channel.kind": "moe", "model.channel.moe.dispatch": "dropless"}
ULTRAMEM = {"model.channel.kind": "ultramem"}
U = "model.channel.ultramem."
MQAR = {"data.corpus": "mqar", "data.tokenizer": "synthetic"}
FACTS = {"data.corpus": "facts", "data.tokenizer": "synthetic"}


def get_sweep() -> Sweep:
  # Claims (research/verdict.py): Table 1 at 151M activated has the MoE and UltraMem below
  # dense (2.63, 2.67 vs 2.96); the paper has no dense-at-total-parameters or dropless row.
  main = [
      Arm("dense", DENSE, {"valid_loss (paper, 151M)": 2.96}),
      Arm("dense_total", DENSE_TOTAL),
      Arm("moe", MOE, {"valid_loss (paper, 151M)": 2.63}, "lower"),
      Arm("moe_dropless", MOE_DROPLESS),
      Arm("ultramem", ULTRAMEM, {"valid_loss (paper, 151M)": 2.67}, "lower"),
  ]
  # Table 2: adding each component lowered the loss, so removing it should raise it; the
  # paper's "improved init" (-0.003) is its variance rule, our `init=paper`.
  ablations = [
      Arm("ultramem", ULTRAMEM, {"valid_loss (paper, full)": 2.736}),
      # each row removes one component (the paper adds them cumulatively: Table 2's deltas)
      Arm("no_tdqkr", {**ULTRAMEM, U + "retrieval": "product", U + "rank": 1, U + "cores": 1},
          {"valid_loss (paper, before +TDQKR)": 2.772}, "higher"),
      Arm("no_ive", {**ULTRAMEM, U + "expansion": 1}, {"valid_loss (paper, before +IVE)": 2.789},
          "higher"),
      Arm("no_mcs", {**ULTRAMEM, U + "cores": 1}, {"valid_loss (paper, before +MCS)": 2.764},
          "higher"),
      Arm("value_lr_1x", {**ULTRAMEM, U + "value_lr": 1.0},
          {"valid_loss (paper, before +value lr)": 2.758}, "higher"),
      Arm("init_paper", {**ULTRAMEM, U + "init": "paper"}, claim="lower"),
  ]
  # mqar and facts are our probes (the paper has no such table): no claims.
  mqar = [Arm(name, {**arm, **MQAR}) for name, arm in
          (("dense", DENSE), ("moe", MOE), ("ultramem", ULTRAMEM))]
  facts = [Arm(name, {**arm, **FACTS}) for name, arm in
           (("dense", DENSE), ("dense_total", DENSE_TOTAL), ("moe", MOE), ("ultramem", ULTRAMEM))]
  return Sweep(groups={"main": main, "ablations": ablations, "mqar": mqar, "facts": facts},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="main",
               headline=(Headline("main", "ultramem"),))
