"""RetNet (Sun et al. 2023): retention, a causal exponentially decayed linear attention with a
fixed decay gamma per head, in parallel, recurrent and chunkwise forms that compute the same
function; gated multi-scale retention (MSR) replaces softmax attention in a pre-norm decoder.

  research run retnet                                  # RetNet at the tiny scale
  research run retnet --config.model.attention.form=parallel   # the same model, parallel form
  research run retnet:scale=smoke                      # seconds; used by the tests
  research sweep retnet && research report retnet      # the Table 6 ablations

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the recurrent-mixer setting shared with gla, deltaproduct and matmul_free
(`scales.apply_recurrent_setting`: the shared tiny decoder, 4 x 128, context 64, and the
length-extrapolation evaluator). MSR as the paper: 4 heads, d_k = 32, d_v = 2 d_k (W_V, W_G
d -> 2d, W_O 2d -> d: 8 d^2), the FFN narrowed so that the model has the softmax baseline's
parameters (`scales.match_dense_params`: d_ff 184 instead of 352). Decays: the paper's
experiments' log-spaced gamma = 1 - exp(linspace(log 1/32, log 1/512, H)) (eq. 8's 1 - 2^(-5-h)
is `retention.decay = eq8`). Per-head RMS norm without gain (the code's RMSNorm revision), no
biases, q and k rotated by position (RoPE's rotate-half with theta 10^4). Norms 2 and 3 of
section 2.2 are per-(row, head) scales the head norm cancels, so they are not applied; without
the head norm, norm 2 (a function of the position) is.
"""

from research.scales import SCALES, apply_recurrent_setting, match_dense_params, scaled_config  # noqa: F401

CLAIM = ("retention (fixed per-head decay, three equivalent forms) matches a Transformer's LM "
         "loss with O(1) decoding state; each MSR component (swish gate, head norm, decay, "
         "multi-scale decay, large heads) lowers perplexity (Table 6)")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "retnet")
  apply_recurrent_setting(c)
  m = c.model
  m.attention.kind = "retention"
  if scale == "paper":  # the 1.3B of Table 2: 24 x 2048, d_k 256 (8 heads), sequence 2048
    m.num_layers, m.d_model, m.num_heads = 24, 2048, 8
    c.train.lr, c.train.b2, c.train.weight_decay = 6e-4, 0.98, 0.05
    c.train.warmup_steps = 375
  m.attention.chunk = 64 if scale in ("small", "paper") else 16
  return match_dense_params(c)
