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

from research.scales import SCALES, apply_moe_setting, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("the ERC auxiliary loss (expert-router coupling through noisy router-row proxies) "
         "lowers LM loss vs the same MoE with the load-balancing loss alone, at ~no extra cost")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "erc_loss")
  # the shared MoE setting (research/scales.py): capacity 1.25 where the paper's OLMoE runs
  # dropless; every arm drops alike, and the dropped fraction is logged (stat/moe_dropped).
  # The balance loss at 0.01 is the paper's baseline; small's expert width d / 2 is the
  # paper's 3B ratio (1536 -> 768)
  apply_moe_setting(c, scale)
  m, t, e = c.model, c.train, c.model.channel.moe
  e.erc_coef, e.erc_alpha, e.erc_noise = 1.0, 1.0, True
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 12, 1536, 16
    e.num_experts, e.top_k, e.d_expert = 64, 8, 768
    c.data.seq_len = 4096
    t.batch_size = 768  # ~3M tokens per batch
    t.steps, t.warmup_steps = 166_000, 2000  # 500B tokens
    t.lr, t.min_lr_ratio = 4e-4, 0.1
  return c
