"""Hyper-Connections (Zhu et al., ICLR 2025): n copies of the residual stream joined to every
sublayer by learned read / write / mix weights, static (SHC) or input-dependent (DHC).

  research run hyper_connections                          # DHC x4, tiny (16 x 64), char Shakespeare
  research run hyper_connections:variant=shc2             # static, n = 2
  research run hyper_connections:variant=dhc4_notanh      # dynamic without tanh
  research run hyper_connections:variant=pre              # the pre-norm residual baseline
  research run hyper_connections:scale=smoke              # seconds; used by the tests
  research sweep hyper_connections --group table1 && research report hyper_connections

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed, variant
(pre | shc<n> | dhc<n> | sfc<m> | dfc<m>, optionally with _notanh; default dhc4).

The tiny scale is deep and narrow (16 blocks of width 64, 4 heads; the shared tiny context,
batch, steps and lr), where the paper expects the pre-norm residual to collapse: the same
FLOPs per token as the shared 4 x 128 tiny model, more sequential depth. AdamW (0.9, 0.95),
weight decay 0.1 on matrices only (so never on the static connection weights or the scales,
as the paper says); per-block gradient norms are logged and the connection matrices plotted
at the end of each run (connections.png).
The `paper` scale is OLMo-1B with DHC x4 (16 layers, width 2048, 16 heads, 500B tokens there).
"""

import re

from research.config import apply_overrides
from research.errors import ConfigError
from research.scales import SCALES, scaled_config_with_args  # noqa: F401  (SCALES: `research list`)

CLAIM = ("hyper-connections (n >= 2 streams, dynamic) lower LM loss vs the pre-norm residual "
         "and reduce adjacent-layer similarity; n = 1 does not help")
DEFAULT_VARIANT = "dhc4"


_VARIANT = re.compile(r"(?P<kind>[sd])(?P<family>hc|fc)(?P<rate>\d+)(?P<notanh>_notanh)?")


def variant_overrides(variant: str, experiment: str = "hyper_connections") -> dict:
  """Config overrides of a connection variant name, as the papers name their rows: `pre` (the
  plain residual), `shc<n>` / `dhc<n>` (static / dynamic hyper-connections, n streams) and
  `sfc<m>` / `dfc<m>` (frac-connections, m fractions), each optionally with `_notanh`. The
  frac_connections experiment names its rows the same way and reads them here."""
  if variant == "pre":
    return {"model.residual.kind": "plain"}
  match = _VARIANT.fullmatch(variant)
  if not match:
    raise ConfigError(f"{experiment}: unknown variant '{variant}' (expected pre, shc<n>, dhc<n>, "
                      "sfc<m> or dfc<m>, optionally with _notanh)")
  rate = int(match["rate"])
  out = {"model.residual.dynamic": match["kind"] == "d", "model.residual.tanh": not match["notanh"]}
  if match["family"] == "fc":
    return {"model.residual.kind": "frac", "model.residual.fracs": rate, **out}
  return {"model.residual.kind": "hyper", "model.residual.streams": rate, **out}


def get_config(arg: str = ""):
  c, a = scaled_config_with_args(arg, "hyper_connections", {"variant": DEFAULT_VARIANT})
  scale = a["scale"]
  m, t = c.model, c.train
  apply_overrides(c, variant_overrides(a["variant"]))
  # The codebase's init, 1/sqrt(2.5 d) (0.079 at width 64), as SDD, HybridNorm and PolyCom use:
  # the shared 0.02 handicaps the 16 x 64 pre-norm baseline by 0.06 nats (README, init).
  m.init_std = 0.0
  t.b2 = 0.95
  t.log_layer_grad_norms = True  # the gradient-norm profile over depth
  if scale == "tiny":
    m.num_layers, m.d_model, m.num_heads = 16, 64, 4
  if scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 16, 2048, 16
    m.channel.d_ff = 8192
    c.data.seq_len = 2048
    t.lr = 4e-4
  return c
