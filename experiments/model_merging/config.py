"""Model merging in pre-training (PMA; Li et al. 2025, arXiv:2505.12082): average the last N
checkpoints of a run trained at a constant learning rate (SMA / EMA / WMA); the merge beats the
latest checkpoint and approaches what annealing would give.

  research run model_merging                           # the constant-lr trunk, tiny scale
  research run model_merging:scale=smoke               # seconds; used by the tests
  research sweep model_merging --group trunk           # trunks at lr 3e-3 and 1e-3, 3 seeds
  research sweep model_merging --group anneal          # annealed controls ending at s
  python experiments/model_merging/merges.py --runs_dir runs   # every merge, evaluated
  research report model_merging
  research merge runs/model_merging/trunk/constant_3e-3/seed0 --last 10 --every 50 --eval

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The trunk (digest §6): the shared tiny decoder (4 x 128, context 64, batch 12) on the complete
works of Shakespeare (character level, 4.6M training characters, so 5000 steps of 768 tokens
stay under one epoch, as pre-training does), AdamW (0.9, 0.95), weight decay 0.1, 100 warmup steps then a
constant learning rate 3e-3 for 5000 steps; a checkpoint every 25 steps, all kept (the merges
read any window of them; 200 checkpoints of 9.7 MB per seed).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("averaging the last N checkpoints of a constant-learning-rate run beats the latest "
         "checkpoint and approaches an annealed run's loss")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "model_merging")
  t = c.train
  t.schedule, t.lr, t.b2, t.warmup_steps = "constant", 3e-3, 0.95, 100
  t.steps, t.checkpoint_every = 5000, 25
  if scale == "smoke":
    t.steps, t.checkpoint_every, t.warmup_steps = 12, 2, 2
  elif scale in ("small", "paper"):  # a checkpoint every 250 / 2000 steps, the last 20 kept
    t.checkpoint_every = 250 if scale == "small" else 2000
    t.steps = max(t.steps, 20 * t.checkpoint_every)
  t.keep_checkpoints = t.steps // t.checkpoint_every if scale in ("smoke", "tiny") else 20
  c.eval.every = 500 if scale == "tiny" else c.eval.every
  return c
