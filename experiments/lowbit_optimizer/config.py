"""SOLO (Xu et al. 2025, arXiv:2505.00347): Adam's moments in 2-4 bits, if the quantization
respects EMA dynamics: a logarithmic grid with stochastic rounding for v (against "signal
swamping") and a smaller beta1 for low-bit m.

  research run lowbit_optimizer                        # SOLO 4/2-bit AdamW, tiny scale
  research run lowbit_optimizer:scale=smoke            # seconds; used by the tests
  research run lowbit_optimizer --config.train.optimizer=adamw   # the fp32 reference
  research sweep lowbit_optimizer && research report lowbit_optimizer

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

`train.optimizer = lowbit_adamw` (research/train/lowbit.py): m 4-bit dynamic-exponent codes
with nearest rounding, v 2-bit SOLO log-grid codes (quantile 0.1) with stochastic rounding,
blocks of 128, every tensor of 128 values or more quantized; beta1 0.8 (the official README's
4/2-bit setting), beta2 0.999 (the digest's: swamping needs beta2 near 1). The tiny scale is the
shared one (4 x 128, context 64, character-level Tiny Shakespeare, 2000 steps).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("Adam's states in 4/2 or 2/2 bits train as well as fp32 when v uses a log grid with "
         "stochastic rounding and m a smaller beta1; naive low-bit states degrade")


def get_config(arg: str = ""):
  c, _ = scaled_config(arg, "lowbit_optimizer")
  t = c.train
  t.optimizer = "lowbit_adamw"
  t.b1, t.b2 = 0.8, 0.999
  q = t.lowbit
  q.m_bits, q.m_grid, q.m_rounding = 4, "de", "nearest"
  q.v_bits, q.v_grid, q.v_rounding = 2, "qema", "stochastic"
  return c
