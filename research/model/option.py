"""The base of every registered option: its composition point's hooks, declared.

Each composition point (a registry: `model.channel.kind`, `model.head.kind`, ...) has a base
class deriving from `Option` that lists in `HOOKS` every name the decoder, the config resolver,
the optimizer or the accounting reads from an option of that point, and defines each one: an
explicit no-op or default where an option may leave it out, or a method that raises where every
option must define it. Callers call hooks directly: there is no `hasattr` probe, so a hook that
an option misspells is not silently skipped. `Registry.register` refuses an option class that
defines a public name which is neither a hook of its point nor listed in the option's own `API`
(the methods it offers its family's other modules, such as DenseAttention's steps that MoDA
reuses), naming the closest hook.
"""

from __future__ import annotations

import difflib

from flax import nnx

_MODULE_NAMES = frozenset(dir(nnx.Module))


class Option(nnx.Module):
  """See the module docstring. `HOOKS`: the point's hooks; `API`: an option's further names.

  `defaults`: the settings a class reads, with their default values, as a nested dict relative
  to its point's config section (`model.channel` for a channel mixer: {"moe": {"top_k": 2,
  ...}}). A point's base declares the settings every option of the point reads; an option adds
  its own (`settings_of` merges them along the class's bases). The run config's model section
  is assembled from these (research/model/options.py), and a resolved config keeps only the
  selected options' settings."""

  HOOKS: tuple[str, ...] = ()
  API: tuple[str, ...] = ()
  defaults: dict = {}


def merge_settings(into: dict, more: dict, where: str, owner: str = "") -> dict:
  """Deep-merges the nested settings dict `more` into `into` (in place; returned). The same
  setting declared twice must have the same default: else ValueError naming `where.key`."""
  for key, value in more.items():
    name = f"{where}.{key}"
    if isinstance(value, dict):
      node = into.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"{name} is both a setting and a group of settings ({owner})")
      merge_settings(node, value, name, owner)
    elif key in into and (isinstance(into[key], dict) or into[key] != value
                          or type(into[key]) is not type(value)):
      raise ValueError(f"{name} is declared with two defaults, {into[key]!r} and {value!r} "
                       f"({owner}); options that share a setting share its default")
    else:
      into[key] = value
  return into


def settings_of(cls: type, where: str = "") -> dict:
  """The settings option class `cls` reads: the `defaults` of it and of its bases, merged."""
  out: dict = {}
  for klass in reversed(cls.__mro__):
    if "defaults" in vars(klass):
      merge_settings(out, klass.defaults, where, cls.__name__)
  return out


def undeclared_names(cls: type) -> list[str]:
  """Public names `cls` (or a base of it below its composition point's base) defines that are
  neither a hook of the point nor in `cls.API`."""
  allowed = set(cls.HOOKS) | set(cls.API) | {"HOOKS", "API", "defaults"}
  found = set()
  for klass in cls.__mro__:
    if "HOOKS" in vars(klass):  # the composition point's base, which defines the hooks
      break
    found |= {k for k in vars(klass) if not k.startswith("_")}
  return sorted(found - allowed - _MODULE_NAMES)


def check_declared(cls: type, config_key: str) -> None:
  """Raises ValueError naming each public name of option `cls` (a subclass of its point's base)
  that its point does not declare."""
  bad = undeclared_names(cls)
  if bad:
    hints = []
    for name in bad:
      close = difflib.get_close_matches(name, cls.HOOKS, n=1, cutoff=0.6)
      hints.append(f"{name} (did you mean the hook {close[0]}?)" if close else name)
    raise ValueError(
        f"{config_key} option {cls.__name__} defines {', '.join(hints)}: not a hook of this "
        f"composition point (hooks: {', '.join(cls.HOOKS)}); a method the option offers its "
        f"family belongs in its API tuple, a helper gets a leading underscore")
