"""Residual-stream family (`model.residual.kind`).

The decoder keeps a residual *stream*; each sublayer reads from it and writes back through a
residual connection. One connection object exists per sublayer (attention and channel mixer of
every block: sublayer index k = 2 * block + {0, 1}), so each can own its parameters.

  plain  h <- h + f(h)
  hyper  Hyper-connections (Zhu et al., ICLR 2025, arXiv:2409.19606 v3): n copies of the stream,
         read / written / mixed by learned (static) or input-predicted (dynamic) weights.
  frac   Frac-connections (Zhu et al. 2025, arXiv:2503.14125): the stream of width D split into
         m fractions of width D/m that the same machinery mixes; no extra memory.
  vwn    Virtual Width Networks (Seed 2025, arXiv:2511.11238): generalized hyper-connections
         (GHC) between an over-width state of n slots of width D/m (D' = (n/m) D) and the
         backbone's input/output of m segments (width D).

All three are one computation, VWN's generalized hyper-connection (GHC), with S slots of width
w in the stream and m backbone segments: per token the stream is H in R^{S x w} and

  alpha = [A_read | A_carry] in R^{S x (m+S)},  beta = B^T in R^{S x m} (frac: diagonal, S = m)
  mix   = alpha^T H                                   [(m+S) x w]
  x     = concat(mix[:m])                             the sublayer input, width m w = D
  H'    = beta y_segments + mix[m:]                   y = f(x), cut into m segments of width w

  hyper: S = n, m = 1, w = D      frac: S = m, w = D/m      vwn: S = n, w = D/m

Dynamic weights add s * tanh(norm(H) W) to the static ones, row by row from each slot's own
normalized vector (DHC, DFC, DGHC); `tanh=False` drops the tanh. Pseudocode references: HC
App. J Alg. 2-3, FC App. A Alg. 2-3, VWN App. B Alg. 2-3.

The protocol of an option class R (registered here):

  R(dim, cfg=, layer=, dtype=, rngs=)   one connection; conn(stream, f) -> stream, where f maps
                                        [batch, seq, d_model] -> [batch, seq, d_model];
                                        conn.flops_per_token(); conn.matrix() -> the static
                                        connection matrix (for heat maps), or None
  R.stream_adapter(cfg, dtype=, rngs=)  the module the decoder owns once: expand(h) turns the
                                        embedding into the stream, collapse(stream) turns the
                                        stream into [batch, seq, d_model] before the final norm
                                        (VWN's has parameters: group norm + reduce projection)

Static connection parameters are stored flat (1-D): the optimizer decays only parameters with
two or more dimensions, and the papers exclude the static weights (and the scales) from weight
decay; the dynamic projections W are matrices and are decayed, as the papers say.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.errors import ConfigError
from research.model.option import Option
from research.model.registry import Registry
from research.sharding import constrain

REDUCE_NORMS = ("auto", "on", "off")
REDUCE_INITS = ("random", "select")
TEMPERATURES = ("sqrt", "width")
STREAM_AXES = ("batch", "seq", "act_stream", "act_embed")


# ------------------------------------------------------------------ stream adapters

class PlainStream(nnx.Module):
  """The stream is the embedding itself: expand and collapse are the identity."""

  segment_width_of = staticmethod(lambda cfg: cfg.d_model)
  width_of = staticmethod(lambda cfg: cfg.d_model)  # features per token in the stream

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    del dtype, rngs
    self.d = cfg.d_model

  def expand(self, h: jax.Array) -> jax.Array:
    """[batch, seq, embed] embeddings -> the stream (identity here)."""
    _check_embedding_width(h, self.d)
    return h

  def collapse(self, stream: jax.Array) -> jax.Array:
    """The stream -> [batch, seq, embed] for the final norm and head (identity here)."""
    return stream

  @staticmethod
  def flops(cfg) -> float:
    del cfg
    return 0.0

  def flops_per_token(self) -> float:
    return 0.0


class HyperStream(nnx.Module):
  """HC's expand once / reduce once (Alg. 1): H^0 = n copies of the embedding; the output is the
  sum of the n streams (then the final norm). Stream: [batch, seq, n, embed]."""

  segment_width_of = staticmethod(lambda cfg: cfg.d_model)
  width_of = staticmethod(lambda cfg: hyper_streams(cfg) * cfg.d_model)

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    del dtype, rngs
    self.streams, self.d = hyper_streams(cfg), cfg.d_model

  def expand(self, h: jax.Array) -> jax.Array:
    _check_embedding_width(h, self.d)
    b, s, d = h.shape
    return constrain(jnp.broadcast_to(h[:, :, None, :], (b, s, self.streams, d)), STREAM_AXES)

  def collapse(self, stream: jax.Array) -> jax.Array:
    return jnp.sum(stream, axis=-2)

  @staticmethod
  def flops(cfg) -> float:
    return float((hyper_streams(cfg) - 1) * cfg.d_model)  # the sum over streams

  def flops_per_token(self) -> float:
    return float((self.streams - 1) * self.d)


class VirtualWidthStream(nnx.Module):
  """VWN's model-level ends (over-width embedding in, group norm + reduce out). The over-width
  embedding (embedding.py, `over_width`) already has width D'; expand only lays it out as
  [batch, seq, D'/D, D] (groups of d_model, so that a post-norm placement normalizes each group,
  like the paper's group norm) or, when D' is not a multiple of D (1.5x), as [batch, seq, D'].
  collapse: group RMS norm (groups of D, a gain per feature; `reduce_norm`) then W_reduce:
  D' -> D, before the usual final norm."""

  segment_width_of = staticmethod(lambda cfg: vwn_shape(cfg)[2])
  width_of = staticmethod(lambda cfg: virtual_width(cfg))

  def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
    self.d, self.wide = cfg.d_model, virtual_width(cfg)
    self.groups = self.wide // self.d if self.wide % self.d == 0 else 0
    self.dtype, self.eps = dtype, cfg.norm_eps
    self.group_norm = _reduce_norm_on(cfg)
    self.norm_scale = (nnx.Param(jnp.ones((self.wide,), jnp.float32), out_sharding=("norm",))
                       if self.group_norm else None)
    if cfg.residual.reduce_init == "select":  # W_reduce picks the first D features
      kernel = jnp.eye(self.wide, self.d, dtype=jnp.float32)
    else:  # fan-in init: unit-RMS inputs (after the group norm) give unit-RMS outputs
      kernel = jax.random.normal(rngs.params(), (self.wide, self.d), jnp.float32)
      kernel = kernel / math.sqrt(self.wide)
    self.reduce = nnx.Param(kernel, out_sharding=(None, "embed"))

  def expand(self, h: jax.Array) -> jax.Array:
    b, s, wide = h.shape
    if wide != self.wide:
      raise ConfigError(f"model.residual.kind='vwn' needs an embedding of width D'={self.wide} "
                        f"(model.embed.kind='over_width'), got width {wide}")
    if not self.groups:
      return constrain(h, ("batch", "seq", "act_embed"))
    return constrain(h.reshape(b, s, self.groups, self.d), STREAM_AXES)

  def collapse(self, stream: jax.Array) -> jax.Array:
    b, s = stream.shape[:2]
    x = stream.reshape(b, s, self.wide).astype(jnp.float32)
    if self.group_norm:  # VWN: GroupNorm with groups of D, then Reduce (Fig. 3)
      g = x.reshape(b, s, self.wide // self.d, self.d)
      g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.eps)
      x = g.reshape(b, s, self.wide) * self.norm_scale[...].reshape(1, 1, self.wide)
    x = x.astype(self.dtype)
    return jnp.dot(x, self.reduce[...].astype(self.dtype))

  @staticmethod
  def flops(cfg) -> float:
    return 2.0 * virtual_width(cfg) * cfg.d_model  # W_reduce

  def flops_per_token(self) -> float:
    return 2.0 * self.wide * self.d


class Residual(Option):
  """Base of `model.residual.kind` options: how a sublayer f joins the residual stream,
  (stream, f) -> stream. Hooks: `stream_adapter`, the module class that maps the embedding to
  the stream and the stream back to one hidden state (PlainStream here); `flops_per_token()`;
  `matrix()`, the static connection matrix drawn at the end of a run (None: nothing to draw)."""

  HOOKS = ("stream_adapter", "flops_per_token", "matrix")
  stream_adapter = PlainStream

  def flops_per_token(self) -> float:
    raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")

  def matrix(self) -> np.ndarray | None:
    return None


RESIDUALS = Registry("model.residual.kind", base=Residual, default="plain")


# ------------------------------------------------------------------ shapes and checks

def _check_embedding_width(h: jax.Array, d: int) -> None:
  """Checked when traced, not at construction, so that a model with one family set back to its
  default still builds (research/model/overhead.py compares such models)."""
  if h.shape[-1] != d:
    raise ConfigError(f"the embedding has width {h.shape[-1]} but this residual stream needs "
                      f"d_model={d}; model.embed.kind='over_width' goes with "
                      "model.residual.kind='vwn'")


def hyper_streams(cfg) -> int:
  n = cfg.residual.streams
  if n < 1:
    raise ConfigError(f"model.residual.streams={n} must be at least 1")
  return n


def frac_count(cfg) -> int:
  m = cfg.residual.fracs
  if m < 1:
    raise ConfigError(f"model.residual.fracs={m} must be at least 1")
  if cfg.d_model % m:
    raise ConfigError(f"model.d_model={cfg.d_model} is not divisible by model.residual.fracs={m}")
  return m


def vwn_shape(cfg) -> tuple[int, int, int]:
  """(m backbone segments, n over-width slots, slot width D/m) for VWN: n = r m must be an
  integer (r = n / m)."""
  if "expansion" not in cfg.residual:  # a resolved config holds only its residual's settings
    raise ConfigError(f"model.residual.kind='{cfg.residual.kind}' has no virtual width: "
                      "model.embed.kind='over_width' goes with model.residual.kind='vwn'")
  m, r = frac_count(cfg), cfg.residual.expansion
  if r < 1:
    raise ConfigError(f"model.residual.expansion={r} must be at least 1")
  n = r * m
  if abs(n - round(n)) > 1e-9:
    raise ConfigError(f"model.residual.expansion={r} times model.residual.fracs={m} is "
                      f"{n:g} slots, not an integer")
  return m, int(round(n)), cfg.d_model // m


def virtual_width(cfg) -> int:
  """D' = n D / m, the width of the over-width embedding and state."""
  m, n, w = vwn_shape(cfg)
  del m
  return n * w


def _reduce_norm_on(cfg) -> bool:
  mode, wide = cfg.residual.reduce_norm, virtual_width(cfg)
  if mode not in REDUCE_NORMS:
    raise ConfigError(f"model.residual.reduce_norm='{mode}' is not one of "
                      f"{', '.join(REDUCE_NORMS)}")
  if cfg.residual.reduce_init not in REDUCE_INITS:
    raise ConfigError(f"model.residual.reduce_init='{cfg.residual.reduce_init}' is not one of "
                      f"{', '.join(REDUCE_INITS)}")
  multiple = wide % cfg.d_model == 0
  if mode == "on" and not multiple:
    raise ConfigError(f"model.residual.reduce_norm='on' needs D'={wide} to be a multiple of "
                      f"model.d_model={cfg.d_model} (the group norm has groups of d_model)")
  return multiple if mode == "auto" else mode == "on"


def segment_width(cfg) -> int:
  """Width of one segment of the stream (the unit a multi-token head fuses): D, or D/m (VWN)."""
  return RESIDUALS.get(cfg.residual.kind).stream_adapter.segment_width_of(cfg)


# ------------------------------------------------------------------ the connection (GHC)

BROADCAST_MAX = 1280  # largest per-token product I K d that _contract broadcasts


def _contract(a: jax.Array, x: jax.Array) -> jax.Array:
  """out[..., k, d] = sum_i a[..., i, k] x[..., i, d], for per-token weights a [b, t, I, K] or
  shared ones a [I, K]; x: [b, t, I, d].

  Per-token weights are tiny matrices. XLA:CPU runs the batched dot as one small matmul per
  token, which loses to a fused broadcast-multiply-sum while the broadcast product I K d is
  small, and wins by far once it is not. Forward + backward of one whole dynamic connection
  (both contractions, a linear sublayer), 768 tokens, one CPU core, broadcast vs batched dot,
  (S, m, w): (4, 2, 32) 6.3 vs 10 ms; (4, 4, 16) 2.9 vs 10 ms; (8, 1, 64) 39 vs 12 ms;
  (8, 2, 32) 22 vs 12 ms; (16, 4, 16) 41 vs 19 ms; (16, 2, 32) 92 vs 20 ms; the r = 8 tiny
  model trains at 1.13 s/step instead of 2.17 with the batched dot there. bench/ghc_contract.py
  measures both (BROADCAST_MAX = 0: always the dot).
  The two differ only in the order of a float sum."""
  if a.ndim == 2:
    return jnp.einsum("ik,btid->btkd", a, x)
  i, k = a.shape[-2:]
  if i * k * x.shape[-1] <= BROADCAST_MAX:
    return jnp.sum(a[..., :, :, None] * x[..., :, None, :], axis=-3)
  return jnp.einsum("btik,btid->btkd", a, x)


def _rms(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free RMS normalization over the last axis (the norm before the dynamic
  projections; param-free like OLMo's LayerNorm in the HC paper's count)."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class MixingConnection(Residual):
  """One generalized hyper-connection (see the module docstring); `hyper`, `frac` and `vwn`
  give its sizes and initial values.

  static_alpha: [S, m+S] = [A_read | A_carry];  static_beta: [S, m] (B^T), or [S] (diagonal)
  dynamic: W: [w, (m+S) + (m or 1)], zeros; scales s_alpha, s_beta: scalars (HC, FC) or
  matrices shaped like the static parts (VWN); logits multiplied by `temperature`.
  """

  API = ("static_weights", "weights")  # read by research/eval/connections.py and the tests
  # input-dependent connection weights (DHC, DFC, DGHC), and the tanh on their logits
  defaults = dict(dynamic=True, tanh=True)

  def __init__(self, *, slots: int, segments: int, width: int, alpha0: np.ndarray,
               beta0: np.ndarray, dynamic: bool, tanh: bool, scale0: float, matrix_scales: bool,
               temperature: float, eps: float, dtype):
    s, m = slots, segments
    self.slots, self.segments, self.width = s, m, width
    self.diagonal = beta0.ndim == 1  # frac: beta_j scales output fraction j only
    self.dynamic, self.tanh, self.temperature, self.eps = dynamic, tanh, temperature, eps
    self.dtype = dtype
    assert alpha0.shape == (s, m + s) and beta0.shape in ((s, m), (s,))
    self.static_alpha = nnx.Param(jnp.asarray(alpha0, jnp.float32).reshape(-1),
                                  out_sharding=("stream",))
    self.static_beta = nnx.Param(jnp.asarray(beta0, jnp.float32).reshape(-1),
                                 out_sharding=("stream",))
    if dynamic:
      self.beta_cols = 1 if self.diagonal else m
      self.w_dynamic = nnx.Param(jnp.zeros((width, m + s + self.beta_cols), jnp.float32),
                                 out_sharding=("embed", "stream"))
      a_shape = (s * (m + s),) if matrix_scales else ()
      b_shape = (beta0.size,) if matrix_scales else ()
      axes = ("stream",) if matrix_scales else ()
      self.scale_alpha = nnx.Param(jnp.full(a_shape, scale0, jnp.float32), out_sharding=axes)
      self.scale_beta = nnx.Param(jnp.full(b_shape, scale0, jnp.float32), out_sharding=axes)

  # -- weights
  def static_weights(self) -> tuple[jax.Array, jax.Array]:
    s, m = self.slots, self.segments
    beta_shape = (s,) if self.diagonal else (s, m)
    return self.static_alpha[...].reshape(s, m + s), self.static_beta[...].reshape(beta_shape)

  def weights(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """slots: [batch, seq, S, w] -> alpha [.., S, m+S], beta [.., S, m] or [.., S] (fp32); the
    static weights alone (no batch axes) when the connection is static."""
    alpha0, beta0 = self.static_weights()
    if not self.dynamic:
      return alpha0, beta0
    s, m = self.slots, self.segments
    # DHC / DFC / DGHC: theta(H) = s * tanh(norm(H) W / tau) + theta_static (tau = 1 for HC, FC)
    logits = jnp.dot(_rms(slots.astype(jnp.float32), self.eps), self.w_dynamic[...])
    logits = logits * self.temperature
    act = jnp.tanh(logits) if self.tanh else logits
    lead = (1,) * (slots.ndim - 2)
    sa = self.scale_alpha[...].reshape(lead + (s, m + s)) if self.scale_alpha.ndim else \
        self.scale_alpha[...]
    alpha = alpha0.reshape(lead + alpha0.shape) + sa * act[..., :m + s]
    b_act = act[..., m + s:]
    if self.diagonal:
      b_act = b_act[..., 0]
    sb = self.scale_beta[...].reshape(lead + beta0.shape) if self.scale_beta.ndim else \
        self.scale_beta[...]
    beta = beta0.reshape(lead + beta0.shape) + sb * b_act
    return alpha, beta

  # -- forward
  def __call__(self, stream: jax.Array, f: Callable[[jax.Array], jax.Array]) -> jax.Array:
    b, t = stream.shape[:2]
    s, m, w = self.slots, self.segments, self.width
    h = stream.reshape(b, t, s, w).astype(jnp.float32)  # slots, mixed in fp32
    alpha, beta = self.weights(h)
    mix = _contract(alpha, h)  # width connection: [b, t, m+S, w]
    x = mix[:, :, :m, :].reshape(b, t, m * w).astype(self.dtype)
    y = f(x).astype(jnp.float32).reshape(b, t, m, w)
    if self.diagonal:  # FC: H'_j = beta_j y_j + carry_j
      write = (beta[..., None] if beta.ndim == 3 else beta.reshape(1, 1, s, 1)) * y
    else:  # GHC depth connection: H'_j = sum_i B_ij y_i + carry_j
      write = _contract(jnp.swapaxes(beta, -1, -2), y)
    out = (write + mix[:, :, m:, :]).reshape(stream.shape).astype(self.dtype)
    return constrain(out, STREAM_AXES if out.ndim == 4 else ("batch", "seq", "act_embed"))

  def flops_per_token(self) -> float:
    """Forward FLOPs per token (multiply-add = 2): width and depth connections, and the
    dynamic projections (norm and tanh are not counted, as norms are not elsewhere)."""
    s, m, w = self.slots, self.segments, self.width
    flops = 2 * s * (m + s) * w + (2 * s * w if self.diagonal else 2 * s * m * w)
    if self.dynamic:
      flops += 2 * s * w * (m + s + self.beta_cols)
    return float(flops)

  def matrix(self) -> np.ndarray:
    """The static connection matrix [[0, B], [A_read, A_carry]], (m+S) x (m+S): rows 0..m-1
    hold B (backbone output segment -> slot), rows m.. the slots' read and carry weights (HC
    matrix with m = 1; VWN's GHC matrix; for frac, B = diag(beta))."""
    alpha, beta = (np.asarray(x) for x in self.static_weights())
    s, m = self.slots, self.segments
    b = np.diag(beta) if self.diagonal else beta.T  # [m, S]
    out = np.zeros((m + s, m + s), np.float32)
    out[:m, m:] = b
    out[m:, :] = alpha
    return out


def _check_placement(cfg, layer: int, kind: str) -> None:
  """A post / normskip placement normalizes the stream itself with a d_model-wide norm."""
  from research.model.norms import NORM_PLACEMENTS  # norms does not import this module
  mode = NORM_PLACEMENTS.get(cfg.norm.kind).modes(layer // 2)[layer % 2]
  if mode in ("post", "normskip") and kind == "vwn" and virtual_width(cfg) % cfg.d_model:
    raise ConfigError(f"model.norm.kind='{cfg.norm.kind}' normalizes the stream in groups of "
                      f"d_model, but model.residual.kind='vwn' has D'={virtual_width(cfg)}, not a "
                      f"multiple of {cfg.d_model}; use an integer expansion or a pre placement")


# ------------------------------------------------------------------ the options

@RESIDUALS.register("plain")
class PlainResidual(Residual):
  """h <- h + f(h)."""

  def __init__(self, dim: int, *, cfg, layer: int, dtype, rngs: nnx.Rngs):
    del dim, cfg, layer, dtype, rngs

  def __call__(self, stream: jax.Array, f: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return stream + f(stream)

  def flops_per_token(self) -> float:
    return 0.0  # the add is not counted (elementwise work is not counted anywhere)


@RESIDUALS.register("hyper")
class HyperConnection(MixingConnection):
  """Hyper-connections, static (SHC) or dynamic (DHC), n = `residual.streams`.

  Init (the paper's): B = 1, A_m = e_{k mod n} (k: the sublayer index), A_r = I, W = 0,
  s_alpha = s_beta = 0.01, so every stream equals the pre-norm residual stream at step 0.
  """

  stream_adapter = HyperStream
  defaults = dict(streams=4)  # n

  def __init__(self, dim: int, *, cfg, layer: int, dtype, rngs: nnx.Rngs):
    del rngs
    n = hyper_streams(cfg)
    _check_placement(cfg, layer, "hyper")
    alpha0 = np.concatenate([np.eye(n)[:, [layer % n]], np.eye(n)], axis=1)  # [A_m | A_r]
    super().__init__(slots=n, segments=1, width=dim, alpha0=alpha0, beta0=np.ones((n, 1)),
                     dynamic=cfg.residual.dynamic, tanh=cfg.residual.tanh, scale0=0.01,
                     matrix_scales=False, temperature=1.0, eps=cfg.norm_eps, dtype=dtype)


@RESIDUALS.register("frac")
class FracConnection(MixingConnection):
  """Frac-connections, static (SFC) or dynamic (DFC), m = `residual.fracs` fractions of D/m.

  Init (FC App. A Alg. 2): Y = I, A = I, B = 1 (one gain per fraction: the paper's
  pseudocode scales output fraction j by beta_j), W = 0, s = 0.01: exactly pre-norm at step 0.
  The stream stays [batch, seq, D]; the fractions exist only inside the connection.
  """

  stream_adapter = PlainStream
  defaults = dict(fracs=4)  # m

  def __init__(self, dim: int, *, cfg, layer: int, dtype, rngs: nnx.Rngs):
    del rngs
    m = frac_count(cfg)
    _check_placement(cfg, layer, "frac")
    alpha0 = np.concatenate([np.eye(m), np.eye(m)], axis=1)  # [Y | A]
    super().__init__(slots=m, segments=m, width=dim // m, alpha0=alpha0, beta0=np.ones((m,)),
                     dynamic=cfg.residual.dynamic, tanh=cfg.residual.tanh, scale0=0.01,
                     matrix_scales=False, temperature=1.0, eps=cfg.norm_eps, dtype=dtype)


def ghc_initial_weights(slots: int, segments: int) -> tuple[np.ndarray, np.ndarray]:
  """VWN's initial GHC weights (App. B Alg. 2): alpha0 = [A_read | A_carry] with A_read =
  [I_m; 0] and A_carry = I_n, and beta0 = B^T with B[i, j] = 1 where j mod m = i."""
  read = np.zeros((slots, segments))
  read[:segments] = np.eye(segments)
  alpha0 = np.concatenate([read, np.eye(slots)], axis=1)
  beta0 = (np.arange(slots)[:, None] % segments == np.arange(segments)[None, :])
  return alpha0, beta0.astype(np.float32)


@RESIDUALS.register("vwn")
class VirtualWidthConnection(MixingConnection):
  """VWN's generalized hyper-connection between the D'-wide state (n slots of D/m) and the
  backbone's m segments; static (GHC) or dynamic (DGHC).

  Init (VWN, App. B Alg. 2): A_read = [I_m; 0] (the backbone reads the first D features), A_carry =
  I_n, B[i, j] = 1 where j mod m = i (cyclic write), W = 0; scales are matrices of ones (Sec.
  3.5); logits are scaled by 1/sqrt(D/m) (App. B pseudocode) or 1/(D/m) (the text's tau = D/m).
  """

  stream_adapter = VirtualWidthStream
  # fracs = m, expansion = r = n/m (D' = r D); reduce_norm auto|on|off (the group norm before
  # W_reduce; auto: when D' % D == 0); reduce_init random|select (W_reduce picks the first D
  # features); temperature sqrt|width (tanh logits / sqrt(D/m) as the paper's pseudocode, or
  # / (D/m) as its text)
  defaults = dict(fracs=4, expansion=2.0, reduce_norm="auto", reduce_init="random",
                  temperature="sqrt")

  def __init__(self, dim: int, *, cfg, layer: int, dtype, rngs: nnx.Rngs):
    del rngs, dim
    m, n, w = vwn_shape(cfg)
    _check_placement(cfg, layer, "vwn")
    tau = cfg.residual.temperature
    if tau not in TEMPERATURES:
      raise ConfigError(f"model.residual.temperature='{tau}' is not one of "
                        f"{', '.join(TEMPERATURES)}")
    alpha0, beta0 = ghc_initial_weights(n, m)
    super().__init__(slots=n, segments=m, width=w, alpha0=alpha0, beta0=beta0,
                     dynamic=cfg.residual.dynamic, tanh=cfg.residual.tanh, scale0=1.0,
                     matrix_scales=True,
                     temperature=1.0 / math.sqrt(w) if tau == "sqrt" else 1.0 / w,
                     eps=cfg.norm_eps, dtype=dtype)

