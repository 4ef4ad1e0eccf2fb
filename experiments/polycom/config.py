"""PolyCom (Zhuo et al. 2025): polynomial composition activations PolyReLU and PolyNorm in a
two-matrix FFN, parameter-matched to SwiGLU (plain FFNs get 1.5x SwiGLU's hidden width).

  research run polycom                                        # PolyNorm r=3, tiny, char Shakespeare
  research run polycom:scale=smoke                            # seconds; used by the tests
  research run polycom --config.model.channel.activation=polyrelu --config.model.channel.poly_order=2
  research sweep polycom --group activations && research report polycom

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

Kept from the paper's dense recipe (official Megatron scripts): pre-norm RMSNorm, RoPE, AdamW
(0.9, 0.95), weight decay 0.1 (never on the polynomial's coefficients: they are vectors), clip
1.0, cosine, init N(0, 1/(2.5 d)) with output projections scaled by 1/sqrt(2L). fp32 on CPU.
The `paper` scale is the "1.3B" dense model: 24 layers, width 2048, 16 heads, SwiGLU width 5504
(plain activations 8256), context 4096.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("PolyNorm / PolyReLU activations lower LM loss vs SwiGLU, GELU and ReLU^2 at equal "
         "parameters")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "polycom")
  m, t = c.model, c.train
  m.channel.activation = "polynorm"
  m.channel.poly_order = 3
  m.init_std = 0.0  # 1/sqrt(2.5 d)
  t.b2 = 0.95
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 24, 2048, 16
    m.channel.d_ff = 8256  # 1.5 x 5504 for the two-matrix PolyNorm FFN
    m.head.tie_embeddings = False
    c.data.seq_len = 4096
    t.lr, t.min_lr_ratio = 3e-4, 0.1
  return c
