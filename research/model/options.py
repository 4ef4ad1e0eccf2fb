"""Every composition point in one place, and the model config assembled from them.

Importing this module imports every family file (which registers its options). Each point is a
`Switch` (research/model/registry.py): the key that selects an option, its default, and the
settings each option reads (`Option.defaults`, merged with its point's base). From them:

  model_defaults()  the `model.<point>` sections of the default config: each switch at its
                    default and every option's settings (so an experiment or a command line
                    can set a setting of an option before selecting it)
  resolve_model(c)  the model's derived fields, each option's own (its `resolve` hook)
  select(d)         a resolved config's dict without the settings of the options it does not
                    select: what a run's config.json holds, and what sweeps compare

A new family file is added to the imports and POINTS here; a new option of an existing family
touches only its family file.
"""

from __future__ import annotations

import copy

from research import config as config_lib
from research.errors import ConfigError
from research.model import attention, embedding, ffn, head, linear, norms, phd, prefill, residual
from research.model import memory, moda, moe, recurrent, routers  # noqa: F401  (register channel and sequence mixers)
from research.model.lm import scan_unsupported
from research.model.option import merge_settings

POINTS = (embedding.EMBEDDINGS, residual.RESIDUALS, norms.NORM_PLACEMENTS,
          attention.SEQUENCE_MIXERS, ffn.CHANNEL_MIXERS, linear.LINEARS, head.HEADS)


def switches():
  """Every switch of the model config: the points' registries, the prefill kind, the MoE
  router (after the channel point, whose moe section it extends) and token repetition
  (model.phd.kind)."""
  return ([registry.switch() for registry in POINTS]
          + [prefill.SWITCH, routers.SWITCH, phd.SWITCH])


def _split(config_key: str) -> tuple[list[str], str]:
  """"model.channel.kind" -> (["channel"], "kind"): the section under `model` and the leaf."""
  parts = config_key.split(".")
  if parts[0] != "model":
    raise ValueError(f"switch {config_key} is not under model.")
  return parts[1:-1], parts[-1]


def _section(root: dict, path: list[str]) -> dict:
  for p in path:
    root = root.setdefault(p, {})
  return root


def model_defaults() -> dict:
  """{point: {switch: default kind, ...every option's settings}} (nested dicts) for `model`."""
  out: dict = {}
  for s in switches():
    path, leaf = _split(s.config_key)
    section = _section(out, path)
    section[leaf] = s.default
    for kind, settings in s.settings.items():
      merge_settings(section, settings, "model." + ".".join(path), kind)
  return out


def _drop(d: dict, dotted: str) -> None:
  """Removes key `dotted` from nested dict `d`, and the groups it leaves empty."""
  head_, _, rest = dotted.partition(".")
  if head_ not in d:
    return
  if not rest:
    del d[head_]
    return
  if isinstance(d[head_], dict):
    _drop(d[head_], rest)
    if not d[head_]:
      del d[head_]


def select(config: dict) -> dict:
  """A copy of `config` (a config's dict) without the settings that only options it does not
  select read. Settings outside every option (the core sizes, data, train) stay."""
  owned, kept = set(), set()
  for s in switches():
    selected = config_lib.get_dotted(config, s.config_key, s.default)
    prefix = s.config_key.rsplit(".", 1)[0] + "."
    for kind, settings in s.settings.items():
      keys = set(config_lib.flat_keys(settings, prefix))
      owned |= keys
      if selected == kind:
        kept |= keys
  out = copy.deepcopy(config)
  for key in sorted(owned - kept):
    _drop(out, key)
  return out


def resolve_model(m) -> None:
  """Fills the derived fields of `m` (config.model, a ConfigDict, in place) and checks them."""
  # A norm placement may put norms inside attention (HybridNorm: QKV-norm); merge them so the
  # saved config says what runs.
  implied = norms.NORM_PLACEMENTS.get(m.norm.kind).attention_norms
  found = attention.check_attention_norms(m.attention.norms + implied)
  m.attention.norms = "".join(x for x in attention.ATTENTION_NORMS if x in found)
  if m.channel.d_ff == 0:
    # A gated FFN (3 matrices) at 8/3 d, rounded up to ff_multiple_of (LLaMA); a plain one
    # (2 matrices) at 1.5x that width, so both have the same parameters (PolyCom's matching).
    mult = m.channel.ff_multiple_of
    gated = int(mult * -(-int(8 / 3 * m.d_model) // mult))
    m.channel.d_ff = gated if ffn.is_gated(m.channel.activation) else 3 * gated // 2
  ffn.CHANNEL_MIXERS.get(m.channel.kind).resolve(m)  # its own derived fields (moe, memory)
  phd.settings(m)  # token repetition: its values and the options it runs with
  if m.scan_blocks != "off":
    why = scan_unsupported(m)
    if why and m.scan_blocks == "on":
      raise ConfigError(f"model.scan_blocks=on needs identical blocks that write nothing "
                        f"across layers: {why}; set model.scan_blocks=off (or auto)")
    m.scan_blocks = "off" if why else "on"
