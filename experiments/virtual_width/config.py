"""Virtual Width Networks (Seed 2025): the embedding and the residual state widened to
D' = r d_model while attention and FFN keep width d_model; generalized hyper-connections (GHC)
compress the wide state into each sublayer's input and expand its output back.

  research run virtual_width                              # r = 4, m = 2, + MTP, tiny (16 x 64)
  research run virtual_width:variant=vwn1.5               # r = 1.5: (m, n) = (2, 3), slots of 32
  research run virtual_width:variant=vwn8_m4_mtp          # r = 8, m = 4, next-2-token head
  research run virtual_width:variant=pre                  # the pre-norm baseline (untied head)
  research run virtual_width:scale=smoke                  # seconds; used by the tests
  research sweep virtual_width --group width && research report virtual_width

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed, variant
(pre | vwn<r>, optionally _m<m> (fraction rate, default 2) and _mtp; default vwn4_mtp).

Every arm, the baseline included, has an untied head: the [vocab, D'] over-width table cannot be
tied to the d_model-wide head. The tiny scale is the deep-narrow one of hyper_connections (16
blocks of width 64, 4 heads), so the backbone is the same in every arm and only the virtual
width changes. The fraction rate is m = 2 (the paper's 1.5x setting (m, n) = (2, 3)): at
d_model 64 a slot is 32 wide, and the mixing cost per token, about r m D (1 + r), stays
affordable on a CPU at r = 8. DGHC (dynamic, tanh, scale matrices of ones, logits divided by
sqrt(D/m)); a group norm (groups of d_model) before W_reduce where D' is a multiple of d_model
(not at 1.5x, as in the paper); the MTP head adds 0.3 x the next-2-token loss
(`model.head.mtp_weight`; the paper gives no weight). AdamW (0.9, 0.95), weight decay 0.1 on
matrices only.
The `paper` scale uses the shared 7B-shaped backbone with (m, n) = (8, 64), r = 8 and MTP, the
setting of the paper's largest run (its backbone sizes are internal); for planning only.
"""

import re

from research.config import apply_overrides
from research.errors import ConfigError
from research.scales import SCALES, scaled_config_with_args  # noqa: F401  (SCALES: `research list`)

CLAIM = ("widening only the embedding and residual state (virtual width r) lowers LM loss "
         "log-linearly in r at the same backbone compute, more so with an MTP head")
DEFAULT_VARIANT = "vwn4_mtp"
_VARIANT = re.compile(r"(?:pre|vwn(?P<r>\d+(?:\.\d+)?)(?:_m(?P<m>\d+))?)(?P<mtp>_mtp)?")


def variant_overrides(variant: str) -> dict:
  """Config overrides of a variant name: pre or vwn<r>, optionally _m<m>, then optionally _mtp."""
  match = _VARIANT.fullmatch(variant)
  if not match:
    raise ConfigError(f"virtual_width: unknown variant '{variant}' "
                      "(expected pre or vwn<r>, optionally with _m<m> and _mtp)")
  out = {"model.head.kind": "mtp" if match["mtp"] else "plain"}
  if match["r"] is None:
    return {"model.residual.kind": "plain", "model.embed.kind": "plain", **out}
  return {"model.residual.kind": "vwn", "model.embed.kind": "over_width",
          "model.residual.expansion": float(match["r"]),
          "model.residual.fracs": int(match["m"] or 2), **out}


def get_config(arg: str = ""):
  c, a = scaled_config_with_args(arg, "virtual_width", {"variant": DEFAULT_VARIANT})
  scale = a["scale"]
  m, t = c.model, c.train
  m.head.tie_embeddings = False
  apply_overrides(c, variant_overrides(a["variant"]))
  # The codebase's init, 1/sqrt(2.5 d) (0.079 at width 64), as SDD, HybridNorm and PolyCom use:
  # the shared 0.02 handicaps the 16 x 64 pre-norm baseline by 0.06 nats (README, init).
  m.init_std = 0.0
  t.b2 = 0.95
  t.log_layer_grad_norms = True
  if scale == "tiny":
    m.num_layers, m.d_model, m.num_heads = 16, 64, 4
  if scale == "paper":
    apply_overrides(c, {"model.residual.expansion": 8.0, "model.residual.fracs": 8})
  return c
