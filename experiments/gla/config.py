"""GLA (Yang et al. 2024): gated linear attention, S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t with a
data-dependent forget gate per key dimension, alpha_t = sigmoid(x W1 W2 + b)^(1/tau), trained in
a chunkwise form and decoded with a constant-size state.

  research run gla                                     # GLA at the tiny scale
  research run gla --config.model.attention.gla.gate=none      # linear attention (at GLA's
                                                       # d_ff; the sweep's arm matches: 352)
  research run gla:scale=smoke                         # seconds; used by the tests
  research sweep gla && research report gla

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the recurrent-mixer setting shared with retnet, deltaproduct and matmul_free
(4 x 128, context 64, the length-extrapolation evaluator). The layer as the released code: 4
heads, d_k = d / 2 (expand_k 0.5), d_v = d, q scaled by d_k^-1/2, a low-rank (16) gate with
tau = 16, per-head RMSNorm (the code's; the paper says LayerNorm), a swish output gate without
bias, no positional encoding; its parameters are within 1% of softmax attention's (d_ff
matched: 344 instead of 352). The chunk is 16 tokens: the intra-chunk part is computed exactly
in log space over [chunk, chunk, d_k] (no secondary chunking on CPU).
"""

from research.scales import SCALES, apply_recurrent_setting, match_dense_params, scaled_config  # noqa: F401

CLAIM = ("a data-dependent per-key-dimension forget gate (tau = 16) makes linear attention "
         "competitive with a Transformer++ and better than RetNet-style fixed decay, and it "
         "extrapolates beyond its training length")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "gla")
  apply_recurrent_setting(c)
  m = c.model
  m.attention.kind = "gla"
  if scale == "paper":  # the 1.3B of the released configs: 24 x 2048, 4 heads
    m.num_layers, m.d_model, m.num_heads = 24, 2048, 4
    c.train.lr, c.train.weight_decay = 3e-4, 0.01
  m.attention.chunk = 64 if scale in ("small", "paper") else 16
  return match_dense_params(c)
