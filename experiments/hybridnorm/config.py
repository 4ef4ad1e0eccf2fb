"""HybridNorm (Zhuo et al. 2025): QKV-norm attention + a post-norm FFN whose skip carries the
normalized value; HybridNorm* makes block 0 pre-norm.

  research run hybridnorm                                  # HybridNorm*, tiny, char Shakespeare
  research run hybridnorm:scale=smoke                      # seconds; used by the tests
  research run hybridnorm --config.model.norm.kind=post    # any placement of research/model/norms.py
  research sweep hybridnorm --group table6 && research report hybridnorm

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The paper's recipe that the tiny setting keeps: RMSNorm with gains, SwiGLU, RoPE, AdamW
(0.9, 0.95), weight decay 0.1, clip 1.0, cosine schedule; weights N(0, 1/(2.5 d)) ("init_std
0"). HybridNorm uses the Megatron init (output projections scaled by 1/sqrt(2L), the default
here); the pre-norm and post-norm arms of the sweep use the paper's "Normal" init (no depth
scaling), each architecture with the init the paper found best for it (Table 5).
The `paper` scale is the 550M ablation model of Table 6 (16 layers, width 1536, 16 heads, 4 KV
heads, FFN 4096, 400B tokens in the paper).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("QKV-norm attention + post-norm FFN (HybridNorm, HybridNorm*) trains at least as well "
         "as pre-norm and more stably than post-norm")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "hybridnorm")
  m, t = c.model, c.train
  m.norm.kind = "hybridnorm_star"
  m.init_std = 0.0  # 1/sqrt(2.5 d)
  m.init_out_scaling = "total_depth"  # Megatron init
  t.b2 = 0.95
  t.log_layer_grad_norms = True  # the gradient-norm profile of Fig. 2
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 16, 1536, 16, 4
    m.channel.d_ff = 4096
    m.attention.rope_theta = 500_000.0
    c.data.seq_len = 4096
    t.lr, t.min_lr_ratio = 3e-4, 0.1
  return c
