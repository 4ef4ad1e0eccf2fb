"""Recurrent sequence mixers (`model.attention.kind`): RetNet's retention, GLA, DeltaProduct and
the MatMul-free LM's MLGRU, each a parameterisation of the linear-recurrence core
(research/model/recurrence.py) -- its transition (decay, gate, Householder sub-steps) and its
read-out (query, head norm, output gate). Their state is a matrix per head, so decoding carries
it instead of a KV cache (research/infer/cache.py: `state` / `set_state`), constant in length.

  retention     RetNet (Sun et al. 2023): fixed per-head decay gamma (eq. 8), q and k rotated
                (xPos without its magnitude, as RoPE), per-head RMS norm ("GroupNorm"), swish
                output gate; values of value_factor x head_dim (the paper's 2d)
  gla           GLA (Yang et al. 2024): data-dependent gate per key dimension,
                alpha = sigmoid(x W1 W2 + b)^(1/tau) (section 3.2), no positions, per-head
                RMSNorm, swish output gate; gate variants scalar / fixed (RetNet-style) / none
                (linear attention) for the paper's ablations
  deltaproduct  DeltaProduct (Siems et al. 2025): n_h generalised Householder sub-steps per
                token on L2-normalised keys, beta in (0, 2) with negative eigenvalues; optional
                scalar forget gate (Gated DeltaProduct); short causal convolutions on q, k, v
  mlgru         MLGRU (Zhu et al. 2024): per-channel h_t = f h_{t-1} + (1 - f) c with the
                HGRN forget-gate lower bound rising with depth; the core with d_k = d_v = 1
                per channel

Settings common to all four: `model.attention.form` (recurrent | chunkwise | parallel; the
training path) and `model.attention.chunk`. A decode step (one token over a cache) always runs
the recurrent form; a prefill or continuation runs the configured form from the carried state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.errors import ConfigError
from research.model import recurrence as core
from research.model.attention import SEQUENCE_MIXERS, SequenceMixer, rope
from research.model.context import Slot
from research.model.linear import make_linear
from research.model.norms import RMSNorm, rms_norm
from research.sharding import constrain

_DIAGONAL = {"recurrent": core.diagonal_recurrent, "parallel": core.diagonal_parallel,
             "scan": core.diagonal_scan}


def log_spaced_gammas(heads: int) -> np.ndarray:
  """RetNet's decays in its experiments: 1 - exp(linspace(log 1/32, log 1/512, heads))."""
  return 1.0 - np.exp(np.linspace(math.log(1 / 32), math.log(1 / 512), heads))


def eq8_gammas(heads: int) -> np.ndarray:
  """RetNet eq. 8 (and torchscale): gamma_h = 1 - 2^(-5-h)."""
  return 1.0 - 2.0 ** (-5.0 - np.arange(heads))


