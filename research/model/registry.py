"""A registry per composition point: option name -> module class.

A paper adds its option with `@FAMILY.register("name")` in the family's file; the decoder looks
options up by the name in `config.model.<point>.kind`. An unknown name is an error that lists
the registered ones. A registry with a `base` takes only subclasses of it whose public names are
the base's declared hooks or the option's own API (research/model/option.py).

A `Switch` is what the run config sees of a registry: the key that selects an option, its
default option, and the settings each option reads (research/model/options.py assembles the
model config from every switch and drops the settings of the options a run does not select).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, TypeVar

from research.errors import ConfigError
from research.model.option import check_declared, settings_of

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Switch:
  """config_key (e.g. model.channel.kind) selects one of `settings`' kinds; settings: kind ->
  the nested settings that kind reads, relative to the key's section (model.channel), with
  their default values."""
  config_key: str
  default: str
  settings: dict


class Registry:

  def __init__(self, config_key: str, base: type | None = None, default: str | None = None):
    self.config_key = config_key
    self.base = base  # the composition point's Option class (research/model/option.py)
    self.default = default  # the option a config selects unless told otherwise
    self._entries: dict[str, object] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.config_key}: option '{name}' is registered twice")
      if self.base is not None:
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
          raise ValueError(f"{self.config_key}: option '{name}' is not a subclass of "
                           f"{self.base.__name__}, the base that declares this point's hooks")
        check_declared(obj, self.config_key)
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str):
    if name not in self._entries:
      close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.4)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(
          f"unknown {self.config_key} '{name}'{hint} (registered: {', '.join(sorted(self._entries))})")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def switch(self) -> Switch:
    """This point as the run config sees it (needs a `base` and a `default`)."""
    section = self.config_key.rsplit(".", 1)[0]
    return Switch(self.config_key, self.default,
                  {n: settings_of(self._entries[n], section) for n in self.names()})

  def __contains__(self, name: str) -> bool:
    return name in self._entries
