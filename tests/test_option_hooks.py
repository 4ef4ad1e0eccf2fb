"""Every registered option derives from its composition point's base and defines no public name
that is not a hook of the point or in its own API (research/model/option.py)."""

import pytest

from research.model import attention, ffn, head, linear, option, residual
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
  assert head.Head.add_loss(None, None, None, None, None) is None
  assert linear.Linear.depth_scaling_in_gain is False and linear.SDDLinear.depth_scaling_in_gain
  assert residual.Residual.stream_adapter is residual.PlainStream


def test_resolved_config_holds_only_the_selected_options_settings():
  from research import experiments, run_config  # pylint: disable=import-outside-toplevel

  def resolved(spec, **overrides):
    return run_config.resolve(experiments.get_config(spec, overrides)).to_dict()

  dense = resolved("baseline:scale=smoke")
  assert set(dense["model"]["channel"]) == {"kind", "activation", "d_ff", "ff_multiple_of",
                                            "poly_order"}
  assert dense["model"]["residual"] == {"kind": "plain"}
  assert set(dense["model"]["head"]) == {"kind", "tie_embeddings"}  # no mtp_weight
  attn = dense["model"]["attention"]
  assert "flexprefill" not in attn and "moda" not in attn
  moe = resolved("baseline:scale=smoke", **{"model.channel.kind": "moe",
                                            "model.channel.moe.top_k": 1})
  assert moe["model"]["channel"]["moe"]["top_k"] == 1 and "ultramem" not in moe["model"]["channel"]
  hyper = resolved("baseline:scale=smoke", **{"model.residual.kind": "hyper"})
  assert set(hyper["model"]["residual"]) == {"kind", "streams", "dynamic", "tanh"}
  vwn = resolved("baseline:scale=smoke", **{"model.residual.kind": "vwn"})
  assert {"fracs", "expansion", "temperature"} <= set(vwn["model"]["residual"])
  assert "streams" not in vwn["model"]["residual"]
  sparse = resolved("baseline:scale=smoke", **{"model.attention.prefill": "flexprefill"})
  assert sparse["model"]["attention"]["flexprefill"]["gamma"] == 0.9


def test_default_model_config_is_assembled_from_the_options():
  """Every option's `defaults` appears under its point with its value; two options sharing a
  setting with different defaults is an error naming it."""
  from research import run_config  # pylint: disable=import-outside-toplevel
  from research.model import moe, routers  # pylint: disable=import-outside-toplevel
  c = run_config.default_config()
  # the moe option's settings, and those of every router (a switch nested in the moe section)
  assert c.model.channel.moe.to_dict() == {**moe.MoE.defaults["moe"],
                                           "gatepro": routers.GATEPRO_DEFAULTS,
                                           "maxscore": routers.MAXSCORE_DEFAULTS}
  assert c.model.head.mtp_weight == head.MultiTokenHead.defaults["mtp_weight"]
  assert [c.model[p].kind for p in ("embed", "residual", "norm", "attention", "channel",
                                    "linear", "head")] == [r.default for r in POINTS]
  with pytest.raises(ValueError, match="model.residual.fracs is declared with two defaults"):
    option.merge_settings({"fracs": 4}, {"fracs": 8}, "model.residual", "vwn")


def test_config_module_imports_nothing_of_the_model():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, research.config; "
          "assert not [m for m in sys.modules if m.startswith('research.model')], sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ layering and typed state

def _modules_after_import(statement: str) -> list[str]:
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
  return out.stdout.split()


def test_layers_import_one_way():
  """The trainer imports no evaluator (eval.evaluators names them); no evaluator, nor infer,
  imports training code; the head family does not import the decoder."""
  trainer = _modules_after_import("import research.train.trainer")
  assert not [m for m in trainer if m.startswith("research.eval.")
              and m != "research.eval.lm_eval"], trainer
  evaluators = _modules_after_import(
      "import research.eval.connections, research.eval.exact_match, research.eval.layer_cosine, "
      "research.eval.long_ppl, research.eval.retrieval, research.infer; "
      "research.eval.connections.from_checkpoint")
  assert not [m for m in evaluators if m.startswith("research.train")]
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse(open(head.__file__).read())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names}
  assert not [m for m in imported
              if m == "research.model.lm" or m.startswith("research.model.lm.")], imported


def test_cross_layer_state_goes_through_declared_slots():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from research.model.context import ForwardContext, Slot  # pylint: disable=import-outside-toplevel
  ctx = ForwardContext(positions=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(TypeError, match="declared Slot"):
    ctx.write("moda/depth", 1)
  pending = Slot("test/pending")
  with pytest.raises(KeyError, match="test/pending/3 was read before it was written"):
    ctx.take(pending.at(3))
  ctx.write(pending.at(3), 7)
  assert ctx.read(pending.at(3)) == 7 and ctx.take(pending.at(3)) == 7 and not ctx.slots
  ctx.add_stat("dropped", 0.5)
  ctx.add_stat("dropped", 1.5)
  assert float(ctx.stats()["dropped"]) == 1.0


def test_unknown_evaluator_is_a_config_error_before_anything_trains():
  from research import run_config  # pylint: disable=import-outside-toplevel
  from research.errors import ConfigError  # pylint: disable=import-outside-toplevel
  c = run_config.default_config()
  c.eval.evaluators = "exact_match,layer_cosin"
  with pytest.raises(ConfigError, match="no evaluator 'layer_cosin'"):
    run_config.resolve(c)
  c.eval.evaluators = "lm_eval"
  with pytest.raises(ConfigError, match="lm_eval.py is not an evaluator"):
    run_config.resolve(c)
