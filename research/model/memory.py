"""Memory-layer channel mixers: UltraMem (`ultramem`) and UltraMemV2 (`ultramem_v2`).

Huang et al., "Ultra-Sparse Memory Network" (ICLR 2025) and "UltraMemV2: Memory Networks
Scaling to 120B Parameters with Superior Long-Context Learning" (2025). Equation numbers below
follow the UltraMemV2 paper's numbering of the shared parts, as our digests do.

Each block keeps its FFN; a memory layer runs beside it. A memory unit `k:v` reads the channel
sublayer's input of block k (the normalized FFN input under pre-norm) and adds its output to
the channel output of block v, i.e. to the residual stream after block v (skip-layer placement,
UltraMem Fig. 3); `k:k` is in-block (UltraMemV2 puts one in every block). The pending output of
a skip unit travels in the forward context's slot `PENDING.at(k)`.

One memory layer, per token x [embed]:

  q = RMSNorm(x W_q)                       one (q_row, q_col) pair, or one per Tucker rank (v2)
  S_row[h, rho, i] = <K_row[h, rho, i], q_row>, likewise S_col     product keys, eq. 6
  retrieval  "tucker":  G[i, j] = sum_c S_row[:, i]^T C_c S_col[:, j]          TDQKR, eq. 7
               two stages: top side_top_k rows by u^T S_row and columns by t^T S_col, with
               (u, t) the leading singular vectors of sum_c C_c (no gradient; sign fixed so
               that sum(u) >= 0), then the exact G on that grid and its top_k
             "product":  G[i, j] = S_row[i] + S_col[j]  (plain product keys, Lample et al.
               2019; the per-side top-k makes it exact)
  weights    the selected raw scores, no softmax (UltraMem §3.4); with MCS (cores h > 1) each
             core's score g_c weighs its own 1/h chunk of the value row (eqs. 16-17)
  addresses  virtual v = i n' + j on the (s n)^2 grid, n' = s n, E = s^2; with IVE a fixed
             random permutation pi maps v to physical row pi(v) mod N and block pi(v) div N
             (eq. 8); N = n^2 rows
  values     z_e = sum over selected slots in block e of w V[p]; o = sum_e W_e^T z_e (IVE's E
             projectors, eq. 9; UltraMem) or o = W^T sum_k w_k V[p_k] (one projector; v2 §3.3)
  PEER       (v2, eqs. 13-15) w_k <- w_k <P[p_k], x W_pre>: each slot is a rank-1 FFN
             (pre-value P, value V), no activation

The value read is `kernels_pallas.memory_lookup` (impl from config; the table is viewed as
[N h, d_value / h] so that core c of row p is row p h + c); with the table sharded over
`memory_slots` under a mesh, `sharded_memory_lookup`. The pre-value dot is a gather + einsum.

Initialisation (`init`): "code" is the official code's constants; "paper" calibrates the q/k
norm gains so that the mean selected score is about 1 (a small Monte Carlo at construction, on
the config alone) and sets the value std by UltraMem's N(0, E / (2 m H L)) or UltraMemV2's
variance matching (App. A, eq. 26 read as sigma_V^4; see experiments/ultramem_v2/README.md).

The value (and pre-value) tables get a learning-rate multiplier `value_lr`, decaying linearly
to 1x over the run when `value_lr_decay` (UltraMem §3.7): `lr_multipliers` hands that rule to
the optimizer. With `match_flops`, the FFN of every block shrinks (`ffn_width`) so that the
model's FLOPs per token equal those of the dense model with FFN width `model.channel.d_ff`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from research.errors import ConfigError
from research.model import ffn as ffn_lib
from research.model.context import Slot
from research.model.lookup import table_lookup

RETRIEVALS = ("tucker", "product")
INITS = ("code", "paper")


class MemoryIndex(nnx.Variable):
  """A non-trainable integer buffer of a memory layer (IVE's permutation)."""


# ------------------------------------------------------------------------------ the spec

@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """The resolved hyperparameters of the memory layers of one model (one kind)."""
  kind: str
  d_model: int
  num_layers: int
  units: tuple[tuple[int, int], ...]   # (source block, target block)
  num_keys: int        # n, physical keys per side: N = n^2 value rows
  expansion: int       # E = s^2 virtual blocks (IVE); keys per side n' = s n
  d_key: int
  d_value: int
  d_pre_value: int     # PEER pre-value width; 0 = plain values
  heads: int           # H, share one query, own keys and cores
  top_k: int           # m per head
  side_top_k: int      # first-stage candidates per side
  rank: int            # r (1 for product keys)
  cores: int           # h (MCS)
  retrieval: str
  per_rank_query: bool
  ive_projectors: bool
  init: str
  impl: str
  ffn_width: int
  tucker_aux_coef: float
  tucker_aux_margin: float

  @property
  def slots(self) -> int:
    return self.num_keys ** 2

  @property
  def side(self) -> int:
    return math.isqrt(self.expansion) * self.num_keys

  @property
  def touched(self) -> int:
    """Value rows a token reads per memory layer."""
    return min(self.heads * self.top_k, self.slots)

  @property
  def query_ranks(self) -> int:
    return self.rank if self.per_rank_query else 1

  @property
  def out_in(self) -> int:
    return self.d_value * (self.expansion if self.ive_projectors else 1)

  def layer_flops(self) -> float:
    """Forward FLOPs per token of one memory layer (multiply-add = 2; top-k not counted)."""
    d, n, dk, h, r, ms = self.d_model, self.side, self.d_key, self.heads, self.rank, self.side_top_k
    k = self.heads * self.top_k
    f = 2 * d * 2 * self.query_ranks * dk                      # query projection
    f += 2 * h * 2 * r * n * dk                                # row and column key scores
    if self.retrieval == "tucker":
      f += 2 * h * 2 * r * n                                   # rank-1 proxy u^T S, t^T S
      f += 2 * h * self.cores * (ms * r * r + ms * ms * r)     # exact scores on the grid
    else:
      f += h * ms * ms                                         # grid sums
    if self.d_pre_value:
      f += 2 * d * self.d_pre_value + 2 * k * self.d_pre_value + k
    f += 2 * k * self.d_value                                  # weighted sum of value rows
    f += 2 * self.out_in * d                                   # output projection(s)
    return float(f)


def _default_units(kind: str, num_layers: int) -> str:
  if kind == "ultramem_v2":
    return ",".join(f"{l}:{l}" for l in range(num_layers))
  pairs = [(l, min(l + 1, num_layers - 1)) for l in range(0, num_layers, 2)]
  return ",".join(f"{a}:{b}" for a, b in pairs)


def parse_units(spec: str, num_layers: int, where: str) -> tuple[tuple[int, int], ...]:
  """'0:1,2:3' -> ((0, 1), (2, 3)); a block is the source of at most one unit."""
  units = []
  for item in spec.split(","):
    parts = item.strip().split(":")
    try:
      src, dst = (int(p) for p in parts)
    except ValueError:
      raise ConfigError(f"{where}.layers item '{item}' is not of the form source:target") from None
    if not 0 <= src <= dst < num_layers:
      raise ConfigError(f"{where}.layers unit {src}:{dst} needs 0 <= source <= target < "
                        f"num_layers={num_layers}")
    units.append((src, dst))
  sources = [s for s, _ in units]
  if len(set(sources)) != len(sources):
    raise ConfigError(f"{where}.layers='{spec}' has two units reading the same block")
  return tuple(units)


def spec_from_config(m, kind: str) -> MemorySpec:
  """The MemorySpec of `config.model` (resolved) for memory kind `kind`."""
  c, where = m.channel[kind], f"model.channel.{kind}"
  return MemorySpec(
      kind=kind, d_model=m.d_model, num_layers=m.num_layers,
      units=parse_units(c.layers, m.num_layers, where), num_keys=c.num_keys,
      expansion=c.expansion, d_key=c.d_key, d_value=c.d_value,
      d_pre_value=c.d_pre_value if c.peer else 0, heads=c.heads, top_k=c.top_k,
      side_top_k=c.side_top_k, rank=c.rank, cores=c.cores, retrieval=c.retrieval,
      per_rank_query=c.per_rank_query, ive_projectors=c.ive_projectors, init=c.init,
      impl=c.impl, ffn_width=c.ffn_width, tucker_aux_coef=c.tucker_aux_coef,
      tucker_aux_margin=c.tucker_aux_margin)


def _check(c, kind: str) -> None:
  where = f"model.channel.{kind}"
  s = math.isqrt(c.expansion)
  if c.expansion < 1 or s * s != c.expansion:
    raise ConfigError(f"{where}.expansion={c.expansion} must be a perfect square (IVE: E = s^2)")
  if c.retrieval not in RETRIEVALS:
    raise ConfigError(f"{where}.retrieval='{c.retrieval}' is not one of {', '.join(RETRIEVALS)}")
  if c.retrieval == "product" and (c.rank != 1 or c.cores != 1):
    raise ConfigError(f"{where}.retrieval='product' has no Tucker core: set rank=1 and cores=1")
  if c.init not in INITS:
    raise ConfigError(f"{where}.init='{c.init}' is not one of {', '.join(INITS)}")
  for name in ("num_keys", "heads", "top_k", "rank", "cores", "d_key", "d_value"):
    if c[name] < 1:
      raise ConfigError(f"{where}.{name}={c[name]} must be >= 1")
  if c.d_value % c.cores:
    raise ConfigError(f"{where}.d_value={c.d_value} is not divisible by cores={c.cores} (MCS)")
  side = s * c.num_keys
  if not 1 <= c.side_top_k <= side:
    raise ConfigError(f"{where}.side_top_k={c.side_top_k} must be in [1, keys per side={side}]")
  if c.top_k > c.side_top_k ** 2:
    raise ConfigError(f"{where}.top_k={c.top_k} exceeds the side_top_k^2={c.side_top_k ** 2} "
                      "candidates")


def resolve(m, kind: str) -> None:
  """run_config.resolve hook: fills the derived fields of model.channel.<kind> (0 / '' = derive)."""
  c = m.channel[kind]
  d = m.d_model
  if not c.layers:
    c.layers = _default_units(kind, m.num_layers)
  if c.d_key == 0:
    c.d_key = d // 4
  if c.d_value == 0:
    c.d_value = d // 2 if kind == "ultramem" else d // 4
  if c.d_pre_value == 0:
    c.d_pre_value = d // 4
  if c.side_top_k == 0:
    c.side_top_k = min(c.top_k, 128, math.isqrt(max(c.expansion, 1)) * c.num_keys)
  _check(c, kind)
  if c.ffn_width == 0:
    gated = ffn_lib.is_gated(m.channel.activation)
    per_width = 2 * d * (3 if gated else 2)                  # FFN FLOPs per unit of width
    width = m.channel.d_ff
    if c.match_flops:
      spec = spec_from_config(m, kind)
      width = m.channel.d_ff - len(spec.units) * spec.layer_flops() / (m.num_layers * per_width)
      width = int(8 * round(width / 8))
      if width < 8:
        raise ConfigError(f"model.channel.{kind}: the memory layers' FLOPs exceed the FFN budget "
                          f"of d_ff={m.channel.d_ff}; shrink the memory or set match_flops=False")
    c.ffn_width = width


# ------------------------------------------------------------------------------ retrieval

def _rms(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rank_one_proxy(cores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u, t) [heads, r]: leading left / right singular vectors of sum_c C_c (cores [heads, h, r,
  r]), without gradient, the pair's sign fixed so that sum(u) >= 0 (stateless; the official
  code instead aligns the sign with the previous step's)."""
  total = jax.lax.stop_gradient(jnp.sum(cores, axis=1))
  u_mat, _, vh = jnp.linalg.svd(total)
  u, t = u_mat[..., :, 0], vh[..., 0, :]
  sign = jnp.where(jnp.sum(u, axis=-1, keepdims=True) < 0, -1.0, 1.0)
  return u * sign, t * sign


def retrieve(s_row: jax.Array, s_col: jax.Array, cores: jax.Array | None, *, retrieval: str,
             top_k: int, side_top_k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k slots of the product-key grid.

  s_row, s_col: [T, H, r, n'] per-rank row / column scores; cores [H, h, r, r] (tucker).
  Returns (virtual addresses [T, H, m] int32 = i n' + j, weights [T, H, h, m] fp32), the
  weights being the selected per-core scores (h = 1 for product keys).
  """
  n = s_row.shape[-1]
  ms = side_top_k
  if retrieval == "product":
    a, b = s_row[:, :, 0], s_col[:, :, 0]                                  # [T, H, n']
  else:
    u, t = rank_one_proxy(cores)                                           # [H, r]
    a = jnp.einsum("hr,thrn->thn", u, jax.lax.stop_gradient(s_row))
    b = jnp.einsum("hr,thrn->thn", t, jax.lax.stop_gradient(s_col))
  rows = jax.lax.top_k(a, ms)[1]                                           # [T, H, ms]
  cols = jax.lax.top_k(b, ms)[1]
  r_sel = jnp.take_along_axis(s_row, rows[:, :, None, :], axis=-1)        # [T, H, r, ms]
  c_sel = jnp.take_along_axis(s_col, cols[:, :, None, :], axis=-1)
  if retrieval == "product":
    per_core = (r_sel[:, :, 0, :, None] + c_sel[:, :, 0, None, :])[:, :, None]  # [T,H,1,ms,ms]
  else:
    per_core = jnp.einsum("thri,hcrs,thsj->thcij", r_sel, cores, c_sel)   # TDQKR eq. 7
  flat = per_core.reshape(*per_core.shape[:3], ms * ms)                    # [T, H, h, ms^2]
  sel = jax.lax.top_k(jnp.sum(flat, axis=2), top_k)[1]                     # [T, H, m]
  i = jnp.take_along_axis(rows, sel // ms, axis=-1)
  j = jnp.take_along_axis(cols, sel % ms, axis=-1)
  weights = jnp.take_along_axis(flat, sel[:, :, None, :], axis=-1)         # [T, H, h, m]
  return (i * n + j).astype(jnp.int32), weights


def tucker_aux_loss(cores: jax.Array, margin: float) -> jax.Array:
  """sum over heads of 1/(r-1) sum_{i>=2} max(0, lambda_i - margin)^2, lambda the singular
  values of sum_c C_c (UltraMem's Tucker-core penalty, eq. 17 in the v2 numbering)."""
  r = cores.shape[-1]
  if r < 2:
    return jnp.zeros((), jnp.float32)
  lam = jnp.linalg.svd(jnp.sum(cores, axis=1), compute_uv=False)           # [H, r] descending
  return jnp.sum(jnp.square(jax.nn.relu(lam[:, 1:] - margin))) / (r - 1)


# --------------------------------------------------------------------------- initialisation

@functools.lru_cache(maxsize=64)
def score_stats(retrieval: str, side: int, rank: int, cores: int, top_k: int,
                samples: int = 4, seed: int = 0) -> tuple[float, float]:
  """(mu, m2): the mean top-k grid score for unit-variance row / column scores and U(0, 1)
  cores, and the second moment of the per-core selected weights after dividing by mu (so that
  the mean selected score is 1). Exact grid top-k, numpy, from the config alone."""
  rng = np.random.default_rng(seed)
  means, seconds = [], []
  for _ in range(samples):
    zr, zc = rng.standard_normal((2, rank, side))
    if retrieval == "product":
      per_core = (zr[0][:, None] + zc[0][None, :])[None]
    else:
      c = rng.uniform(size=(cores, rank, rank))
      per_core = np.einsum("ri,crs,sj->cij", zr, c, zc)
    flat = per_core.reshape(per_core.shape[0], -1)
    top = np.argpartition(-flat.sum(0), top_k - 1)[:top_k]
    means.append(flat.sum(0)[top].mean())
    seconds.append(flat[:, top])
  mu = float(np.mean(means))
  m2 = float(np.mean(np.square(np.concatenate(seconds, axis=1) / mu)))
  return mu, m2


@dataclasses.dataclass(frozen=True)
class Init:
  """Standard deviations / constants of one memory layer's parameters."""
  q_proj: float
  keys: float
  gain: float        # q and k norm gains
  values: float
  pre_proj: float
  out_proj: float


def init_rule(spec: MemorySpec) -> Init:
  d, dk, dv = spec.d_model, spec.d_key, spec.d_value
  v2 = spec.kind == "ultramem_v2"
  if spec.init == "code":
    return Init(q_proj=dk ** -0.5, keys=dk ** -0.5, gain=dk ** (-0.4 if v2 else -0.33),
                values=0.02, pre_proj=d ** -0.5,
                out_proj=(1.0 / spec.out_in) ** 0.5)
  mu, m2 = score_stats(spec.retrieval, spec.side, spec.rank, spec.cores, spec.top_k)
  # score = gamma^deg * Z with gamma = sqrt(d_key) g_q g_k: choose gamma so the mean is 1.
  deg = 1 if spec.retrieval == "product" else 2
  gamma = mu ** (-1.0 / deg)
  gain = math.sqrt(gamma / math.sqrt(dk))
  k, heads, layers = spec.top_k, spec.heads, spec.num_layers
  if not v2:  # UltraMem: V ~ N(0, E / (2 m H L)), other parameters as the code
    return Init(q_proj=dk ** -0.5, keys=dk ** -0.5, gain=gain,
                values=math.sqrt(spec.expansion / (2 * k * heads * layers)),
                pre_proj=d ** -0.5, out_proj=(1.0 / spec.out_in) ** 0.5)
  # UltraMemV2 App. A: dense projections N(0, 2 / (5 d)); the memory's output variance is
  # matched to a SwiGLU FFN's 0.064 k_inner / (2 L), with E[w^2] = m2 for (1 + sigma_s^2).
  small = math.sqrt(0.4 / d)
  k_inner = spec.ffn_width / d
  if spec.d_pre_value:   # eq. 26: sigma_V^4 = 0.2 k_inner d / (k H E[w^2] d_pre d_v L)
    var2 = 0.2 * k_inner * d / (k * heads * m2 * spec.d_pre_value * dv * layers)
    values = var2 ** 0.25
  else:                  # the same matching with plain values: sigma_V^2 = 0.08 k_inner d / (...)
    values = math.sqrt(0.08 * k_inner * d / (k * heads * m2 * dv * layers))
  return Init(q_proj=small, keys=dk ** -0.5, gain=gain, values=values, pre_proj=small,
              out_proj=small)


# ---------------------------------------------------------------------------- memory layer

class MemoryLayer(nnx.Module):
  """One memory layer (see the module docstring); x [batch, seq, embed] -> [batch, seq, embed]."""

  def __init__(self, spec: MemorySpec, *, layer: int, dtype, rngs: nnx.Rngs):
    self.spec, self.dtype = spec, dtype
    ini = init_rule(spec)
    d, dk, n = spec.d_model, spec.d_key, spec.side

    def normal(std, shape):
      return std * jax.random.normal(rngs.params(), shape, jnp.float32)

    q_out = 2 * spec.query_ranks * dk
    self.query = nnx.Param(normal(ini.q_proj, (d, q_out)), out_sharding=("embed", None))
    self.query_gain = nnx.Param(jnp.full((2, dk), ini.gain, jnp.float32),
                                out_sharding=(None, "norm"))
    self.keys = nnx.Param(normal(ini.keys, (spec.heads, 2, spec.rank, n, dk)),
                          out_sharding=(None, None, None, None, None))
    self.key_gain = nnx.Param(jnp.full((spec.heads, 2, dk), ini.gain, jnp.float32),
                              out_sharding=(None, None, "norm"))
    self.cores = (nnx.Param(jax.random.uniform(rngs.params(), (spec.heads, spec.cores,
                                                               spec.rank, spec.rank)),
                            out_sharding=(None, None, None, None))
                  if spec.retrieval == "tucker" else None)
    self.values = nnx.Param(normal(ini.values, (spec.slots, spec.d_value)),
                            out_sharding=("memory_slots", None))
    if spec.d_pre_value:
      self.pre_values = nnx.Param(normal(ini.values, (spec.slots, spec.d_pre_value)),
                                  out_sharding=("memory_slots", None))
      self.pre_proj = nnx.Param(normal(ini.pre_proj, (d, spec.d_pre_value)),
                                out_sharding=("embed", None))
    else:
      self.pre_values = self.pre_proj = None
    self.out_proj = nnx.Param(normal(ini.out_proj, (spec.out_in, d)),
                              out_sharding=(None, "embed"))
    if spec.expansion > 1:
      key = jax.random.fold_in(jax.random.key(0x5EED), layer)  # fixed: same on every host
      perm = jax.random.permutation(key, spec.expansion * spec.slots).astype(jnp.int32)
      self.permutation = MemoryIndex(perm, out_sharding=(None,))
    else:
      self.permutation = None

  def scores(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row and column scores [T, H, r, n'] of tokens x [T, embed], fp32 (eq. 6)."""
    s = self.spec
    q = jnp.dot(x.astype(jnp.float32), self.query[...])
    q = q.reshape(-1, 2, s.query_ranks, s.d_key)
    q = _rms(q) * self.query_gain[...][None, :, None, :]
    keys = _rms(self.keys[...]) * self.key_gain[...][:, :, None, None, :]   # [H, 2, r, n', dk]
    if s.per_rank_query:
      sc = jnp.einsum("tprk,hprnk->thprn", q, keys)
    else:
      sc = jnp.einsum("tpk,hprnk->thprn", q[:, :, 0], keys)
    return sc[:, :, 0], sc[:, :, 1]

  def select(self, x: jax.Array):
    """(physical rows [T, K], IVE blocks [T, K], weights [T, h, K]) with K = H m."""
    s = self.spec
    s_row, s_col = self.scores(x)
    cores = self.cores[...] if self.cores is not None else None
    virtual, w = retrieve(s_row, s_col, cores, retrieval=s.retrieval, top_k=s.top_k,
                          side_top_k=s.side_top_k)
    t = virtual.shape[0]
    virtual = virtual.reshape(t, -1)                                       # heads pool together
    w = w.transpose(0, 2, 1, 3).reshape(t, s.cores, -1)
    if self.permutation is not None:                                       # IVE, eq. 8
      pv = jnp.take(self.permutation[...], virtual, axis=0)
      return pv % s.slots, pv // s.slots, w
    return virtual, jnp.zeros_like(virtual), w

  def _lookup(self, table: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    return table_lookup(table, idx, w, impl=self.spec.impl)

  def __call__(self, x: jax.Array, ctx=None) -> jax.Array:
    s = self.spec
    lead = x.shape[:-1]
    x2 = x.reshape(-1, s.d_model)
    phys, block, w = self.select(x2)
    if self.pre_values is not None:                                        # PEER, eqs. 13-15
      y = jnp.dot(x2.astype(jnp.float32), self.pre_proj[...])              # [T, d_pre]
      pre = jnp.take(self.pre_values[...], phys, axis=0)                   # [T, K, d_pre]
      w = w * jnp.einsum("tkp,tp->tk", pre, y)[:, None, :]
    h, dv = s.cores, s.d_value
    table = self.values[...].reshape(s.slots * h, dv // h)                 # parameter dtype
    chunk = jnp.arange(h, dtype=jnp.int32)[None, :, None]
    idx = phys[:, None, :] * h + chunk                                     # [T, h, K]
    if s.ive_projectors and s.expansion > 1:                               # eq. 9: z_e per block
      e = jnp.arange(s.expansion, dtype=jnp.int32)[None, :, None, None]
      mask = (block[:, None, None, :] == e).astype(w.dtype)                # [T, E, 1, K]
      z = self._lookup(table, jnp.broadcast_to(idx[:, None], mask.shape[:2] + idx.shape[1:]),
                       w[:, None] * mask)                                  # [T, E, h, dv / h]
    else:
      z = self._lookup(table, idx, w)                                      # [T, h, dv / h]
    z = z.reshape(z.shape[0], s.out_in)
    out = jnp.dot(z.astype(self.dtype), self.out_proj[...].astype(self.dtype))
    if ctx is not None and self.cores is not None and s.tucker_aux_coef > 0:
      ctx.add_aux_loss("memory_tucker",
                       s.tucker_aux_coef * tucker_aux_loss(self.cores[...], s.tucker_aux_margin))
    return out.reshape(*lead, s.d_model)

  def flops_per_token(self) -> float:
    return self.spec.layer_flops()

  def sparse_parameters(self) -> list[tuple[int, int, int]]:
    """The value (and pre-value) rows: N of them, H m read per token; everything else (query,
    all keys, cores, projections) is dense (research/model/accounting.py)."""
    s = self.spec
    return [(s.slots, s.d_value + s.d_pre_value, s.touched)]


# ----------------------------------------------------------------------------- the mixers

PENDING = Slot("memory/pending")  # .at(k): skip unit k's output, added after its target block

# The settings of a memory layer (model.channel.<kind>); 0 / "" = derived.
MEMORY_DEFAULTS = dict(
    layers="",  # units "source:target,..."; "" = pairs 0:1,2:3,... (v1), every block (v2)
    num_keys=112,  # n physical keys per side: n^2 value rows per memory layer
    d_key=0, d_value=0,  # 0: d/4; d/2 (v1) or d/4 (v2)
    d_pre_value=0, peer=False,  # PEER pre-values (v2), 0: d/4
    heads=2, top_k=16,  # retrieval heads (one shared query), slots per head
    side_top_k=0,  # first-stage rows / columns per side; 0: min(top_k, 128)
    rank=2, cores=2,  # Tucker rank r (TDQKR), cores h (multi-core scoring)
    retrieval="tucker",  # tucker (TDQKR) | product (plain product keys: rank=cores=1)
    expansion=4,  # IVE rate E (a perfect square); 1 = off
    ive_projectors=True,  # one projector per virtual block (v1) or one shared (v2)
    per_rank_query=False,  # a separate query per Tucker rank (v2)
    tucker_aux_coef=0.0, tucker_aux_margin=0.15,  # the Tucker-core penalty (paper 0.001)
    init="code",  # code (official constants) | paper (calibrated scores, variance rule)
    value_lr=4.0, value_lr_decay=True,  # value-table lr multiplier, decaying to 1x
    impl="auto",  # memory_lookup: auto (kernel on GPU/TPU, xla on CPU) | xla | pallas
    match_flops=True,  # shrink the FFNs so FLOPs/token equal the dense d_ff model's
    ffn_width=0)  # the FFN width that runs; 0: derived (d_ff, or matched)


class MemoryMixer(ffn_lib.ChannelMixer):
  """A block's channel mixer: its FFN (width `ffn_width`), plus the memory layer of the unit
  that reads this block, plus the outputs of skip units that end here."""

  kind = ""  # the option's name and config key: model.channel.<kind>
  API = ("kind",)

  @classmethod
  def resolve(cls, m) -> None:
    resolve(m, cls.kind)

  @classmethod
  def lr_multipliers(cls, m, steps: int):
    return lr_multipliers(m, cls.kind, steps)

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    spec = spec_from_config(cfg, self.kind)
    if spec.ffn_width <= 0:
      raise ConfigError(f"model.channel.{self.kind}.ffn_width is 0: resolve the config first")
    ffn_cfg = ml_collections.ConfigDict(cfg.to_dict())
    ffn_cfg.channel.d_ff = spec.ffn_width
    self.ffn = ffn_lib.FeedForward(ffn_cfg, layer=layer, dtype=dtype, rngs=rngs)
    self.layer = layer
    unit = [dst for src, dst in spec.units if src == layer]
    self.target = unit[0] if unit else -1
    self.memory = MemoryLayer(spec, layer=layer, dtype=dtype, rngs=rngs) if unit else None
    self.incoming = tuple(src for src, dst in spec.units if dst == layer and src != layer)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    out = self.ffn(x, ctx)
    if self.memory is not None:
      mem = self.memory(x, ctx).astype(out.dtype)
      if self.target == self.layer:
        out = out + mem
      else:  # skip unit: added after block `target`
        ctx.write(PENDING.at(self.layer), mem)
    for src in self.incoming:
      out = out + ctx.take(PENDING.at(src))
    return out

  def flops_per_token(self, seq_len: int) -> float:
    mem = self.memory.flops_per_token() if self.memory is not None else 0.0
    return self.ffn.flops_per_token(seq_len) + mem

  def sparse_parameters(self) -> list[tuple[int, int, int]]:
    return self.memory.sparse_parameters() if self.memory is not None else []


@ffn_lib.CHANNEL_MIXERS.register("ultramem")
class UltraMem(MemoryMixer):
  """UltraMem: skip-layer memory units beside the FFNs (TDQKR, IVE, MCS)."""
  kind = "ultramem"
  defaults = dict(ultramem=MEMORY_DEFAULTS)


@ffn_lib.CHANNEL_MIXERS.register("ultramem_v2")
class UltraMemV2(MemoryMixer):
  """UltraMemV2: a memory layer in every block, PEER values, one value projector."""
  kind = "ultramem_v2"
  defaults = dict(ultramem_v2=dict(MEMORY_DEFAULTS, heads=1, expansion=1, ive_projectors=False,
                                   per_rank_query=True, peer=True, init="paper"))


def lr_multipliers(m, kind: str, steps: int):
  """[(match(path names) -> bool, multiplier(step))] for the value and pre-value tables."""
  c = m.channel[kind]
  mult, decay = float(c.value_lr), bool(c.value_lr_decay)
  if mult == 1.0:
    return []

  def schedule(step):
    if not decay:
      return jnp.asarray(mult, jnp.float32)
    frac = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return 1.0 + (mult - 1.0) * frac                                       # UltraMem §3.7

  def match(names: tuple[str, ...]) -> bool:
    return len(names) >= 2 and names[-2] == "memory" and names[-1] in ("values", "pre_values")

  return [(match, schedule)]
