"""Every composition point in one place: importing this module imports every family file (which
registers its options), and `unread_settings` says which settings of a config its run never
reads, from what each option declares (`Option.settings`), for research/sweep.py's matching of
runs. A new family file is added to the imports and POINTS here; a new option of an existing
family touches only its family file.
"""

from __future__ import annotations

from research import config as config_lib
from research.model import attention, embedding, ffn, head, linear, norms, prefill, residual
from research.model import memory, moda, moe  # noqa: F401  (register channel and sequence mixers)

POINTS = (embedding.EMBEDDINGS, attention.SEQUENCE_MIXERS, ffn.CHANNEL_MIXERS,
          norms.NORM_PLACEMENTS, residual.RESIDUALS, linear.LINEARS, head.HEADS)
# switches that select among settings without being registries: (config key, {kind: prefixes})
OTHER_SWITCHES = ((prefill.CONFIG_KEY, prefill.SETTINGS),)
SWITCHES = frozenset([r.config_key for r in POINTS] + [key for key, _ in OTHER_SWITCHES])


def _settings_by_switch():
  """(config key, {kind: the settings only that kind reads}) for every switch."""
  for registry in POINTS:
    yield registry.config_key, {n: registry.get(n).settings for n in registry.names()}
  yield from OTHER_SWITCHES


def unread_settings(config: dict) -> tuple[str, ...]:
  """Config key prefixes the run of `config` (a resolved config's dict) never reads: the
  settings of every option it does not select, except those its selected option reads too. The
  switches themselves are never among them (SWITCHES: callers keep those)."""
  out = []
  for key, by_kind in _settings_by_switch():
    selected = config_lib.get_dotted(config, key)
    own = by_kind.get(selected, ())
    out += [p for kind, prefixes in by_kind.items() if kind != selected
            for p in prefixes if p not in own]
  return tuple(dict.fromkeys(out))
