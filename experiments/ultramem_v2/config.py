"""UltraMemV2 (Huang et al. 2025): a memory layer in every block beside its FFN, PEER-style
values (a pre-value and a value per slot), one value projector, separate queries per Tucker
rank, a variance-matching init, and a tuned memory share of compute; against dense FFNs and
fine-grained MoE at equal activated FLOPs.

  research run ultramem_v2                                  # UltraMemV2, tiny, Tiny Shakespeare
  research run ultramem_v2:scale=smoke                      # seconds; used by the tests
  research run ultramem_v2 --config.model.channel.kind=moe  # the MoE arm (top-8 of 32 here)
  research sweep ultramem_v2 --group main && research report ultramem_v2

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

Sizes at `tiny` (4 layers x 128, the shared setting): memory in all 4 blocks; 1 head x top-16;
n = 114 keys per side (12,996 slots per layer), keys of width 32 (MCP about 26%), value width
24 and pre-value width 8 (1 : 3, their sum d/4), rank 2, 2 cores, no expansion; about the
MoE's total parameters. The MoE is fine-grained (top-8 of 32 experts of width d_ff / 8),
UltraMemV2's comparison regime. `paper` is the 227M/1.2B row of Table 10 (20 layers x 768,
n = 360, D_k = 192, 1 x 32, D_v = D_p = 192); `small` a 12-layer version of it.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("at equal activated FLOPs and total parameters, UltraMemV2 (memory in every block, "
         "PEER values) matches fine-grained MoE and beats UltraMem v1 and dense FFNs")

# per scale: (model.channel.ultramem_v2 fields, model.channel.moe fields, UltraMem v1 fields)
SIZES = {
    "smoke": (dict(num_keys=8, top_k=4, d_key=8, d_value=6, d_pre_value=2),
              dict(num_experts=8, top_k=4),
              dict(layers="0:1", num_keys=8, top_k=4, d_key=8, d_value=16)),
    "tiny": (dict(num_keys=114, top_k=16, d_key=32, d_value=24, d_pre_value=8),
             dict(num_experts=32, top_k=8),
             dict(layers="0:1,2:3", num_keys=112, top_k=16, d_key=32, d_value=64)),
    "small": (dict(num_keys=320, top_k=32, d_key=192, d_value=96, d_pre_value=96),
              dict(num_experts=64, top_k=8),
              dict(layers="2:4,5:7,8:10", num_keys=512, top_k=64, d_key=192, d_value=384)),
    "paper": (dict(num_keys=360, top_k=32, d_key=192, d_value=192, d_pre_value=192),
              dict(num_experts=64, top_k=8),
              dict(layers="2:5,6:9,10:13,14:17", num_keys=808, top_k=80, d_key=192,
                   d_value=384)),
}


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "ultramem_v2")
  m, t = c.model, c.train
  m.init_std = 0.0  # N(0, 2 / (5 d)) for dense projections: App. A's assumption
  t.b2 = 0.95
  m.channel.kind = "ultramem_v2"
  v2, moe, v1 = SIZES[scale]
  m.channel.ultramem_v2.update(dict(v2, layers="", heads=1, rank=2, cores=2, expansion=1,
                                    peer=True, per_rank_query=True, ive_projectors=False,
                                    init="paper", value_lr=4.0, value_lr_decay=True))
  m.channel.ultramem.update(dict(v1, heads=2, rank=2, cores=2, expansion=4, init="code"))
  m.channel.moe.update(dict(moe, dispatch="capacity", capacity_factor=1.25, aux_coef=0.01))
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 20, 768, 12
    m.channel.d_ff = 2048
    c.data.seq_len = 2048
    t.lr, t.warmup_steps = 6e-4, 2000
  return c
