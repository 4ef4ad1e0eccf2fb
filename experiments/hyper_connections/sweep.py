"""Hyper-connection ablations at the deep-narrow tiny setting, 3 seeds per arm.

  research sweep hyper_connections --group table1   # n in {1, 2, 4, 8}, DHC with / without tanh
  research sweep hyper_connections --group table2   # SHC, n in {1, 2, 4, 8} (DHC rows: table1)
  research report hyper_connections

Paper numbers: OLMo-1B after 500B tokens, V2 validation loss (Tables 1 and 2; the paper's own
tables disagree by up to 0.008 between Table 1 and Table 2 for the same model, see README).
"""

from research.experiments import Arm, Sweep, load_config_module

# V2 eval loss of the 1B models (Table 1; SHC rows from Table 2)
PAPER_V2 = {"pre": 2.811, "dhc1": 2.819, "dhc2": 2.802, "dhc4": 2.781, "dhc8": 2.778,
            "dhc1_notanh": 2.822, "dhc2_notanh": 2.792, "dhc4_notanh": 2.779,
            "dhc8_notanh": 2.777, "shc2": 2.799, "shc4": 2.791}


def _arms(names: list[str]) -> list[Arm]:
  variant = load_config_module("hyper_connections").variant_overrides
  return [Arm(n, variant(n), {"V2 loss (1B)": PAPER_V2[n]} if n in PAPER_V2 else None)
          for n in names]


def get_sweep() -> Sweep:
  rates = (1, 2, 4, 8)
  table1 = _arms(["pre"] + [f"dhc{n}" for n in rates] + [f"dhc{n}_notanh" for n in rates])
  table2 = _arms([f"shc{n}" for n in rates])
  return Sweep(groups={"table1": table1, "table2": table2},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="table1")
