"""Every registered option derives from its composition point's base and defines no public name
that is not a hook of the point or in its own API (research/model/option.py)."""

import pytest

from research.model import attention, ffn, head, linear, option, options, residual
from research.model.options import POINTS
from research.model.registry import Registry


@pytest.mark.parametrize("registry", POINTS, ids=lambda r: r.config_key)
def test_registered_options_declare_their_names(registry):
  assert registry.base is not None and issubclass(registry.base, option.Option)
  for name in registry.names():
    cls = registry.get(name)
    assert issubclass(cls, registry.base), name
    assert option.undeclared_names(cls) == [], name


@pytest.mark.parametrize("registry", POINTS, ids=lambda r: r.config_key)
def test_every_hook_is_defined_on_the_base(registry):
  for hook in registry.base.HOOKS:
    assert any(hook in vars(k) for k in registry.base.__mro__), hook


def test_a_misspelled_hook_is_refused_at_registration():
  points = Registry("model.channel.kind", base=ffn.ChannelMixer)

  class Misspelled(ffn.ChannelMixer):

    @classmethod
    def lr_multiplier(cls, m, steps):  # the hook is lr_multipliers
      return [("values", lambda step: 4.0)]

  with pytest.raises(ValueError, match=r"lr_multiplier \(did you mean the hook lr_multipliers\?\)"):
    points.register("misspelled")(Misspelled)


def test_a_helper_needs_an_underscore_or_the_api():
  points = Registry("model.channel.kind", base=ffn.ChannelMixer)

  class Helper(ffn.ChannelMixer):

    def route(self, x):
      return x

  with pytest.raises(ValueError, match="defines route"):
    points.register("helper")(Helper)

  class Declared(Helper):
    API = ("route",)

  points.register("declared")(Declared)
  assert points.get("declared") is Declared


def test_an_option_outside_the_base_is_refused():
  points = Registry("model.head.kind", base=head.Head)
  with pytest.raises(ValueError, match="not a subclass of Head"):
    points.register("stray")(ffn.FeedForward)


def test_default_hooks_are_no_ops():
  assert ffn.ChannelMixer.lr_multipliers(None, 10) == []
  assert ffn.ChannelMixer.resolve(None) is None
  assert attention.SequenceMixer.channel_writer(None, layer=0, dtype=None, rngs=None) is None
  assert head.Head.reads_final_stream is False and head.MultiTokenHead.reads_final_stream
  assert linear.Linear.depth_scaling_in_gain is False and linear.SDDLinear.depth_scaling_in_gain
  assert residual.Residual.stream_adapter is residual.PlainStream


def test_unread_settings_come_from_the_options():
  from research import config as config_lib
  from research import experiments

  def unread(spec, **overrides):
    return options.unread_settings(
        config_lib.resolve(experiments.get_config(spec, overrides)).to_dict())

  dense = unread("baseline:scale=smoke")
  assert {"model.channel.moe.", "model.channel.ultramem.", "model.channel.ultramem_v2.",
          "model.residual.", "model.head.mtp_weight", "model.attention.flexprefill."} <= set(dense)
  moe = unread("baseline:scale=smoke", **{"model.channel.kind": "moe"})
  assert "model.channel.moe." not in moe and "model.channel.ultramem." in moe
  hyper = unread("baseline:scale=smoke", **{"model.residual.kind": "hyper"})
  assert "model.residual." not in hyper  # every multi-stream option reads it
  assert not any(s.startswith(tuple(dense)) for s in options.SWITCHES if s != "model.residual.kind")
  assert "model.residual.kind" in options.SWITCHES  # under an unread prefix, yet it still counts
