"""Maximum Score Routing (Dong et al. 2025): MoE routing as an assignment that maximises the
total routing score under each expert's capacity, so no token is dropped. Here: a greedy first
choice with capacity, then a Sinkhorn plan over the remaining capacity rounded to a feasible
second choice (research/model/routers.py), and the released code's x4 -> x1 boost of the
second gate.

  research run max_score_routing                          # MaxScore at capacity 1.0, tiny
  research run max_score_routing --config.model.channel.moe.router=topk   # GShard top-2, CF 1.0
  research run max_score_routing:scale=smoke              # seconds; used by the tests
  research sweep max_score_routing --group capacity && research report max_score_routing

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the MoE setting shared with erc_loss and gatepro (4 blocks of width 128, 16
SwiGLU experts of width 128, top-2, the Switch balance loss at 0.01 on the router
probabilities), at capacity factor 1.0 (C = 2 S / E = 8 slots per expert and sequence of 64,
the paper's), gates not renormalised (the released code). The `paper` scale is the released
code's LLaMA-MoE-162M (12 layers, width 768, 16 experts of width 1536, top-2, context 512).
"""

from research.scales import SCALES, apply_moe_setting, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("routing by a capacity-respecting maximum-score assignment (nothing dropped) lowers LM "
         "loss vs top-k routing that drops tokens past the same capacity")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "max_score_routing")
  apply_moe_setting(c, scale)  # the MoE setting shared with erc_loss and gatepro
  m, t, e = c.model, c.train, c.model.channel.moe
  e.capacity_factor = 1.0  # C = k S / E, the paper's
  e.router = "maxscore"
  e.maxscore.boost, e.maxscore.boost_until = 4.0, 0.3
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 12, 768, 12
    e.num_experts, e.top_k, e.d_expert = 16, 2, 1536
    c.data.seq_len = 512
    t.batch_size = 512
    t.steps, t.warmup_steps = 60_000, 2048  # ~16B tokens
    t.lr, t.min_lr_ratio = 3e-4, 0.1
  return c