class RecurrentMixer(SequenceMixer):
  """Shared parts of the recurrent mixers: the form, the cache protocol, the head layout."""

  defaults = dict(form="chunkwise", chunk=16)
  _forms = core.FORMS

  def _setup(self, cfg, layer: int) -> None:
    a = cfg.attention
    if a.form not in self._forms:
      raise ConfigError(f"model.attention.form='{a.form}' is not available for "
                        f"{a.kind} (available: {', '.join(self._forms)})")
    if a.chunk < 1:
      raise ConfigError(f"model.attention.chunk must be >= 1, got {a.chunk}")
    if a.norms:
      raise ConfigError(f"model.attention.norms='{a.norms}' applies to softmax attention; "
                        f"{a.kind} has its own head norm (choose another norm placement)")
    self.form, self.chunk, self.layer = a.form, a.chunk, layer
    self.d_model, self.num_heads = cfg.d_model, cfg.num_heads

  @staticmethod
  def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    """A ConfigError naming `model.attention.<key>` when `value` is not one of `choices`."""
    if value not in choices:
      raise ConfigError(f"model.attention.{key}='{value}' is not one of {', '.join(choices)}")

  def _form(self, ctx, t: int) -> str:
    return "recurrent" if ctx.cache is not None and t == 1 else self.form

  def _state_in(self, ctx):
    return None if ctx.cache is None else ctx.cache.state(f"layer{self.layer}/state")

  def _state_out(self, ctx, s) -> None:
    if ctx.cache is not None:
      ctx.cache = ctx.cache.set_state(f"layer{self.layer}/state", s)

  @staticmethod
  def _real(ctx, t: int):
    """[b, t, 1] True at this forward's real tokens, or None (all real; training)."""
    mask = None if ctx.cache is None else ctx.cache.real_mask(t)
    return None if mask is None else mask[:, :, None]

  def _diagonal(self, q, k, v, log_a, ctx):
    """The diagonal recurrence over this forward (from the cached state when decoding); a
    ragged prefill's padding neither decays nor writes the state."""
    t = q.shape[1]
    real = self._real(ctx, t)
    if real is not None:
      k = jnp.where(real[..., None], k, 0.0)
      log_a = jnp.where(real[..., None] if log_a.ndim == 4 else real, log_a, 0.0)
    form, s0 = self._form(ctx, t), self._state_in(ctx)
    if form == "chunkwise":
      out, s = core.diagonal_chunkwise(q, k, v, log_a, chunk=self.chunk, initial_state=s0)
    else:
      out, s = _DIAGONAL[form](q, k, v, log_a, s0)
    self._state_out(ctx, s)
    return out

  def _core_flops(self, seq_len: int, heads: int, dk: int, dv: int,
                  vector: bool = False) -> float:
    """Forward FLOPs per token of the diagonal recurrence. Recurrent: the state's write and
    read (2 dk dv each). Chunkwise: the same through the chunk states, plus the masked
    quadratic part over the causal average of the chunk (scores 2 dk per pair, 3 dk with a
    decay per key dimension; the weighted values 2 dv). Parallel: the quadratic part over the
    sequence and the final state's write. Scan: the writes and reads plus the associative
    scan's combines."""
    if self.form == "recurrent":
      return heads * 4 * dk * dv
    if self.form == "scan":  # the writes, the read, and the scan's combines (~2 per element)
      return heads * 8 * dk * dv
    span = seq_len if self.form == "parallel" else min(self.chunk, seq_len)
    pairs = (span + 1) / 2
    quadratic = ((3 if vector else 2) * dk + 2 * dv) * pairs
    state = 2 * dk * dv if self.form == "parallel" else 4 * dk * dv
    return heads * (state + quadratic)

  def _delta_flops(self, seq_len: int, heads: int, dk: int, dv: int) -> float:
    """Forward FLOPs per (sub-)step of the delta rule. Recurrent: k S, the rank-1 write and
    q S (2 dk dv each). Chunkwise over chunks of c: K K^T, Q K^T, P W (2 c dk each), P U
    (2 c dv), the triangular solve (c (dk + dv)), K_hat^T W (2 dk^2), K_hat^T U and Q_hat S
    (2 dk dv each) and the chunk transition A S (2 dk^2 dv / c)."""
    if self.form == "recurrent":
      return heads * 6 * dk * dv
    c = min(self.chunk, seq_len)
    return heads * (6 * c * dk + 2 * c * dv + c * (dk + dv) + 2 * dk * dk + 4 * dk * dv
                    + 2 * dk * dk * dv / c)


