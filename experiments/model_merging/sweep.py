"""PMA's runs at the tiny scale (digest §6):

  research sweep model_merging --group trunk    # constant lr 3e-3 (and 1e-3), checkpoints every 25
  research sweep model_merging --group anneal   # the annealed controls ending at s = 1000, 2500, 5000
  python experiments/model_merging/merges.py --runs_dir runs
  research report model_merging

The merges are not runs: merges.py reads each trunk seed's checkpoints and evaluates the merged
weights (research/train/merge.py) at s = 1000, 2500, 5000 against the checkpoint at s, for the
methods (SMA, EMA alpha 0.1 / 0.2, WMA at N = 10, V = 50), the number of checkpoints (SMA,
N = 3 / 6 / 10 / 15 at V = 50) and the interval (SMA, V = 25 / 50 / 100 / 200 at N = 10).

anneal: the compute-matched control of digest §6: a run of s steps whose learning rate is the
trunk's until 0.9 s and then decays linearly to 0 over the last 10% (wsd, decay_fraction 0.1,
min_lr_ratio 0). With the trunk's seed, data order and learning rate up to 0.9 s it is the trunk
forked at 0.9 s and annealed (research run --fork_from gives the same run bit for bit; the
sweep trains it whole). It carries no claim; analysis.py sets the merges beside it.
"""

from research.experiments import Arm, Sweep

ANNEAL_ENDS = (1000, 2500, 5000)


def anneal(steps: int) -> dict:
  return {"train.schedule": "wsd", "train.steps": steps, "train.decay_fraction": 0.1,
          "train.min_lr_ratio": 0.0, "train.checkpoint_every": steps // 4,
          "train.keep_checkpoints": 1}


def get_sweep() -> Sweep:
  trunk = [Arm("constant_3e-3", {}), Arm("constant_1e-3", {"train.lr": 1e-3})]
  anneals = [Arm(f"anneal_{s}", anneal(s)) for s in ANNEAL_ENDS]
  return Sweep(groups={"trunk": trunk, "anneal": anneals}, arg="scale=tiny", seeds=3,
               default_group="trunk", references={"trunk": "", "anneal": ""},
               varies={"trunk": ("train.lr",),
                       "anneal": ("train.schedule", "train.steps", "train.decay_fraction",
                                  "train.min_lr_ratio", "train.checkpoint_every",
                                  "train.keep_checkpoints")})
