"""Scaling Law for Quantization-Aware Training (Chen et al. 2025, arXiv:2505.14302): the loss
gap of 4-bit QAT over full precision, delta(N, D, G) = k D^g_D (log2 G)^g_G / N^g_N, falls
with model size N, rises with training tokens D and with the group size G; activations (above
all FC2's input) dominate it.

  research run qat_scaling                             # W4A4, G = 32, d = 128, 4M tokens
  research run qat_scaling:scale=smoke                 # seconds; used by the tests
  research sweep qat_scaling --group fp32              # the full-precision grid
  research sweep qat_scaling --group w4a4              # W4A4 at G = 16, 32, 64
  research sweep qat_scaling --group split             # W4A16, W16A4, W4A4 with FC2 at 8 bits
  research sweep qat_scaling --group seeds             # seed noise of delta at one cell
  research report qat_scaling                          # delta table, fits, held-out corner

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed, width (d_model),
tokens (training tokens, millions).

`model.linear.kind = qat` (research/model/linear.py): every projection of the blocks with
AbsMax fake quantization of its kernel (groups of G along the input) and its input (groups of
G per token), straight-through gradients; embeddings and the head in full precision. The tiny
scale (the digest's grid): 4 layers of width d (head size 32; FFN 8/3 d rounded up to a
multiple of 64 so every G divides FC2's input), character-level WikiText-2 (10.8M training
characters: every D stays within one epoch), batch 12 x 64, cosine lr 1e-3 to 1e-4 over
D / 768 steps, 100 warmup steps.
"""

from research.errors import ConfigError
from research.scales import SCALES, scaled_config_with_args  # noqa: F401

CLAIM = ("the 4-bit QAT loss gap falls with model size, rises with tokens and group size, and "
         "is dominated by activations, chiefly FC2's input")

TOKENS_PER_STEP = 12 * 64


def ffn_width(d: int) -> int:
  return -(-(8 * d) // (3 * 64)) * 64


def get_config(arg: str = ""):
  c, a = scaled_config_with_args(arg, "qat_scaling", {"width": 128, "tokens": 4.0})
  scale = a["scale"]
  if not a["corpus"] and scale in ("smoke", "tiny"):
    c.data.corpus, c.data.tokenizer = "wikitext2", a["tokenizer"] or "char"
  m, t = c.model, c.train
  m.linear.kind = "qat"
  m.linear.qat.w_bits, m.linear.qat.a_bits, m.linear.qat.group = 4, 4, 32
  if scale == "tiny":
    d = a["width"]
    m.d_model, m.num_heads, m.channel.d_ff = d, d // 32, ffn_width(d)
    t.steps = max(int(round(a["tokens"] * 1e6 / TOKENS_PER_STEP)), 1)
    t.checkpoint_every = max(t.steps // 2, 1)
    c.eval.every = max(t.steps // 4, 1)
  elif scale == "smoke":
    m.linear.qat.group = 16  # width 32: groups of 16
  if scale != "tiny" and (a["width"], a["tokens"]) != (128, 4.0):
    raise ConfigError(f"qat_scaling: width and tokens set the tiny grid's cells; scale={scale} "
                      "has its own size")
  return c
