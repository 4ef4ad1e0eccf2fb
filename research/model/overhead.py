"""What an option costs: parameters and FLOPs over the same model with that option at default.

For every composition point whose `kind` differs from its registry's default, the model is
rebuilt abstractly (shapes only, no memory) with that one point set back to its default and the
difference is reported. The trainer prints these lines at start, so a run says what its idea
costs (MoDA's +3.7% FLOPs, a hyper-connection's extra streams, PHD's K copies, ...).
"""

from __future__ import annotations

import ml_collections

from research.model import options
from research.model.lm import abstract_model, model_summary

POINTS = ("embed", "residual", "attention", "channel", "linear", "head", "phd")


def overheads(cfg: ml_collections.ConfigDict, seq_len: int) -> list[dict]:
  """[{point, kind, baseline, params, flops_per_token, params_frac, flops_frac}] for each
  non-default point of the (resolved) model config `cfg`; deltas are this model minus the
  model with the point at its default kind."""
  defaults = options.model_defaults()
  mine = None
  out = []
  for point in POINTS:
    kind, base_kind = cfg[point].kind, defaults[point]["kind"]
    if kind == base_kind:
      continue
    mine = mine or model_summary(abstract_model(cfg), seq_len)
    # over every option's default settings: `cfg` (resolved) holds only its own options'
    base_cfg = ml_collections.ConfigDict(defaults)
    base_cfg.update(cfg.to_dict())
    base_cfg[point].kind = base_kind
    base = model_summary(abstract_model(base_cfg), seq_len)
    dp = mine["params"] - base["params"]
    df = mine["flops_per_token_fwd"] - base["flops_per_token_fwd"]
    out.append(dict(point=point, kind=kind, baseline=base_kind, params=dp, flops_per_token=df,
                    params_frac=dp / base["params"], flops_frac=df / base["flops_per_token_fwd"]))
  return out


def describe(o: dict) -> str:
  return (f"{o['point']}.kind={o['kind']} over {o['baseline']}: {o['params']:+,} parameters "
          f"({100 * o['params_frac']:+.2f}%), {o['flops_per_token'] / 1e6:+.3f} MFLOPs/token "
          f"forward ({100 * o['flops_frac']:+.2f}%)")
