"""DeltaProduct (Siems et al. 2025): n_h steps of the delta rule per token, so the state's
transition is a product of n_h generalised Householder matrices (diagonal plus rank n_h);
with beta in (0, 2) their eigenvalues reach -1, which the paper ties to state tracking and
length extrapolation.

  research run deltaproduct                            # DeltaProduct_2 [-1, 1] at the tiny scale
  research run deltaproduct --config.model.attention.deltaproduct.householder=1   # DeltaNet at
                                                       # n_h = 2's FFN width (the sweep's arm
                                                       # matches its parameters: d_ff 304)
  research run deltaproduct:scale=smoke                # seconds; used by the tests
  research sweep deltaproduct && research report deltaproduct

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The tiny scale is the recurrent-mixer setting shared with retnet, gla and matmul_free (4 x 128,
context 64, the length-extrapolation evaluator). The layer as the released code's
GatedDeltaProduct: 4 heads of 32, short causal convolutions (kernel 4, SiLU) on q, k, v, L2-
normalised q and k, beta = sigmoid(x w) (x 2 with negative eigenvalues), per-head RMSNorm x
swish gate, no forget gate (the code's config default; `deltaproduct.gate`). W_k, W_v and w_beta
grow n_h-fold; the FFN gives the difference back so every arm has the softmax baseline's
parameters (d_ff 216 at n_h = 2). The chunkwise form runs the delta rule over the interleaved
n_h T sub-steps (chunks of 16 sub-steps).
"""

from research.scales import SCALES, apply_recurrent_setting, match_dense_params, scaled_config  # noqa: F401

CLAIM = ("more Householder steps per token (n_h = 2, 3) with eigenvalues in [-1, 1] improve LM "
         "loss over DeltaNet at equal parameters and extrapolate much better in length")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "deltaproduct")
  apply_recurrent_setting(c)
  m = c.model
  m.attention.kind = "deltaproduct"
  if scale == "paper":  # a few-hundred-million model as the paper's LM runs (sizes not stated)
    m.num_layers, m.d_model, m.num_heads = 24, 1024, 4
    c.train.lr = 3e-4
  m.attention.chunk = 64 if scale in ("small", "paper") else 16
  return match_dense_params(c)
