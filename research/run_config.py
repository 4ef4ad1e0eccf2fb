"""A run's whole config: the core (research/config.py) and every composition point's section,
assembled from the options that the registries hold (research/model/options.py).

  c = default_config()       # every option's settings at their defaults
  c.model.channel.kind = "moe"; c.model.channel.moe.top_k = 1
  c = resolve(c)             # derived fields filled and checked; unselected options' settings gone

A resolved config holds only the settings its run reads: that is what config.json stores and
what sweeps compare. `expand` reads a stored one back (old runs stored every option's settings;
both load).
"""

from __future__ import annotations

import ml_collections

from research import config as config_lib
from research import eval as eval_lib
from research.model import options


def default_config() -> ml_collections.ConfigDict:
  c = config_lib.core_config()
  sections = options.model_defaults()
  for name, section in sections.items():
    c.model[name] = ml_collections.ConfigDict(section)
  return c


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills derived values (0 = "derive"), checks the combination and drops the settings of the
  options not selected; returns a new config."""
  c = ml_collections.ConfigDict(config.to_dict())
  config_lib.resolve_core(c)
  eval_lib.load(c.eval.evaluators)  # an unknown evaluator fails here, before anything trains
  options.resolve_model(c.model)
  config_lib.check_expand(c)  # against the derived widths
  return ml_collections.ConfigDict(read_settings(c.to_dict()))


def read_settings(config: dict) -> dict:
  """A copy of `config` (a config's dict, resolved or as a run stored it) holding only the
  settings its run reads: the settings of options it does not select are dropped."""
  d = options.select(config)
  train = d.get("train", {})
  if train.get("optimizer") != "lowbit_adamw":  # the low-bit states' settings only when used
    train.pop("lowbit", None)
  if not train.get("expand", {}).get("step"):  # the width expansion's only when it runs
    train.pop("expand", None)
  return d


def expand(saved: dict) -> ml_collections.ConfigDict:
  """The config of a stored dict (config.json's "config", or a resolved config's dict) over
  today's defaults: settings added since, and those of options it did not select, read as
  their defaults."""
  c = default_config()
  c.update(saved)
  return c
