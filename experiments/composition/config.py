"""Composition (issue 31): the scoreboard's resolved gains at the common scoreboard setting, each
alone, in pairs and together, against one dense baseline.

  research run composition                               # DHC x4 + MoDA, tiny (common setting)
  research run composition:variant=vwn4_moda             # VWN r = 4 + MoDA
  research run composition:variant=pre                   # the common baseline
  research run composition:variant=hc4_phd               # DHC x4 + PHD-CSWA-2-16-32
  research run composition:scale=smoke                   # seconds; used by the tests
  research sweep composition && research report composition

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed, variant: parts
joined by `_` from hc4 (dynamic hyper-connections, n = 4, tanh: hyper_connections' `dhc4`),
moda (MoDA with the FFN-side K/V projection, the paper's default), vwn4 (virtual width r = 4,
m = 2: virtual_width's `vwn4`, untied head), phd (token repetition PHD-CSWA-2-16-32:
phd_transformer's headline arm) and untied (an untied head alone), or `pre` for none; default
hc4_moda.

Every arm starts from the common scoreboard setting (research/scales.py `COMMON_ARG` and
`apply_common_setting`: 4 blocks x 128, 4 heads, char Tiny Shakespeare, init std 1/sqrt(2.5 d)
with output projections scaled 1/sqrt(2L), AdamW (0.9, 0.95)), so each part is measured where
the others are, not at its own paper's shape (16 x 64 for HC and VWN, 12 x 128 with G = 2 for
MoDA). The parts take their settings from their experiments' variant functions, so a change
there changes them here. HC and VWN are both options of one composition point
(`model.residual.kind`): they cannot be combined (VWN's generalized hyper-connections contain
HC's), and a variant naming both is an error; so is one naming moda and phd (the repeated
layout's mask is applied by dense attention only, research/model/phd.py).
The `paper` scale is the shared 7B-shaped backbone with the same parts, for planning only.
"""

from research.config import apply_overrides
from research.errors import ConfigError
from research.experiments import get_sweep, load_config_module
from research.scales import SCALES, apply_common_setting, scaled_config_with_args  # noqa: F401

CLAIM = ("the scoreboard's resolved gains (hyper-connections, MoDA, virtual width, PHD) keep "
         "their gains when combined at the common setting (issue 31's question)")
DEFAULT_VARIANT = "hc4_moda"
RESIDUAL_PARTS = ("hc4", "vwn4")  # options of model.residual.kind: at most one per variant
# every point a part changes, at the common baseline's choice: each variant states them all, so
# a sweep arm's overrides name its whole composition whatever the argument's variant
NONE = {"model.residual.kind": "plain", "model.embed.kind": "plain",
        "model.attention.kind": "dense", "model.head.kind": "plain",
        "model.head.tie_embeddings": True, "model.phd.kind": "none"}
EXCLUSIVE = (("hc4", "vwn4"), ("moda", "phd"))  # pairs of parts that cannot be combined


def part_overrides(part: str) -> dict:
  """Config overrides of one part, read from the experiment that measured it alone."""
  if part == "hc4":
    return load_config_module("hyper_connections").variant_overrides("dhc4")
  if part == "vwn4":
    vwn = load_config_module("virtual_width").variant_overrides("vwn4")
    return {**vwn, "model.head.tie_embeddings": False}  # the D'-wide table has no tied head
  if part == "moda":
    return {"model.attention.kind": "moda"}
  if part == "phd":  # phd_transformer's headline arm (PHD-CSWA-2-16-32)
    sweep = get_sweep("phd_transformer", common=False)
    headline = sweep.headline[0]
    return dict(next(a for a in sweep.groups[headline.group] if a.name == headline.arm).overrides)
  if part == "untied":
    return {"model.head.tie_embeddings": False}
  raise ConfigError(f"composition: unknown part '{part}' (expected hc4, moda, vwn4, phd or "
                    "untied, joined by _, or pre)")


def variant_parts(variant: str) -> list[str]:
  """The parts a variant's name joins with _ (`pre`: none)."""
  return [] if variant == "pre" else variant.split("_")


def variant_overrides(variant: str) -> dict:
  """Config overrides of a variant: the baseline's choices (NONE) with its parts' overrides
  merged over them (`pre`: no part)."""
  parts = variant_parts(variant)
  if len(parts) != len(set(parts)):
    raise ConfigError(f"composition: variant '{variant}' names a part twice")
  for a, b in EXCLUSIVE:
    if a in parts and b in parts:
      why = ("both are model.residual options" if a in RESIDUAL_PARTS else
             "the repeated layout's mask needs dense attention")
      raise ConfigError(f"composition: variant '{variant}' combines {a} and {b} ({why})")
  out = dict(NONE)
  for part in parts:
    out.update(part_overrides(part))
  return out


def get_config(arg: str = ""):
  c, a = scaled_config_with_args(arg, "composition", {"variant": DEFAULT_VARIANT})
  apply_common_setting(c)
  apply_overrides(c, variant_overrides(a["variant"]))
  return c
