"""SPARKLING's mid-training width expansion (Yu et al. 2026, arXiv:2602.02472; the digest's
sections are cited as §n): at step t_e a trained model's MLP width (`model.channel.d_ff`, the
paper's "inner 2x") and / or hidden width (`model.d_model`, "hidden 2x": heads and head_dim
fixed) grow, the new slices initialised so that the activations' RMS is preserved (§3.1), the
optimizer state of the new slices reset (§3.4) and their learning rate re-warmed (§3.5).

Which tensors grow is read from the parameters' logical axes: a d_ff expansion widens every
`mlp` axis, a d_model expansion every `embed` axis and the residual-width RMSNorm scales. A
kernel is [..., in, out] (a lookup table [vocab, embed] is a one-hot matmul), so a grown last
axis is a fan-out expansion (new rows of the paper's y = Wx: up and gate; for d_model the
writers of the stream: embedding, W_O, W_down) and a grown second-to-last axis a fan-in one
(new columns: down; for d_model the readers: q, k, v, up, gate, the head).

`train.expand.init` names the pair <fan-out side>_<fan-in side> (Fig. 1's up-down pairs):

  copy    new slices copy slices of the old width, new index j from j mod d
  random  drawn N(0, s^2), s the current std of that matrix (§7: "distributionally consistent")
  zero    zeros

Fan-in tensors are then rescaled as a whole, old and new parts alike (§3.1 table; `rescale=rms`):
both sides copied (copy_copy): 1/sqrt(1 + 3c) for the copy ratio c = d'/d - 1 <= 1, 1/(1 + c)
above (1/2 at 2x, where it is function preserving: W' = [W, W] / 2, x' = [x, x]); otherwise
(random, or one side zero: Appendix B) sqrt(d / d'). `rescale=none` is the unscaled control.
RMSNorm scales are copied whatever the init (Appendix C). In a gated FFN a zero fan-out side
zeros W_up's new columns and copies W_gate's: with both zero a new unit's output and both its
gradients are 0 forever (silu(0) = 0).

Optimizer state (`state`, §3.4): `reset_new` keeps Adam's moments on the old slices and zeros
on the new ones (asymmetric; the step count is shared, as optax and PyTorch's per-tensor step
keep it, so the new slices get no bias correction: their first steps are about
(1 - b1)/sqrt(1 - b2) of a full Adam step, §7; kept, not corrected); `copy` copies the moments
with the parameters' index map (unscaled: §3.4's "rescaled state" adds nothing); `reset_all`
zeros every moment and Adam's count (a fresh Adam). Symmetric state with copy_copy locks the
copies (§3.3): `divergence` measures it, ||W_new - W_src|| / ||W_src|| over the copied slices.

Re-warmup (§3.5): the new parameters' learning rate is
  eta_new(t) = f(t - t_e; tau_w, T - t_e, eta_e, rho eta_e, eta_min),  eta_e = eta(t_e),
f the base schedule's shape (linear warmup, then cosine to eta_min); `rewarm` multiplies their
updates by eta_new(t) / eta(t) after AdamW's decoupled weight decay, so it scales both (§4).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.config import expand_step
from research.train.optim import _names

INITS = ("copy_copy", "random_random", "random_zero", "zero_copy")  # config CHOICES
RESCALES = ("rms", "none")
STATES = ("reset_new", "copy", "reset_all")
AXES = {"d_ff": "mlp", "d_model": "embed"}  # which width grows which logical axis
# the residual-width RMSNorms (placement norms and the decoder's final norm; the attention's
# own q/k/context norms are per head_dim or heads x head_dim and do not grow)
STREAM_NORMS = ("attn_norm", "channel_norm", "final_norm")


@dataclasses.dataclass(frozen=True)
class Growth:
  """One width that grows: `name` (d_ff | d_model) from `old` to `new` on logical `axis`."""
  name: str
  axis: str
  old: int
  new: int


@dataclasses.dataclass(frozen=True)
class Spec:
  """An expansion: its widths, initialisation, rescaling and optimizer-state treatment; `seed`
  and `step` fix the random draws."""
  growths: tuple[Growth, ...]
  init: str = "copy_copy"
  rescale: str = "rms"
  state: str = "reset_new"
  seed: int = 0
  step: int = 0

  @property
  def out_init(self) -> str:  # the fan-out side's init
    return self.init.split("_")[0]

  @property
  def in_init(self) -> str:  # the fan-in side's init
    return self.init.split("_")[1]

  def fan_in_factor(self, g: Growth) -> float:
    """The §3.1 rescale of a fan-in tensor widened by `g` (whole tensor, old and new parts)."""
    if self.rescale == "none":
      return 1.0
    if self.out_init == "copy" and self.in_init == "copy":  # both sides copied
      c = g.new / g.old - 1
      return 1.0 / math.sqrt(1 + 3 * c) if c <= 1 else 1.0 / (1 + c)
    return math.sqrt(g.old / g.new)  # random, or one side zero (Appendix B)

  def describe(self) -> str:
    widths = ", ".join(f"{g.name} {g.old} -> {g.new}" for g in self.growths)
    return f"{widths}; init {self.init}, rescale {self.rescale}, optimizer state {self.state}"


def spec_of(c) -> Spec | None:
  """The expansion of the resolved config `c` (None when it does not expand)."""
  if not expand_step(c):
    return None
  x, m = c.train.expand, c.model
  now = {"d_ff": m.channel.d_ff, "d_model": m.d_model}
  growths = tuple(Growth(k, AXES[k], now[k], x[k]) for k in ("d_ff", "d_model") if x[k])
  return Spec(growths, init=x.init, rescale=x.rescale, state=x.state, seed=c.seed, step=x.step)


# ---------------------------------------------------------------------- the per-tensor plan

@dataclasses.dataclass(frozen=True)
class Widen:
  """One axis of one parameter that a growth widens: `axis` counted from the end (so a
  stacked `layers` axis in front does not matter), `role` out (fan-out: new rows of y = Wx),
  in (fan-in: new columns, rescaled) or norm (an RMSNorm scale, copied)."""
  growth: Growth
  axis: int
  role: str


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def name_of(path) -> str:
  return "/".join(_names(path))


def _widens(names: tuple[str, ...], axes: tuple, growth: Growth) -> tuple[Widen, ...]:
  axes = tuple(axes or ())
  if growth.axis == "embed" and axes[-1:] == ("norm",) and any(n in STREAM_NORMS for n in names):
    return (Widen(growth, -1, "norm"),)
  out = []
  for i, a in enumerate(axes):
    if a != growth.axis:
      continue
    back = i - len(axes)
    if back not in (-1, -2) or len(axes) < 2:
      raise ValueError(f"cannot widen {'/'.join(names)} (axes {axes}) on '{a}': not an "
                       "[in, out] kernel")
    out.append(Widen(growth, back, "out" if back == -1 else "in"))
  return tuple(out)


def plan(params, spec: Spec) -> dict[str, tuple[Widen, ...]]:
  """parameter name -> the axes the expansion widens (growths in spec order); unlisted
  parameters keep their shape. `params`: an nnx State of Params (values may be abstract)."""
  out = {}
  for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]:
    names = _names(path)
    axes = var.get_metadata().get("out_sharding") if _is_var(var) else ()
    widens = sum((_widens(names, axes, g) for g in spec.growths), ())
    if widens:
      out["/".join(names)] = widens
  return out


def _mask(shape, widens) -> jax.Array:
  """True on the new slices: an index at or beyond the old width along any widened axis."""
  mask = jnp.zeros(shape, bool)
  for w in widens:
    mask = mask | (jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) + w.axis) >= w.growth.old)
  return mask


def new_mask(params, widths: dict[str, tuple[Widen, ...]]):
  """A boolean pytree like `params` (the grown ones): True on the slices the expansion added."""
  def one(path, x):
    widens = widths.get(name_of(path))
    return _mask(x.shape, widens) if widens else jnp.zeros(x.shape, bool)
  return jax.tree_util.tree_map_with_path(one, params)


def _sources(g: Growth) -> jax.Array:
  return jnp.arange(g.old, g.new) % g.old  # new index j copies old index j mod d


def _slice_shape(shape, wd: Widen) -> tuple[int, ...]:
  """The shape of the slices `wd` adds to an array of `shape`."""
  shape = list(shape)
  shape[len(shape) + wd.axis] = wd.growth.new - wd.growth.old
  return tuple(shape)


def _new_slices(w: jax.Array, wd: Widen, kind: str, std, key) -> jax.Array:
  if kind == "copy":
    return jnp.take(w, _sources(wd.growth), axis=w.ndim + wd.axis)
  shape = _slice_shape(w.shape, wd)
  if kind == "zero":
    return jnp.zeros(shape, w.dtype)
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(w.dtype)


def _grow_param(name: str, w: jax.Array, widens, spec: Spec) -> jax.Array:
  # the std of the trained matrix, per matrix (a stacked `layers` axis keeps one per layer),
  # taken before any growth so zero slices of a first growth do not shrink a second's draws
  std = jnp.std(w, axis=(-2, -1), keepdims=True) if w.ndim >= 2 else jnp.std(w)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed), spec.step),
                           zlib.crc32(name.encode()) & 0x7FFFFFFF)
  for i, wd in enumerate(widens):
    if wd.role == "norm":
      kind = "copy"  # RMSNorm gammas copied (Appendix C)
    elif wd.role == "out":
      kind = spec.out_init
      if kind == "zero" and name.split("/")[-2:-1] == ["gate"]:
        kind = "copy"  # a zero gate too would leave the new units dead (module docstring)
    else:
      kind = spec.in_init
    new = _new_slices(w, wd, kind, std, jax.random.fold_in(key, i))
    w = jnp.concatenate([w, new], axis=w.ndim + wd.axis)
    if wd.role == "in":
      w = w * jnp.asarray(spec.fan_in_factor(wd.growth), w.dtype)  # §3.1: the whole tensor
  return w


def _grown_shape(shape, widens) -> tuple[int, ...]:
  shape = list(shape)
  for wd in widens:
    shape[len(shape) + wd.axis] += wd.growth.new - wd.growth.old
  return tuple(shape)


def _grow_moment(m: jax.Array, widens, mode: str) -> jax.Array:
  """An Adam moment of a grown parameter: old slices kept, new ones zero (reset_new) or copied
  with the parameter's index map (copy), unscaled."""
  for wd in widens:
    axis = m.ndim + wd.axis
    if mode == "copy":
      new = jnp.take(m, _sources(wd.growth), axis=axis)
    else:
      new = jnp.zeros(_slice_shape(m.shape, wd), m.dtype)
    m = jnp.concatenate([m, new], axis=axis)
  return m


