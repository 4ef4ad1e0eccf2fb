"""UltraMem (Huang et al., ICLR 2025): product-key memory layers with Tucker-decomposed
retrieval (TDQKR), implicit value expansion (IVE) and multi-core scoring (MCS), placed beside
the FFNs as skip-layer units, against a dense FFN and a top-2 MoE at equal activated FLOPs.

  research run ultramem                                   # UltraMem, tiny, char Tiny Shakespeare
  research run ultramem:scale=smoke                       # seconds; used by the tests
  research run ultramem --config.model.channel.kind=moe   # the MoE arm (or ffn: dense)
  research run ultramem --config.data.corpus=mqar --config.data.tokenizer=synthetic
  research sweep ultramem --group main && research report ultramem

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

Every arm has the dense model's FLOPs per token: the memory layers' FLOPs come out of the FFN
width of every block (`model.channel.ultramem.match_flops`), the MoE's experts are d_ff / k wide.
Sizes at `tiny` (4 layers x 128, the shared setting): two units 0:1 and 2:3; n = 112 keys per
side (12,544 value rows of width 64 per unit), E = 4 (224 keys per side), 2 heads x top-16,
rank 2, 2 cores, keys of width 32; about the MoE's total parameters (2.41M vs 2.44M).
`paper` is the official 227M/1.2B configuration (20 layers x 768, units 2:5/6:9/10:13/14:17,
n = 808, D_k = 192, 2 x 80, D_v = 384, E = 4); `small` is a 12-layer version of it.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("at equal activated FLOPs, UltraMem memory layers beat a dense FFN and approach a "
         "same-size top-2 MoE while reading far fewer parameter bytes per token")

# per scale: (model.channel.ultramem fields, model.channel.moe fields)
SIZES = {
    "smoke": (dict(layers="0:1", num_keys=8, top_k=4, d_key=8, d_value=16),
              dict(num_experts=4, top_k=2)),
    "tiny": (dict(layers="0:1,2:3", num_keys=112, top_k=16, d_key=32, d_value=64),
             dict(num_experts=8, top_k=2)),
    "small": (dict(layers="2:4,5:7,8:10", num_keys=512, top_k=64, d_key=192, d_value=384),
              dict(num_experts=16, top_k=2)),
    "paper": (dict(layers="2:5,6:9,10:13,14:17", num_keys=808, top_k=80, d_key=192,
                   d_value=384), dict(num_experts=34, top_k=2)),
}


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "ultramem")
  m, t = c.model, c.train
  m.init_std = 0.0  # 1/sqrt(2.5 d) for every dense projection, as UltraMemV2's App. A assumes
  t.b2 = 0.95  # AdamW (0.9, 0.95), weight decay 0.1 (paper Table 4)
  m.channel.kind = "ultramem"
  memory, moe = SIZES[scale]
  m.channel.ultramem.update(dict(memory, heads=2, rank=2, cores=2, expansion=4,
                                 retrieval="tucker", init="code", value_lr=4.0,
                                 value_lr_decay=True))
  m.channel.moe.update(dict(moe, dispatch="capacity", capacity_factor=1.25, aux_coef=0.01))
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 20, 768, 12
    m.channel.d_ff = 2048
    c.data.seq_len = 2048
    t.lr, t.warmup_steps = 6e-4, 2000
  return c