@SEQUENCE_MIXERS.register("retention")
class Retention(RecurrentMixer):
  """Gated multi-scale retention (RetNet eqs. 5-9): per head, S_n = gamma S_{n-1} + k_n^T v_n,
  o_n = q_n S_n with q, k rotated by position; Y = HeadNorm(o); MSR = (swish(X W_G) ⊙ Y) W_O."""

  defaults = dict(retention=dict(decay="log_spaced", gamma=0.9921875, value_factor=2,
                                 head_norm=True, gate=True, rotate=True, rope_theta=10000.0))
  _decays = ("log_spaced", "eq8", "fixed")

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    self._setup(cfg, layer)
    r = cfg.attention.retention
    self._one_of("retention.decay", r.decay, self._decays)
    if not 0.0 < r.gamma <= 1.0:
      raise ConfigError(f"model.attention.retention.gamma must be in (0, 1], got {r.gamma}")
    h, dk = cfg.num_heads, cfg.head_dim
    self.dk, self.dv = dk, int(r.value_factor * dk)
    gammas = {"log_spaced": log_spaced_gammas, "eq8": eq8_gammas,
              "fixed": lambda n: np.full((n,), r.gamma)}[r.decay](h)
    self.gammas = tuple(float(g) for g in gammas)
    self.head_norm, self.gated = r.head_norm, r.gate
    self.rotate, self.theta = r.rotate, r.rope_theta
    self.eps, self.dtype = cfg.norm_eps, dtype
    d, lin = cfg.d_model, dict(layer=layer, dtype=dtype, rngs=rngs)
    self.q = make_linear(cfg, d, h * dk, axes=("embed", "heads"), role="in", **lin)
    self.k = make_linear(cfg, d, h * dk, axes=("embed", "heads"), role="in", **lin)
    self.v = make_linear(cfg, d, h * self.dv, axes=("embed", "heads"), role="in", **lin)
    self.g = (make_linear(cfg, d, h * self.dv, axes=("embed", "heads"), role="in", **lin)
              if self.gated else None)
    self.o = make_linear(cfg, h * self.dv, d, axes=("heads", "embed"), role="out", **lin)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    b, t, _ = x.shape
    h = self.num_heads
    q = self.q(x).reshape(b, t, h, self.dk)
    k = self.k(x).reshape(b, t, h, self.dk) / math.sqrt(self.dk)
    v = self.v(x).reshape(b, t, h, self.dv)
    if self.rotate:  # eq. 4's Theta_n = e^(i n theta): q and k both rotated by their position
      # (RoPE), so q_n k_m^T depends on n - m as Q ⊙ Theta against (K ⊙ conj Theta)^T does
      q, k = rope(q, ctx.positions, self.theta), rope(k, ctx.positions, self.theta)
    log_gamma = jnp.log(jnp.asarray(self.gammas, jnp.float32))  # [h]
    log_a = jnp.broadcast_to(log_gamma, (b, t, h))
    y = self._diagonal(q, k, v, log_a, ctx)  # [b, t, h, dv] fp32
    if self.head_norm:  # per-head RMS norm without gain (torchscale's "GroupNorm")
      y = rms_norm(y, jnp.ones((self.dv,), jnp.float32), self.eps)
    else:
      # without the head norm, the parallel form's normalisation 2 (sec. 2.2): row n divided by
      # sqrt(sum_{i<=n} gamma^(n-i)), a function of the position alone, so every form keeps it
      pos = ctx.positions.astype(jnp.float32)[:, :, None] + 1.0  # [b, t, 1]
      g = jnp.asarray(self.gammas, jnp.float32).reshape(1, 1, -1)
      total = jnp.where(g < 1.0, (1.0 - g ** pos) / jnp.maximum(1.0 - g, 1e-12), pos)
      y = y / jnp.sqrt(total)[..., None]
    y = y.reshape(b, t, h * self.dv).astype(self.dtype)
    if self.g is not None:
      y = jax.nn.silu(self.g(x)) * y
    return self.o(y)

  def flops_per_token(self, seq_len: int) -> float:
    d, h = self.d_model, self.num_heads
    proj = 2 * d * h * (2 * self.dk + (2 if self.gated else 1) * self.dv) + 2 * h * self.dv * d
    return proj + self._core_flops(seq_len, h, self.dk, self.dv)


