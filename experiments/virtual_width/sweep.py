"""Virtual-width ablations at the deep-narrow tiny setting, 3 seeds per arm.

  research sweep virtual_width --group width       # r in {1.5, 2, 4, 8} (m = 2) + baseline
  research sweep virtual_width --group width_mtp   # the same with the next-2-token (MTP) head
  research sweep virtual_width --group fracs       # r = 4 with m in {1, 4} (m = 2: width)
  research report virtual_width                    # + the log-linear fit of loss vs log2(r)

Paper numbers: improvement of the next-token loss over the non-VWN baseline (MoE-A0.8B, m = 8,
500B tokens, MTP head in every arm; Table 1) and the points of its Fig. 8 fit
(loss = -0.0069 log2(r) + 1.6212).
"""

from research.experiments import Arm, Sweep, load_config_module

PAPER = {  # Table 1 (m = 8, with MTP) and Fig. 8
    "vwn2_mtp": {"NTP loss gain (A0.8B)": 0.020, "NTP loss (Fig. 8)": 1.6145},
    "vwn4_mtp": {"NTP loss gain (A0.8B)": 0.028, "NTP loss (Fig. 8)": 1.6072},
    "vwn8_mtp": {"NTP loss gain (A0.8B)": 0.035, "NTP loss (Fig. 8)": 1.6008},
}
WIDTHS = ("1.5", "2", "4", "8")


def _arms(names: list[str]) -> list[Arm]:
  variant = load_config_module("virtual_width").variant_overrides
  return [Arm(n, variant(n), PAPER.get(n)) for n in names]


def get_sweep() -> Sweep:
  width = _arms(["pre"] + [f"vwn{r}" for r in WIDTHS])
  width_mtp = _arms(["pre_mtp"] + [f"vwn{r}_mtp" for r in WIDTHS])
  fracs = _arms([f"vwn4_m{m}" for m in (1, 4)])
  return Sweep(groups={"width": width, "width_mtp": width_mtp, "fracs": fracs},
               arg="scale=tiny,corpus=tinyshakespeare", seeds=3, default_group="width")
