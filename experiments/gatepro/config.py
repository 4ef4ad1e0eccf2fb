"""GatePro (Zheng et al. 2025): parameter-free expert selection. Each expert competes with the
expert whose router row is most similar to its own; per token, the one with the lower logit
is penalised by lambda before the top-k, so near-duplicate experts are co-selected less.

  research run gatepro                                    # GatePro lambda 0.5 + LBL, tiny
  research run gatepro --config.model.channel.moe.router=topk   # the MoE baseline
  research run gatepro:scale=smoke                        # seconds; used by the tests
  research sweep gatepro --group lambda && research report gatepro

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the MoE setting shared with erc_loss and max_score_routing (4 blocks of width
128, 16 SwiGLU experts of width 128, top-2, capacity 1.25, the Switch balance loss at 0.01),
with the gates a softmax within the top-k in every arm (`norm_topk`: GatePro's normalisation,
so lambda 0 is exactly the baseline). lambda is ambiguous in the paper ("typically 1e-4", yet
"eliminates the losing expert"); the default here is 0.5, the sweep covers 1e-4 to 1e9. The
`paper` scale is the Seed-MoE 0.7B/7B shape as far as the paper states it (top-6 of 128
experts; the width, depth and training recipe are not stated: OLMoE-like values, see README).
"""

from research.scales import SCALES, apply_moe_setting, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("penalising the weaker of each nearest pair of router rows lowers LM loss vs the same "
         "MoE with top-k routing and the balance loss, at no parameter and ~no compute")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "gatepro")
  apply_moe_setting(c, scale)  # the MoE setting shared with erc_loss and max_score_routing
  m, t, e = c.model, c.train, c.model.channel.moe
  e.norm_topk = True  # GatePro's gates: softmax over the penalised logits within the top-k
  e.router = "gatepro"
  e.gatepro.lam, e.gatepro.until, e.gatepro.competition = 0.5, 1.0, "one_way"
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 16, 1024, 16
    e.num_experts, e.top_k, e.d_expert = 128, 6, 512
    c.data.seq_len = 4096
    t.batch_size = 512  # ~2M tokens per batch
    t.steps, t.warmup_steps = 240_000, 2000  # 500B tokens
    t.lr, t.min_lr_ratio = 4e-4, 0.1
  return c
