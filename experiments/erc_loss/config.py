"""ERC loss (Lv et al. 2025): an auxiliary loss that couples each MoE expert to its router row
by passing noisy copies of the router rows (proxy tokens) through every expert's gate
projection and penalising a proxy that excites another expert about as much as its own, or an
expert that responds to another proxy about as much as to its own.

  research run erc_loss                                   # MoE + LBL + ERC (alpha 1), tiny
  research run erc_loss --config.model.channel.moe.erc_coef=0   # the MoE baseline
  research run erc_loss:scale=smoke                       # seconds; used by the tests
  research sweep erc_loss --group alpha && research report erc_loss

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the digest's plan on the shared tiny setting: 4 blocks of width 128, 16
SwiGLU experts of width 128, top-2, capacity dispatch at 1.25 (the paper runs dropless; see
get_config), the Switch balance loss at 0.01 as the paper's baseline, ERC weight 1 and margin
alpha 1 (the paper's defaults), AdamW (0.9, 0.95), weight decay 0.1, cosine to 0.1 x lr. The
`paper` scale is the paper's 3B MoE (OLMoE shape: 12 layers, width 1536, 16 heads, 64 experts
of width 768, top-8), at capacity 1.25 too.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("the ERC auxiliary loss (expert-router coupling through noisy router-row proxies) "
         "lowers LM loss vs the same MoE with the load-balancing loss alone, at ~no extra cost")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "erc_loss")
  m, t = c.model, c.train
  m.channel.kind = "moe"
  e = m.channel.moe
  e.num_experts, e.top_k, e.d_expert = 16, 2, 128
  # capacity dispatch, 1.25 x the balanced load per expert and sequence (GShard / Switch): the
  # paper's OLMoE runs dropless, which this static-shape path executes at E/k = 8x the expert
  # FLOPs (431 ms per tiny step against 107 ms on one CPU core); every arm drops alike, and
  # the dropped fraction is logged (stat/moe_dropped)
  e.dispatch, e.capacity_factor = "capacity", 1.25
  e.aux_coef = 0.01  # the Switch balance loss of the paper's baseline
  e.erc_coef, e.erc_alpha, e.erc_noise = 1.0, 1.0, True
  t.b2 = 0.95
  if scale == "smoke":
    e.num_experts, e.d_expert = 4, 32
  elif scale == "small":
    e.d_expert = 384  # D = d / 2, as the paper's 3B (1536 -> 768)
  elif scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 12, 1536, 16
    e.num_experts, e.top_k, e.d_expert = 64, 8, 768
    c.data.seq_len = 4096
    t.batch_size = 768  # ~3M tokens per batch
    t.steps, t.warmup_steps = 166_000, 2000  # 500B tokens
    t.lr, t.min_lr_ratio = 4e-4, 0.1
  return c
