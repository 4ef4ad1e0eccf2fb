"""FlexPrefill: the model's training group, and the evaluation grid run on its checkpoints.

  research sweep flexprefill --group train      # one dense model, 3 seeds (tiny: context 512)
  python experiments/flexprefill/evaluate.py --workdir runs/flexprefill/train/dense/seed0 \
      --workdir runs/flexprefill/train/dense/seed1 --workdir runs/flexprefill/train/dense/seed2

FlexPrefill changes inference only, so the ablations are not training arms: `eval_arms()` lists
them as prefill overrides applied to a trained checkpoint (evaluate.py). Groups:

  grid            gamma in {0.8, 0.9, 0.95, 0.99} x tau in {0, 0.1, 0.3} x block in {32, 64}
  fixed_budget    vertical-slash with a fixed number of columns and diagonals, no gamma (the
                  paper's fixed vs dynamic budget ablation)
  vertical_slash  every head vertical-slash (no query-aware heads; tau ignored)
  min_budget      the minimum budget at 0 and 4 blocks (the grid uses 2)

The paper reports no number at our scale; its RULER averages (2nd-hand, see README.md) are not
comparable targets, so no arm carries paper numbers.
"""

from __future__ import annotations

from research.experiments import Arm, Sweep

GAMMAS = (0.8, 0.9, 0.95, 0.99)
TAUS = (0.0, 0.1, 0.3)
BLOCKS = (32, 64)
MIN_BLOCKS = 2  # the grid's minimum budget, in blocks (tokens = blocks x block size)
KEY = "model.attention.flexprefill."


def flex(block: int, *, min_blocks: int = MIN_BLOCKS, **fields) -> dict:
  """Overrides that turn FlexPrefill on with these fields (budgets given in blocks)."""
  out = {"model.attention.prefill": "flexprefill", KEY + "block_size": block,
         KEY + "min_budget": min_blocks * block}
  out.update({KEY + k: v for k, v in fields.items()})
  return out


def eval_arms() -> dict[str, list[Arm]]:
  """The evaluation sweep: group -> arms of prefill overrides; "dense" is the reference."""
  grid = [Arm(f"g{g}_t{t}_b{b}", flex(b, gamma=g, tau=t))
          for b in BLOCKS for g in GAMMAS for t in TAUS]
  fixed = [Arm(f"fixed{n}_b64", flex(64, mode="fixed_budget", budget=n * 64)) for n in (2, 4, 8)]
  vs = [Arm(f"vs_g{g}_b64", flex(64, gamma=g, mode="vertical_slash")) for g in (0.9, 0.95)]
  mins = [Arm(f"g0.9_t0.1_b64_min{n}", flex(64, gamma=0.9, tau=0.1, min_blocks=n))
          for n in (0, 4)]
  return {"dense": [Arm("dense", {"model.attention.prefill": "dense"})], "grid": grid,
          "fixed_budget": fixed, "vertical_slash": vs, "min_budget": mins}


def get_sweep() -> Sweep:
  # One training arm, no claim: the paper's claims (quality kept, prefill faster) are about the
  # evaluation arms above, scored by evaluate.py rather than judged by `research report`
  # (README.md gives their verdicts).
  return Sweep(groups={"train": [Arm("dense", {})]}, arg="scale=tiny", seeds=3,
               default_group="train")