def expand(params, opt_state, spec: Spec, tx: optax.GradientTransformation):
  """(params', opt_state', new_mask): `params` (an nnx State of Params, metadata kept) grown by
  `spec`, the state of `tx` (an AdamW chain, whose param-shaped trees are Adam's moments)
  expanded to match, and True on the new slices (§4's `expand`)."""
  widths = plan(params, spec)

  def grow(path, var):
    name = name_of(path)
    return var.replace(_grow_param(name, var.get_value(), widths[name], spec)) \
        if name in widths else var

  new_params = jax.tree_util.tree_map_with_path(grow, params, is_leaf=_is_var)
  names = jax.tree_util.tree_map_with_path(lambda path, _: name_of(path), params)

  def moment(m, name):
    if spec.state == "reset_all":
      return jnp.zeros(_grown_shape(m.shape, widths.get(name, ())), m.dtype)
    return _grow_moment(m, widths[name], spec.state) if name in widths else m

  new_state = optax.tree_map_params(tx, moment, opt_state, names,
                                    transform_non_params=lambda x: x)
  if spec.state == "reset_all":  # a fresh Adam: its count (bias correction) restarts too
    new_state = jax.tree.map(
        lambda s: s._replace(count=jnp.zeros_like(s.count))
        if isinstance(s, optax.ScaleByAdamState) else s,
        new_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
  return new_params, new_state, new_mask(new_params, widths)


def divergence(params, widths: dict[str, tuple[Widen, ...]]) -> jax.Array:
  """||W_new - W_src|| / ||W_src|| over every widened axis of every grown parameter (W_src:
  the old slices the new ones were copied from): 0 while copies stay locked (§3.3, §4)."""
  num = den = jnp.zeros((), jnp.float32)
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    for wd in widths.get(name_of(path), ()):
      axis = x.ndim + wd.axis
      new = jnp.take(x, jnp.arange(wd.growth.old, wd.growth.new), axis=axis)
      src = jnp.take(x, _sources(wd.growth), axis=axis)
      num = num + jnp.sum(jnp.square(new - src).astype(jnp.float32))
      den = den + jnp.sum(jnp.square(src).astype(jnp.float32))
  return jnp.sqrt(num / jnp.maximum(den, 1e-30))


# -------------------------------------------------------------------------- re-warmup (§3.5)

def rewarm_lr(t, *, start: int, total: int, eta_e, rho: float, warmup: int, eta_min):
  """eta_new(t) = f(t - t_e; tau_w, T - t_e, eta_e, rho eta_e, eta_min) (§3.5): linear from
  eta_e to rho eta_e over `warmup` steps, then cosine to eta_min at `total`."""
  s = jnp.asarray(t, jnp.float32) - start
  peak = rho * eta_e
  warm = eta_e + (peak - eta_e) * s / max(warmup, 1)
  frac = jnp.clip((s - warmup) / max(total - start - warmup, 1), 0.0, 1.0)
  decay = eta_min + (peak - eta_min) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  return jnp.where(s < warmup, warm, decay)


def rewarm_multiplier(schedule: optax.Schedule, *, start: int, total: int, rho: float,
                      warmup: int):
  """t -> eta_new(t) / eta(t): the new parameters' lr multiplier over the base schedule."""
  eta_e, eta_min = float(schedule(start)), float(schedule(total))

  def multiplier(t):
    new = rewarm_lr(t, start=start, total=total, eta_e=eta_e, rho=rho, warmup=warmup,
                    eta_min=eta_min)
    return new / jnp.maximum(schedule(t), 1e-30)

  return multiplier


def scale_new_by(multiplier, widths: dict[str, tuple[Widen, ...]], start: int
                 ) -> optax.GradientTransformation:
  """Multiplies the updates of the new slices (the mask of `widths`) by `multiplier(t)`; t
  counts from `start` (the expansion step: this transform joins the chain there). Placed
  after AdamW, it scales the Adam step and the decoupled weight decay alike (§4)."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.asarray(start, jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    m = multiplier(state.count)

    def scale(path, u):
      widens = widths.get(name_of(path))
      if not widens:
        return u
      return jnp.where(_mask(u.shape, widens), u * m.astype(u.dtype), u)

    updates = jax.tree_util.tree_map_with_path(scale, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