@SEQUENCE_MIXERS.register("gla")
class GatedLinearAttention(RecurrentMixer):
  """GLA (Yang et al. 2024): S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t (sec. 3.1),
  alpha_t = sigmoid(x_t W_a1 W_a2 + b)^(1/tau) (sec. 3.2); Y = (swish(X W_r) ⊙ Norm(O)) W_O."""

  defaults = dict(gla=dict(key_ratio=0.5, value_ratio=1.0, gate="vector", tau=16.0,
                           gate_rank=16, output_gate=True))
  _gates = ("vector", "scalar", "fixed", "none")

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    self._setup(cfg, layer)
    g = cfg.attention.gla
    self._one_of("gla.gate", g.gate, self._gates)
    if g.tau <= 0:
      raise ConfigError(f"model.attention.gla.tau must be > 0, got {g.tau}")
    h, d = cfg.num_heads, cfg.d_model
    kd, vd = int(g.key_ratio * d), int(g.value_ratio * d)
    if kd % h or vd % h or kd == 0 or vd == 0:
      raise ConfigError(f"gla: key width {kd} and value width {vd} (key_ratio, value_ratio x "
                        f"d_model {d}) must be positive multiples of num_heads {h}")
    self.dk, self.dv = kd // h, vd // h
    self.gate_kind, self.tau, self.rank, self.dtype = g.gate, g.tau, g.gate_rank, dtype
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.q = make_linear(cfg, d, kd, axes=("embed", "heads"), role="in", **lin)
    self.k = make_linear(cfg, d, kd, axes=("embed", "heads"), role="in", **lin)
    self.v = make_linear(cfg, d, vd, axes=("embed", "heads"), role="in", **lin)
    down = up = bias = None
    if g.gate == "vector":  # low rank: W_a1 [d, rank], W_a2 [rank, d_k] with a bias
      down = make_linear(cfg, d, g.gate_rank, axes=("embed", None), role="in", **lin)
      up = make_linear(cfg, g.gate_rank, kd, axes=(None, "heads"), role="in", **lin)
      bias = nnx.Param(jnp.zeros((kd,), jnp.float32), out_sharding=("heads",))
    elif g.gate == "scalar":  # one data-dependent gate per head (Mamba-2 style)
      up = make_linear(cfg, d, h, axes=("embed", None), role="in", **lin)
      bias = nnx.Param(jnp.zeros((h,), jnp.float32), out_sharding=(None,))
    self.gate_down, self.gate_up, self.gate_bias = down, up, bias
    self.gammas = tuple(float(x) for x in log_spaced_gammas(h))  # gate "fixed"
    self.norm = RMSNorm(self.dv, eps=cfg.norm_eps, dtype=jnp.float32)
    self.r = (make_linear(cfg, d, vd, axes=("embed", "heads"), role="in", **lin)
              if g.output_gate else None)
    self.o = make_linear(cfg, vd, d, axes=("heads", "embed"), role="out", **lin)

  def _log_alpha(self, x, b, t):
    h = self.num_heads
    if self.gate_kind == "vector":
      z = self.gate_up(self.gate_down(x)).astype(jnp.float32)
      z = z + self.gate_bias[...].reshape(1, 1, -1)
      return jax.nn.log_sigmoid(z).reshape(b, t, h, self.dk) / self.tau
    if self.gate_kind == "scalar":
      z = self.gate_up(x).astype(jnp.float32) + self.gate_bias[...].reshape(1, 1, -1)
      return jax.nn.log_sigmoid(z) / self.tau  # [b, t, h]
    if self.gate_kind == "fixed":
      return jnp.broadcast_to(jnp.log(jnp.asarray(self.gammas, jnp.float32)), (b, t, h))
    return jnp.zeros((b, t, h), jnp.float32)  # none: linear attention

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    b, t, _ = x.shape
    h = self.num_heads
    q = self.q(x).reshape(b, t, h, self.dk) / math.sqrt(self.dk)
    k = self.k(x).reshape(b, t, h, self.dk)
    v = self.v(x).reshape(b, t, h, self.dv)
    q = constrain(q, ("batch", "seq", "act_heads", None))
    o = self._diagonal(q, k, v, self._log_alpha(x, b, t), ctx)
    o = self.norm(o).reshape(b, t, h * self.dv).astype(self.dtype)
    if self.r is not None:
      o = jax.nn.silu(self.r(x)) * o
    return self.o(o)

  def flops_per_token(self, seq_len: int) -> float:
    d, h = self.d_model, self.num_heads
    kd, vd = h * self.dk, h * self.dv
    proj = 2 * d * (2 * kd + vd + (vd if self.r is not None else 0)) + 2 * vd * d
    if self.gate_kind == "vector":
      proj += 2 * self.rank * (d + kd)
    elif self.gate_kind == "scalar":
      proj += 2 * d * h
    return proj + self._core_flops(seq_len, h, self.dk, self.dv,
                                   vector=self.gate_kind == "vector")


