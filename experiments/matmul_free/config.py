"""Scalable MatMul-free Language Modeling (Zhu et al. 2024): every dense layer a ternary
BitLinear (weights in {-1, 0, +1} x one scale, 8-bit activations) and the token mixer an
element-wise gated recurrence (MLGRU), so the model needs no multiplication of two learned or
activation matrices outside the embedding and the head.

  research run matmul_free                             # the MatMul-free LM at the tiny scale
  research run matmul_free --config.model.linear.kind=plain     # its full-precision twin
  research run matmul_free:scale=smoke                 # seconds; used by the tests
  research sweep matmul_free && research report matmul_free

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the recurrent-mixer setting shared with retnet, gla and deltaproduct (4 x
128, context 64, the length-extrapolation evaluator). MLGRU as the released code: W_f, W_c,
W_g, W_o of d x d (4 d^2, attention's count; d_ff matched to 352), the HGRN forget-gate lower
bound cumsum(softmax(P)) - softmax(P)[0] over layers (P zero at init), the output
RMSNorm(x W_g) x silu(h) (`mlgru.output = paper`: sigmoid(x W_g) x h); BitLinear with its own
RMSNorm (eps 1e-8, gain), per-token absmax 8-bit activations, per-tensor absmean ternary
weights, straight-through estimators, fp32 latent weights; the embedding and the (tied) head in
full precision. The recurrence runs as an associative scan (`model.attention.form = scan`,
the same function as the chunkwise form, measured 1.7x faster per tiny step). The learning rate is the shared setting's 1e-3 for every arm (the paper's
"ternary wants larger rates" is the lr group).
"""

from research.scales import SCALES, apply_recurrent_setting, match_dense_params, scaled_config  # noqa: F401

CLAIM = ("a ternary, MatMul-free LM (BitLinear + MLGRU) stays close to a full-precision "
         "Transformer++; the forget-gate lower bound helps")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "matmul_free")
  apply_recurrent_setting(c)
  m = c.model
  m.attention.kind = "mlgru"
  m.attention.form = "scan"  # the associative scan: 1.7x faster than chunkwise for d_k = d_v = 1
  m.linear.kind = "bitlinear"
  if scale == "paper":  # MMfreeLM-1.3B: 24 x 2048
    m.num_layers, m.d_model, m.num_heads = 24, 2048, 16
    c.train.lr = 1.5e-3
  return match_dense_params(c)
