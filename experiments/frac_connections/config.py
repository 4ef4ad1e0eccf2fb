"""Frac-Connections (Zhu et al. 2025): the residual stream of width D split into m fractions of
D/m that hyper-connection-style weights read, write and mix; the state stays D wide.

  research run frac_connections                           # DFC x4, tiny (16 x 64), char Shakespeare
  research run frac_connections:variant=sfc2              # static, m = 2
  research run frac_connections:variant=dhc2              # hyper-connections, for comparison
  research run frac_connections:scale=smoke               # seconds; used by the tests
  research sweep frac_connections --group frac_rate && research report frac_connections

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed, variant
(pre | sfc<m> | dfc<m> | shc<n> | dhc<n>, optionally with _notanh; default dfc4).

The tiny scale is the deep-narrow one of hyper_connections (16 blocks of width 64, 4 heads), so
the two experiments' arms are directly comparable; with m = 4 a fraction is 16 wide. AdamW
(0.9, 0.95), weight decay 0.1 on matrices only (never on the static weights or the scales).
The `paper` scale is the dense OLMo2-1B2 of Table 4 (16 layers, width 2048, 16 heads, context
4096) with DFC x4.
"""

from research.config import apply_overrides
from research.experiments import load_config_module
from research.scales import SCALES, scaled_config_with_args  # noqa: F401  (SCALES: `research list`)

CLAIM = ("frac-connections (m fractions of the stream, dynamic) lower LM loss vs the pre-norm "
         "residual at no extra state memory, landing between it and hyper-connections")
DEFAULT_VARIANT = "dfc4"


def variant_overrides(variant: str) -> dict:
  """Config overrides of a variant name: hyper_connections' naming of the papers' rows."""
  return load_config_module("hyper_connections").variant_overrides(variant, "frac_connections")


def get_config(arg: str = ""):
  c, a = scaled_config_with_args(arg, "frac_connections", {"variant": DEFAULT_VARIANT})
  scale = a["scale"]
  m, t = c.model, c.train
  apply_overrides(c, variant_overrides(a["variant"]))
  # The codebase's init, 1/sqrt(2.5 d) (0.079 at width 64), as SDD, HybridNorm and PolyCom use:
  # the shared 0.02 handicaps the 16 x 64 pre-norm baseline by 0.06 nats (README, init).
  m.init_std = 0.0
  t.b2 = 0.95
  t.log_layer_grad_norms = True
  if scale == "tiny":
    m.num_layers, m.d_model, m.num_heads = 16, 64, 4
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 16, 2048, 16
    m.channel.d_ff = 8192
    c.data.seq_len = 4096
    t.lr = 4e-4
  return c