def _causal_conv(x, w, history):
  """Depthwise causal convolution: y_t = sum_i w[i] x_{t - (K-1) + i}; x [b, t, c], w [K, c],
  history [b, K-1, c] (the inputs before x; zeros at a sequence start). Returns (y, the padded
  input [b, K-1+t, c])."""
  kk = w.shape[0]
  xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  t = x.shape[1]
  y = sum(xp[:, i:i + t] * w[i].astype(x.dtype).reshape(1, 1, -1) for i in range(kk))
  return y, xp


@SEQUENCE_MIXERS.register("deltaproduct")
class DeltaProduct(RecurrentMixer):
  """DeltaProduct_{n_h} (Siems et al. 2025, sec. 3): per token, the optional gate g_t, then
  S <- (I - beta_j k_j^T k_j) S + beta_j k_j^T v_j for j = 1..n_h, then o_t = q_t S_t; keys and
  queries L2-normalised, beta = sigmoid(x w_beta) (x 2 with negative eigenvalues). n_h = 1 is
  (gated) DeltaNet. Read-out: per-head RMSNorm x swish(x W_g), then W_O."""

  defaults = dict(deltaproduct=dict(householder=2, neg_eigval=True, gate=False, conv_size=4,
                                    value_ratio=1.0))
  _forms = ("recurrent", "chunkwise")  # the delta rule has no parallel or scan form here

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    self._setup(cfg, layer)
    p = cfg.attention.deltaproduct
    if p.householder < 1:
      raise ConfigError(f"model.attention.deltaproduct.householder must be >= 1, "
                        f"got {p.householder}")
    if p.conv_size < 0:
      raise ConfigError(f"model.attention.deltaproduct.conv_size must be >= 0, got {p.conv_size}")
    h, d = cfg.num_heads, cfg.d_model
    self.nh, self.dk = p.householder, cfg.head_dim
    self.dv = int(p.value_ratio * cfg.head_dim)
    self.neg_eigval, self.conv_size, self.dtype = p.neg_eigval, p.conv_size, dtype
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.q = make_linear(cfg, d, h * self.dk, axes=("embed", "heads"), role="in", **lin)
    self.k = make_linear(cfg, d, self.nh * h * self.dk, axes=("embed", "heads"), role="in", **lin)
    self.v = make_linear(cfg, d, self.nh * h * self.dv, axes=("embed", "heads"), role="in", **lin)
    self.beta = make_linear(cfg, d, self.nh * h, axes=("embed", None), role="in", **lin)
    gate = a_log = dt_bias = None
    if p.gate:  # g_t = exp(-exp(A_log) softplus(x w_a + dt_bias)); A ~ U(0, 16),
      # dt ~ logU(1e-3, 0.1)
      gate = make_linear(cfg, d, h, axes=("embed", None), role="in", **lin)
      a = jax.random.uniform(rngs.params(), (h,), jnp.float32, 1e-4, 16.0)
      dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32,
                                      math.log(1e-3), math.log(1e-1)))
      a_log = nnx.Param(jnp.log(a), out_sharding=(None,))
      dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), out_sharding=(None,))
    self.gate, self.a_log, self.dt_bias = gate, a_log, dt_bias
    self.channels = h * (self.dk + self.nh * self.dk + self.nh * self.dv)
    conv = None
    if self.conv_size:  # PyTorch Conv1d's default init: U(-1/sqrt(K), 1/sqrt(K))
      bound = 1.0 / math.sqrt(self.conv_size)
      conv = nnx.Param(jax.random.uniform(rngs.params(), (self.conv_size, self.channels),
                                          jnp.float32, -bound, bound),
                       out_sharding=(None, "heads"))
    self.conv = conv
    self.norm = RMSNorm(self.dv, eps=cfg.norm_eps, dtype=jnp.float32)
    self.g = make_linear(cfg, d, h * self.dv, axes=("embed", "heads"), role="in", **lin)
    self.o = make_linear(cfg, h * self.dv, d, axes=("heads", "embed"), role="out", **lin)

  def _short_conv(self, qkv, ctx):
    """The causal convolution + SiLU over [q | k | v]; decoding carries its last K-1 inputs."""
    if self.conv is None:
      return qkv
    b, t, c = qkv.shape
    name = f"layer{self.layer}/conv"
    hist = None if ctx.cache is None else ctx.cache.state(name)
    if hist is None:
      hist = jnp.zeros((b, self.conv_size - 1, c), qkv.dtype)
    y, xp = _causal_conv(qkv, self.conv[...], hist)
    if ctx.cache is not None:
      real = ctx.cache.real
      n = jnp.full((b,), t, jnp.int32) if real is None else real
      idx = n[:, None] + jnp.arange(self.conv_size - 1)[None, :]  # the last K-1 real inputs
      ctx.cache = ctx.cache.set_state(name, jnp.take_along_axis(xp, idx[:, :, None], axis=1))
    return jax.nn.silu(y)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    b, t, _ = x.shape
    h, nh, dk, dv = self.num_heads, self.nh, self.dk, self.dv
    qkv = jnp.concatenate([self.q(x), self.k(x), self.v(x)], axis=-1)
    qkv = self._short_conv(qkv, ctx).astype(jnp.float32)
    q, k, v = jnp.split(qkv, [h * dk, h * dk + nh * h * dk], axis=-1)
    l2 = lambda z: z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-6)
    # the projections' columns are (head, sub-step, dim): a head's n_h keys and values stay
    # on one shard when `tensor` splits the heads
    q = l2(q.reshape(b, t, h, dk)) / math.sqrt(dk)
    k = l2(jnp.swapaxes(k.reshape(b, t, h, nh, dk), 2, 3))
    v = jnp.swapaxes(v.reshape(b, t, h, nh, dv), 2, 3)
    beta = jnp.swapaxes(jax.nn.sigmoid(self.beta(x).astype(jnp.float32)).reshape(b, t, h, nh),
                        2, 3)
    if self.neg_eigval:  # eigenvalue 1 - beta along k in (-1, 1)
      beta = 2.0 * beta
    log_g = None
    if self.gate is not None:
      z = self.gate(x).astype(jnp.float32) + self.dt_bias[...].reshape(1, 1, -1)
      log_g = -jnp.exp(self.a_log[...]).reshape(1, 1, -1) * jax.nn.softplus(z)  # [b, t, h]
    real = self._real(ctx, t)
    if real is not None:  # padding: beta 0 and gate 1, an identity transition
      beta = jnp.where(real[..., None], beta, 0.0)
      log_g = None if log_g is None else jnp.where(real, log_g, 0.0)
    s0 = self._state_in(ctx)
    if self._form(ctx, t) == "recurrent":
      out, s = core.householder_recurrent(q, k, v, beta, log_g, s0)
    else:
      long = core.interleave_householder(q, k, v, beta, log_g)
      out, s = core.delta_chunkwise(*long, chunk=self.chunk, initial_state=s0)
      out = core.every_last(out, nh)
    self._state_out(ctx, s)
    o = self.norm(out).reshape(b, t, h * dv).astype(self.dtype)
    o = jax.nn.silu(self.g(x)) * o
    return self.o(o)

  def flops_per_token(self, seq_len: int) -> float:
    d, h = self.d_model, self.num_heads
    proj = 2 * d * h * (self.dk + self.nh * (self.dk + self.dv + 1) + self.dv) + 2 * h * self.dv * d
    if self.gate is not None:
      proj += 2 * d * h
    conv = 2 * self.conv_size * self.channels
    return proj + conv + self.nh * self._delta_flops(seq_len * self.nh, h, self.dk, self.dv)


