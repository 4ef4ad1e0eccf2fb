"""Optimizer and learning-rate schedules (optax).

AdamW with global-norm clipping and a weight-decay mask (matrices decay; norm scales, biases
and other vectors do not). Schedules, each with linear warmup:

  constant  lr after warmup
  cosine    cosine decay to min_lr_ratio * lr at the last step
  wsd       warmup-stable-decay: constant, then linear decay to min_lr_ratio * lr over the
            last decay_fraction of the steps
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "wsd")


def make_schedule(t) -> optax.Schedule:
  """`t` is `config.train`."""
  lr, warmup, steps = t.lr, t.warmup_steps, t.steps
  floor = lr * t.min_lr_ratio
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if t.schedule == "constant":
    rest = optax.constant_schedule(lr)
  elif t.schedule == "cosine":
    rest = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=t.min_lr_ratio)
  elif t.schedule == "wsd":
    decay = max(int(round(steps * t.decay_fraction)), 1)
    stable = max(steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)], [stable])
  else:
    raise ValueError(f"train.schedule='{t.schedule}' is not one of {', '.join(SCHEDULES)}")
  return optax.join_schedules([warm, rest], [warmup]) if warmup > 0 else rest


def decay_mask(params):
  """True for parameters that get weight decay: those with two or more dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(t)
  parts = []
  if t.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.clip_norm))
  parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
