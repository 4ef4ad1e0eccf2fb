"""The composition of the scoreboard's resolved gains at the common setting, 3 seeds per arm.

  research sweep composition --group compose     # pre, each part alone, the pairs that exist
  research report composition

Each arm against the common dense baseline (`pre`); `pre_untied` measures the untied head that
VWN needs, so VWN's arms can be read against either. The question is whether a pair's Δ is the
sum of its parts' (README: how it is read); `research report` gives each arm's Δ, t and word.
"""

from research.experiments import Arm, Sweep, load_config_module
from research.scales import COMMON_ARG

# alone, then in pairs (HC and VWN share the residual composition point, PHD needs dense
# attention: no hc4 + vwn4, no moda + phd, so no triple)
ARMS = ("pre", "pre_untied", "hc4", "moda", "vwn4", "phd", "hc4_moda", "vwn4_moda", "hc4_phd",
        "vwn4_phd")


def get_sweep() -> Sweep:
  variant = load_config_module("composition").variant_overrides
  compose = [Arm(n, variant(n.replace("pre_", "")), claim=None if n.startswith("pre") else "lower")
             for n in ARMS]
  return Sweep(groups={"compose": compose}, arg=COMMON_ARG, seeds=3, default_group="compose",
               # VWN's over-width table cannot be tied to the head: its arms untie it
               varies={"compose": ("model.head.tie_embeddings",)})