LOWER_BOUNDS = Slot("mlgru_lower_bounds")  # [num_layers, d]: block 0 writes, every block reads


@SEQUENCE_MIXERS.register("mlgru")
class MLGRU(RecurrentMixer):
  """The MatMul-free LM's token mixer (Zhu et al. 2024, sec. 3.2): per channel,
    f_t = lb_l + (1 - lb_l) sigmoid(x W_f),  c_t = silu(x W_c),
    h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t,
  and o_t = (RMSNorm(x W_g) ⊙ silu(h_t)) W_O (the released code) or (sigmoid(x W_g) ⊙ h_t) W_O
  (the paper's text). lb = cumsum(softmax(P, layers)) - softmax(P)[0] (HGRN), so block 0 has
  none and the bound rises with depth; P [L, d] lives in block 0 and reaches the others through
  the slot LOWER_BOUNDS. The recurrence is the diagonal core with one head per channel."""

  defaults = dict(mlgru=dict(lower_bound=True, output="code"))
  _outputs = ("code", "paper")

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    self._setup(cfg, layer)
    m = cfg.attention.mlgru
    self._one_of("mlgru.output", m.output, self._outputs)
    d = cfg.d_model
    self.lower_bound, self.output, self.dtype = m.lower_bound, m.output, dtype
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.f = make_linear(cfg, d, d, axes=("embed", "mlp"), role="in", **lin)
    self.c = make_linear(cfg, d, d, axes=("embed", "mlp"), role="in", **lin)
    self.g = make_linear(cfg, d, d, axes=("embed", "mlp"), role="in", **lin)
    self.o = make_linear(cfg, d, d, axes=("mlp", "embed"), role="out", **lin)
    self.g_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=jnp.float32) if m.output == "code" else None
    self.bounds = (nnx.Param(jnp.zeros((cfg.num_layers, d), jnp.float32), out_sharding=(None, None))
                   if m.lower_bound and layer == 0 else None)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    b, t, d = x.shape
    f = jax.nn.sigmoid(self.f(x).astype(jnp.float32))
    if self.lower_bound:
      if self.bounds is not None:
        p = jax.nn.softmax(self.bounds[...], axis=0)
        ctx.write(LOWER_BOUNDS, jnp.cumsum(p, axis=0) - p[:1])
      lb = ctx.read(LOWER_BOUNDS)
      if lb is None:
        raise ValueError("mlgru: the lower bounds are written by block 0, which did not run")
      if self.layer > 0:
        # an extra block past the decoder's (MTP's, layer L + 1) takes the last block's bound
        row = lb[min(self.layer, lb.shape[0] - 1)].reshape(1, 1, -1)
        f = row + (1.0 - row) * f
    log_f = jnp.log(jnp.maximum(f, 1e-30))
    c = jax.nn.silu(self.c(x).astype(jnp.float32))
    # one head per channel, d_k = d_v = 1: S = h, k = 1 - f, v = c, q = 1
    hid = self._diagonal(jnp.ones((b, t, d, 1), jnp.float32), (1.0 - f)[..., None],
                         c[..., None], log_f, ctx)[..., 0]
    if self.output == "code":
      o = self.g_norm(self.g(x).astype(jnp.float32)) * jax.nn.silu(hid)
    else:
      o = jax.nn.sigmoid(self.g(x).astype(jnp.float32)) * hid
    return self.o(o.astype(self.dtype))

  def flops_per_token(self, seq_len: int) -> float:
    d = self.d_model
    return 2 * d * d * 4 + self._core_flops(seq_len, d, 1, 1)
