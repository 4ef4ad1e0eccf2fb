"""Low-bit optimizer states (SOLO, arXiv:2505.00347): Adam's m and v stored as block-wise codes.

A state tensor is flattened, padded and cut into blocks of B values; each block keeps its
absmax scale Delta (fp32) and one b-bit code per value, packed into bytes (2-bit codes four per
byte; 3- and 4-bit two per byte, as the official code packs them; 8-bit one). A code indexes a
level grid y in [-1, 1] (signed m) or [0, 1] (unsigned v):

  linear   2^b evenly spaced levels
  de       dynamic exponent: 0, 1 and, for each exponent i < b - 1, means of an evenly spaced
           fraction grid scaled by 10^(i - b + 2) (the 8-bit optimizers' map; 2^b levels)
  qema     SOLO's logarithmic grid for unsigned states, per block: u = x / Delta, x_p the
           p-quantile of u in the block, alpha = x_p^(1 / (2^b - 1)), levels alpha^k, k = 0 ..
           2^b - 1 (level 0 the block max, the last x_p; nothing decodes to 0)

Rounding: `nearest`, or `stochastic` (the lower or upper neighbour with probability
proportional to proximity, so the expected decoded value is the input: the increment
(1 - beta) z of an EMA is not swamped by the gap between levels); qema rounds stochastically
in the log domain, q = floor(log_alpha u + U(0, 1)). The random bits come from a key kept in
the optimizer state, so a resumed run draws what the uninterrupted one draws.

`scale_by_lowbit_adam` dequantizes, runs Adam's EMAs and update in fp32 (the update uses the
fp32 moments, then they are requantized, as the official AdamW does), and stores the codes.
Tensors with fewer than `min_size` values keep fp32 moments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.errors import ConfigError

GRIDS = ("linear", "de", "qema")
STATS = ("v_codes_unchanged", "v_zero", "update_rms")
ROUNDINGS = ("nearest", "stochastic")


def dynamic_map(bits: int, signed: bool) -> np.ndarray:
  """The dynamic-exponent level grid: 2^bits sorted levels in [-1, 1] (signed) or [0, 1]."""
  exponent_bits = bits - 1
  magnitude_bits = bits - 1 if signed else bits
  levels = [0.0, 1.0]
  for i in range(exponent_bits):
    fractions = np.linspace(0.1, 1.0, 2 ** (i + magnitude_bits - exponent_bits) + 1)
    means = (fractions[:-1] + fractions[1:]) / 2 * 10.0 ** (i - exponent_bits + 1)
    levels += list(means) + ([-m for m in means] if signed else [])
  out = np.unique(np.asarray(levels, np.float64))
  assert len(out) == 2 ** bits, (bits, signed, len(out))
  return out.astype(np.float32)


def linear_map(bits: int, signed: bool) -> np.ndarray:
  return np.linspace(-1.0 if signed else 0.0, 1.0, 2 ** bits).astype(np.float32)


def _storage_bits(bits: int) -> int:
  return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclasses.dataclass(frozen=True)
class Codec:
  """How one moment is stored: `bits` per value, a level `grid`, a `rounding`, blocks of
  `block` values, qema's `quantile`. `signed`: m (signed) or v (unsigned)."""
  bits: int
  grid: str
  rounding: str
  signed: bool
  block: int = 128
  quantile: float = 0.1

  def __post_init__(self):
    what = f"train.lowbit.{'m' if self.signed else 'v'}_"  # the moment's settings
    if self.bits not in (2, 3, 4, 8):
      raise ConfigError(f"{what}bits={self.bits} is not one of 2, 3, 4, 8")
    if self.grid not in GRIDS:
      raise ConfigError(f"{what}grid='{self.grid}' is not one of {', '.join(GRIDS)}")
    if self.rounding not in ROUNDINGS:
      raise ConfigError(f"{what}rounding='{self.rounding}' is not one of "
                        f"{', '.join(ROUNDINGS)}")
    if self.grid == "qema" and self.signed:
      raise ConfigError(f"{what}grid='qema' is the unsigned second moment's grid (v_grid)")
    if self.block < 8 or self.block % 8:
      raise ConfigError(f"train.lowbit.block={self.block} must be a positive multiple of 8")
    if not 0.0 < self.quantile < 1.0:
      raise ConfigError(f"train.lowbit.quantile={self.quantile} must be in (0, 1)")

  @property
  def levels(self) -> np.ndarray | None:
    if self.grid == "linear":
      return linear_map(self.bits, self.signed)
    if self.grid == "de":
      return dynamic_map(self.bits, self.signed)
    return None  # qema: per block

  def padded_size(self, size: int) -> int:
    return -(-size // self.block) * self.block

  # ------------------------------------------------------------------ encode / decode
  def encode(self, x: jax.Array, key: jax.Array) -> dict:
    """x (any shape, fp32) -> {"codes": uint8 [bytes], "scale": [blocks], ("alpha")}."""
    flat = x.reshape(-1).astype(jnp.float32)
    flat = jnp.pad(flat, (0, self.padded_size(flat.size) - flat.size))
    blocks = flat.reshape(-1, self.block)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=1), 1e-12)
    u = blocks / scale[:, None]
    top = 2 ** self.bits - 1
    out = {"scale": scale}
    if self.grid == "qema":
      xp = jnp.maximum(jnp.quantile(u, self.quantile, axis=1), 1e-12)
      log_alpha = jnp.minimum(jnp.log(xp) / top, -1e-12)  # alpha < 1
      position = jnp.log(jnp.maximum(u, 1e-30)) / log_alpha[:, None]  # log_alpha(u) >= 0
      if self.rounding == "stochastic":
        position = position + jax.random.uniform(key, position.shape)
        codes = jnp.floor(position)
      else:
        codes = jnp.round(position)
      codes = jnp.clip(codes, 0, top)
      out["alpha"] = jnp.exp(log_alpha)
    else:
      levels = jnp.asarray(self.levels)
      lower = jnp.clip(jnp.searchsorted(levels, u, side="right") - 1, 0, top - 1)
      lo, hi = levels[lower], levels[lower + 1]
      frac = jnp.clip((u - lo) / (hi - lo), 0.0, 1.0)
      if self.rounding == "stochastic":
        up = jax.random.uniform(key, u.shape) < frac
      else:
        up = frac > 0.5
      codes = lower + up.astype(lower.dtype)
    out["codes"] = _pack(codes.astype(jnp.uint8).reshape(-1), _storage_bits(self.bits))
    return out

  def codes(self, state: dict, size: int) -> jax.Array:
    """The unpacked codes [size] of a tensor of `size` values."""
    return _unpack(state["codes"], _storage_bits(self.bits), self.padded_size(size))[:size]

  def decode(self, state: dict, shape: tuple[int, ...]) -> jax.Array:
    size = math.prod(shape)
    codes = _unpack(state["codes"], _storage_bits(self.bits), self.padded_size(size))
    codes = codes.reshape(-1, self.block).astype(jnp.int32)
    if self.grid == "qema":
      u = jnp.exp(codes.astype(jnp.float32) * jnp.log(state["alpha"])[:, None])
    else:
      u = jnp.asarray(self.levels)[codes]
    return (u * state["scale"][:, None]).reshape(-1)[:size].reshape(shape)

  def state_bytes(self, size: int) -> int:
    blocks = self.padded_size(size) // self.block
    per = 8 // _storage_bits(self.bits)
    return -(-self.padded_size(size) // per) + 4 * blocks * (2 if self.grid == "qema" else 1)


def _pack(codes: jax.Array, bits: int) -> jax.Array:
  per = 8 // bits
  if per == 1:
    return codes
  codes = codes.reshape(-1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.sum(codes << shifts[None, :], axis=1, dtype=jnp.uint8)


def _unpack(packed: jax.Array, bits: int, size: int) -> jax.Array:
  per = 8 // bits
  if per == 1:
    return packed[:size]
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  mask = jnp.uint8(2 ** bits - 1)
  return ((packed[:, None] >> shifts[None, :]) & mask).reshape(-1)[:size]


class LowBitAdamState(NamedTuple):
  count: jax.Array
  key: jax.Array
  # per parameter, in the parameters' flattening order (a tuple, not a parameter-shaped tree,
  # so tools that map over parameter-like subtrees pass it by): {"codes", "scale", ("alpha")}
  # or an fp32 array for tensors kept in full precision
  mu: tuple
  nu: tuple
  # diagnostics of the last update (swamping): the fraction of quantized v values whose code
  # did not change, the fraction decoding to 0, the RMS of the update direction
  stats: dict


def scale_by_lowbit_adam(b1: float, b2: float, eps: float, m: Codec, v: Codec, *,
                         min_size: int = 128, seed: int = 0) -> optax.GradientTransformation:
  """Adam's scaling (optax.scale_by_adam's update) with m and v stored by `m` and `v`."""
  if m.signed is False or v.signed is True:
    raise ConfigError("train.lowbit: the first moment's codec is signed, the second's unsigned")

  def quantized(p) -> bool:
    return p.size >= min_size

  def init_fn(params):
    key = jax.random.PRNGKey(seed)  # raw uint32 key: checkpoints store it as an array

    def zeros(codec, p):
      z = jnp.zeros(p.shape, jnp.float32)
      return codec.encode(z, key) if quantized(p) else z

    leaves = jax.tree.leaves(params)
    stats = {k: jnp.zeros((), jnp.float32) for k in STATS}
    return LowBitAdamState(count=jnp.zeros((), jnp.int32), key=key,
                           mu=tuple(zeros(m, p) for p in leaves),
                           nu=tuple(zeros(v, p) for p in leaves), stats=stats)

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    key, step_key = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(updates)
    out, new_mu, new_nu = [], [], []
    unchanged = zero = counted = jnp.zeros((), jnp.float32)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    for i, (g, mu, nu) in enumerate(zip(leaves, state.mu, state.nu)):
      g = g.astype(jnp.float32)
      q = quantized(g)
      mu_f = m.decode(mu, g.shape) if q else mu
      nu_f = v.decode(nu, g.shape) if q else nu
      mu_f = b1 * mu_f + (1 - b1) * g
      nu_f = b2 * nu_f + (1 - b2) * g * g
      out.append(mu_f / c1 / (jnp.sqrt(nu_f / c2) + eps))
      if q:  # the update used the fp32 moments; now they are stored as codes
        km, kv = jax.random.split(jax.random.fold_in(step_key, i))
        mu_f, nu_f = m.encode(mu_f, km), v.encode(nu_f, kv)
        old_codes, new_codes = v.codes(nu, g.size), v.codes(nu_f, g.size)
        unchanged = unchanged + jnp.sum(old_codes == new_codes)
        zero = zero + jnp.sum(v.decode(nu_f, g.shape) == 0)
        counted = counted + g.size
      new_mu.append(mu_f)
      new_nu.append(nu_f)
    total = sum(u.size for u in out)
    stats = {"v_codes_unchanged": unchanged / jnp.maximum(counted, 1.0),
             "v_zero": zero / jnp.maximum(counted, 1.0),
             "update_rms": jnp.sqrt(sum(jnp.sum(u * u) for u in out) / total)}
    return (treedef.unflatten(out),
            LowBitAdamState(count=count, key=key, mu=tuple(new_mu), nu=tuple(new_nu),
                            stats=stats))

  return optax.GradientTransformation(init_fn, update_fn)


def relative_error(codec: Codec, samples: int = 1 << 16, seed: int = 0) -> float:
  """r(b): the median relative error |Q(x) - x| / |x| of `codec` on standard normal values
  (the quantity SOLO's momentum rule compares across bit widths)."""
  x = jax.random.normal(jax.random.key(seed), (samples,))
  x = x if codec.signed else x * x
  y = codec.decode(codec.encode(x, jax.random.key(seed + 1)), x.shape)
  return float(jnp.median(jnp.abs(y - x) / jnp.maximum(jnp.abs(x), 1e-12)))


def solo_beta1(codec: Codec, reference: Codec, reference_beta1: float = 0.9) -> float:
  """SOLO's rule for the first moment's beta at low precision: the largest beta' with
  beta' / (1 - beta') r(codec) <= reference_beta1 / (1 - reference_beta1) r(reference)."""
  budget = reference_beta1 / (1 - reference_beta1) * relative_error(reference)
  ratio = budget / max(relative_error(codec), 1e-12)
  return min(reference_beta1, ratio / (1 + ratio))


def state_stats(opt_state) -> dict[str, jax.Array]:
  """The low-bit diagnostics of an optimizer state ({} for any other optimizer)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LowBitAdamState))
           if isinstance(x, LowBitAdamState)]
  return dict(found[0].stats) if found else {}


def state_bytes(opt_state) -> int:
  """Bytes of every array in an optimizer state (codes, scales, fp32 moments, counts)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
                 if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype,
                                                                        jax.dtypes.prng_key)))
