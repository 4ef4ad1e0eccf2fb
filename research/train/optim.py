"""Optimizer and learning-rate schedules (optax).

AdamW with global-norm clipping and a weight-decay mask (matrices decay; norm scales, biases
and other vectors do not). Schedules, each with linear warmup:

  constant      lr after warmup
  cosine        cosine decay to min_lr_ratio * lr at the last step
  linear        linear decay to min_lr_ratio * lr at the last step
  wsd           warmup-stable-decay: constant, then linear decay to min_lr_ratio * lr over the
                last decay_fraction of the steps
  step          lr times step_gamma at each of step_milestones (fractions of train.steps)
  inverse_time  1/t decay, lr / (1 + k s) with s the steps after warmup and k set so that the
                last step's lr is min_lr_ratio * lr (k = (1 / min_lr_ratio - 1) / (steps -
                warmup))

Per-parameter lr multipliers (`scale_by_path`): a module family may ask for a multiplier on
some of its parameters, matched by tree path (UltraMem's value tables: 4x decaying to 1x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.train import lowbit

SCHEDULES = ("constant", "cosine", "linear", "wsd", "step", "inverse_time")  # config.CHOICES


def make_schedule(t) -> optax.Schedule:
  """`t` is `config.train`."""
  lr, warmup, steps = t.lr, t.warmup_steps, t.steps
  floor = lr * t.min_lr_ratio
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  if t.schedule == "constant":
    rest = optax.constant_schedule(lr)
  elif t.schedule == "cosine":
    rest = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    rest = optax.linear_schedule(lr, floor, max(steps - warmup, 1))
  elif t.schedule == "step":
    # milestones count from the run's first step; join_schedules hands `rest` steps from warmup
    starts = jnp.asarray([int(round(m * steps)) - warmup for m in t.step_milestones])
    rest = lambda s: lr * t.step_gamma ** jnp.sum(s >= starts)  # noqa: E731
  elif t.schedule == "inverse_time":
    span = max(steps - warmup, 1)
    k = (1.0 / t.min_lr_ratio - 1.0) / span
    rest = lambda s: lr / (1.0 + k * jnp.clip(s, 0, span))  # noqa: E731  (the floor after)
  elif t.schedule == "wsd":
    decay = max(int(round(steps * t.decay_fraction)), 1)
    stable = max(steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, floor, decay)], [stable])
  else:
    raise ValueError(f"train.schedule='{t.schedule}' is not one of {', '.join(SCHEDULES)}")
  return optax.join_schedules([warm, rest], [warmup]) if warmup > 0 else rest


def decay_mask(params):
  """True for parameters that get weight decay: those with two or more dimensions, not
  counting the `layers` axis of stacked blocks (model.scan_blocks: a norm's scales stacked
  over layers stay a vector per layer)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def decays(p):
    if isinstance(p, nnx.Variable):
      axes = p.get_metadata().get("out_sharding") or ()
      return p.get_value().ndim - sum(a == "layers" for a in axes) >= 2
    return p.ndim >= 2

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _names(path) -> tuple[str, ...]:
  """A parameter's tree path as names: ('blocks', '0', 'channel', 'memory', 'values')."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return tuple(names[:-1] if names and names[-1] == "value" else names)


def scale_by_path(rules) -> optax.GradientTransformation:
  """Multiplies the update of every parameter that a rule matches by the rule's multiplier at
  this step: an lr multiplier (it scales the Adam step and the decoupled weight decay alike).
  `rules`: [(match(names) -> bool, multiplier(step) -> scalar)], the first match wins."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      names = _names(path)
      for match, multiplier in rules:
        if match(names):
          return u * jnp.asarray(multiplier(state.count), u.dtype)
      return u

    updates = jax.tree_util.tree_map_with_path(scale, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(t, lr_multipliers=(), seed: int = 0, extra=()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ clipping), or with `train.optimizer = lowbit_adamw` AdamW whose moments are stored
  as low-bit codes (research/train/lowbit.py; `seed` draws its stochastic rounding);
  `lr_multipliers` as for `scale_by_path` (e.g. the memory layers' value tables,
  research.model.lr_multipliers); `extra`: transforms chained last, after weight decay (the
  re-warmup of parameters added by a width expansion, research/train/expand.py)."""
  schedule = make_schedule(t)
  parts = []
  if t.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.clip_norm))
  if t.get("optimizer", "adamw") == "lowbit_adamw":
    q = t.lowbit
    m = lowbit.Codec(q.m_bits, q.m_grid, q.m_rounding, signed=True, block=q.block,
                     quantile=q.quantile)
    v = lowbit.Codec(q.v_bits, q.v_grid, q.v_rounding, signed=False, block=q.block,
                     quantile=q.quantile)
    parts += [lowbit.scale_by_lowbit_adam(t.b1, t.b2, t.eps, m, v, min_size=q.min_size,
                                          seed=seed),
              optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
              optax.scale_by_learning_rate(schedule)]
  else:
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                             weight_decay=t.weight_decay, mask=decay_mask))
  if lr_multipliers:
    parts.append(scale_by_path(list(lr_multipliers)))
  return optax.chain(*parts, *extra), schedule


def state_shardings(tx: optax.GradientTransformation, params, replicated):
  """Shardings of `tx.init(params)`: every copy of the parameter tree inside the state (Adam's
  moments) sharded like the parameters themselves, everything else (step counts) `replicated`.
  Left to the compiler, the moments of FSDP-sharded parameters come out replicated: a full
  copy of twice the model on every device. `params` may be abstract (ShapeDtypeStructs with
  shardings)."""
  abstract = jax.eval_shape(tx.init, params)
  is_lowbit = lambda x: isinstance(x, lowbit.LowBitAdamState)  # noqa: E731
  if any(is_lowbit(x) for x in jax.tree.leaves(abstract, is_leaf=is_lowbit)):
    # low-bit moments are flat per-tensor code buffers, not parameter-shaped: replicated
    return jax.tree.map(lambda _: replicated, abstract)
  return optax.tree_map_params(tx, lambda _, s: s, abstract,
                               jax.tree.map(lambda p: p.sharding, params),
                               transform_non_params=lambda _: replicated)


def init_state(tx: optax.GradientTransformation, params, replicated):
  """`tx.init(params)`, created in `state_shardings`."""
  return jax.jit(tx.init, out_shardings=state_shardings(tx, params, replicated))(params)
