"""Scale-Distribution Decoupling (Wang et al. 2025): every linear layer y = alpha * norm(x V),
so the normalization fixes the output's scale and a per-channel gain alpha sets it.

  research run sdd                                 # post-norm + SDD, tiny, char Shakespeare
  research run sdd:scale=smoke                     # seconds; used by the tests
  research run sdd --config.model.norm.kind=pre    # SDD on a pre-norm model
  research sweep sdd --group grid && research report sdd

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

SDD replaces every projection of every block (q, k, v, attention output, FFN gate, up and down;
not the embedding or the head), as the paper's Fig. 2 draws it. Output projections start with
alpha = 1/sqrt(2L) (the official code; the paper writes 1/sqrt(L)) and no depth scaling on the
weights; other gains start at 1; weights N(0, 1/(2.5 d)) everywhere. Non-SDD arms use the same
std with output projections scaled by 1/sqrt(2L). AdamW (0.9, 0.95), weight decay 0.1 on
matrices only (alpha is not decayed), clip 1.0, cosine.
The `paper` scale is SDD-1B: 16 layers, width 2048, 32 heads, 8 KV heads, SwiGLU 8192.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("SDD linear layers make post-norm trainable and robust, and beat a pre-norm baseline")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "sdd")
  m, t = c.model, c.train
  m.norm.kind = "post"
  m.linear.kind = "sdd"
  m.init_std = 0.0  # 1/sqrt(2.5 d)
  t.b2 = 0.95
  t.log_layer_grad_norms = True  # the gradient-norm profile of Fig. 7
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 16, 2048, 32, 8
    m.channel.d_ff = 8192
    m.attention.rope_theta = 500_000.0
    c.data.seq_len = 4096
    t.lr, t.min_lr_ratio = 3e-4, 0.1
  return c
