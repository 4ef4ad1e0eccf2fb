"""PHD-Transformer (Wu et al. 2025, "Efficient Pretraining Length Scaling", arXiv:2504.14992):
each token is run K times in pretraining, only the first copy writing the K/V that later tokens
see, so the KV cache stays at the plain model's size; PHD-SWA / PHD-CSWA let the hidden copies
see a (chunked) sliding window of earlier hidden copies.

  research run phd_transformer                         # PHD-CSWA-2-16-32 at the tiny scale
  research run phd_transformer --config.model.phd.kind=none       # the vanilla Transformer
  research run phd_transformer --config.model.phd.kind=phd --config.model.phd.repeats=3
  research run phd_transformer:scale=smoke             # seconds; used by the tests
  research sweep phd_transformer --group main          # then window, chunk, flops
  research report phd_transformer

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

model.phd (research/model/phd.py): kind none | naive | phd | swa | cswa, repeats K, window W
and window_unit (tokens: the W preceding hidden tokens, the default; positions), chunk C,
positions (same: every copy at its token's RoPE position, the default; flat). Token counts are
original tokens: a step holds batch x seq_len of them and K x that many copies run the blocks.
The tiny scale is the shared character-level decoder (4 x 128, batch 12, 2000 steps) at 128
original tokens per window (the digest's t = 128). `paper` is the 1.2B main model (16 x 2048,
32 / 8 heads of 64, SwiGLU 8192: the paper's "FFN 16384" read as OLMo's gate-and-up width) as
PHD-CSWA-2-16-32, at the shared paper scale's 2048 tokens (the paper does not give its length).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("repeating each token K times in pretraining (PHD: only the original writes visible "
         "KV, so the KV cache stays vanilla) lowers the loss, more with larger K and with a "
         "sliding window over hidden tokens (PHD-SWA / CSWA)")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "phd_transformer")
  m = c.model
  p = m.phd
  p.kind, p.repeats, p.window, p.chunk = "cswa", 2, 16, 32  # PHD-CSWA-2-16-32 (Table 1)
  if scale == "smoke":
    p.window, p.chunk = 4, 8
  elif scale == "tiny":
    c.data.seq_len = 128
  elif scale == "paper":
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 16, 2048, 32, 8, 64
    m.channel.d_ff = 8192
  return c
