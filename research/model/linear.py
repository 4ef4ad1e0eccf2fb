"""Linear-layer family (`model.linear.kind`) and the weight-init rules of the projections.

Every projection in the decoder is made by `make_linear`, so an option registered here (SDD,
fake-quantized QAT, ...) reaches every block without touching the other families. Kernels are
stored in the parameter dtype (fp32) and cast to the compute dtype at use.

  plain  y = x W (+ b)
  sdd    y = alpha * z / rms(z), z = x W     Scale-Distribution Decoupling (Wang et al. 2025,
                                             eq. 3): the normalization fixes the output scale,
                                             the per-channel alpha sets it
  bitlinear  y = Q8(RMSNorm(x)) T(W)         the MatMul-free LM's BitLinear (Zhu et al. 2024,
                                             sec. 3.1): ternary weights with one absmean scale
                                             per tensor, 8-bit absmax activations per token,
                                             straight-through gradients to fp32 latent weights
  qat    y = Qa(x) Qw(W)                     QAT (Chen et al. 2025): AbsMax fake quantization of
                                             weights and inputs in groups of G along the input
                                             dimension (W4A4, W4A16, W16A4; FC2's input at 8 bits)

Each projection has a role: "in" (q, k, v, FFN up and gate) or "out" (attention and FFN output
projections, which write into the residual stream). The role selects the init: weights are
N(0, init_std^2), output projections scaled by `model.init_out_scaling`
(none | total_depth: 1/sqrt(2 L), Megatron / GPT-2 | layer_depth: 1/sqrt(2 l), l = layer + 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.norms import rms_norm
from research.errors import ConfigError
from research.model.option import Option
from research.model.registry import Registry


class Linear(Option):
  """Base of `model.linear.kind` options: (in_features, out_features, *, axes, std, use_bias,
  dtype, rngs, cfg, gain, site) -> a module x [..., in] -> [..., out]; `site` names a projection
  an option may treat apart ("fc2": the FFN's down projection). Hook: `depth_scaling_in_gain`,
  whether make_linear hands an output projection's depth factor to the option as `gain` (its
  kernel then keeps the plain init_std) instead of folding it into the kernel's std."""

  HOOKS = ("depth_scaling_in_gain",)
  depth_scaling_in_gain = False
  defaults = dict(use_bias=False)


LINEARS = Registry("model.linear.kind", base=Linear, default="plain")
ROLES = ("in", "out")
OUT_SCALINGS = ("none", "total_depth", "layer_depth")


def token_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] -> [..., out], computed as one 2-D matmul over the flattened
  tokens. A dot over [batch, seq, in] has a backward whose weight gradient contracts two
  dimensions; XLA:CPU canonicalizes that by materializing the output gradient transposed
  (an extra pass over every [tokens, out] activation gradient, and the elementwise backward
  before it computed twice, once per layout). As a 2-D dot the same transpose is a flag of
  the matmul: the tiny baseline's training step went from 57 to 47 ms on a 2-core CPU (both
  forms compiled in one process, medians of 8 alternating 50-step windows). Merging the leading dims keeps their sharding (batch, then
  sequence) on the merged one."""
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


def init_std(cfg) -> float:
  """`model.init_std`; 0 means 1/sqrt(2.5 d_model) (the HybridNorm / SDD / PolyCom papers)."""
  return cfg.init_std if cfg.init_std > 0 else 1.0 / math.sqrt(2.5 * cfg.d_model)


def out_depth_factor(cfg, layer: int) -> float:
  """The factor on an output projection's init (and on SDD's output gain) at `layer`."""
  scaling = cfg.init_out_scaling
  if scaling == "none":
    return 1.0
  if scaling == "total_depth":
    return 1.0 / math.sqrt(2 * cfg.num_layers)
  if scaling == "layer_depth":
    return 1.0 / math.sqrt(2 * (layer + 1))
  raise ValueError(f"model.init_out_scaling='{scaling}' is not one of {', '.join(OUT_SCALINGS)}")


@LINEARS.register("plain")
class PlainLinear(Linear):
  """y = x W (+ b), W: [in, out] with logical axes `axes`."""

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
               use_bias: bool, dtype, rngs: nnx.Rngs, cfg=None, gain: float = 1.0,
               site: str = ""):
    del cfg, gain
    init = jax.nn.initializers.normal(std)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32),
                            out_sharding=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), out_sharding=(axes[1],))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = token_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


@LINEARS.register("sdd")
class SDDLinear(Linear):
  """Scale-Distribution Decoupling: y = alpha ⊙ z / sqrt(mean(z^2) + eps), z = x V (eq. 3).

  The RMS is taken per token over the output features; alpha is one gain per output feature,
  initialised to 1, or to 1/sqrt(2L) on output projections (the official code's rule; the paper
  writes 1/sqrt(L)) -- `gain` carries that value. V has no depth scaling: make_linear gives SDD
  the plain init_std on every projection, so the depth scaling lives in alpha alone.
  """

  depth_scaling_in_gain = True  # make_linear passes the output-projection factor as `gain`

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
               use_bias: bool, dtype, rngs: nnx.Rngs, cfg=None, gain: float = 1.0,
               site: str = ""):
    if use_bias:
      raise ValueError("model.linear.kind='sdd' has no bias (its normalization removes it); "
                       "set model.linear.use_bias=False")
    self.proj = PlainLinear(in_features, out_features, axes=axes, std=std, use_bias=False,
                            dtype=dtype, rngs=rngs)
    self.alpha = nnx.Param(jnp.full((out_features,), gain, jnp.float32), out_sharding=(axes[1],))
    self.eps = cfg.norm_eps if cfg is not None else 1e-5
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(self.proj(x), self.alpha[...], self.eps).astype(self.dtype)


def quantize_activations(x: jax.Array, bits: int) -> jax.Array:
  """Per-token absmax quantization to `bits` (BitNet / MatMul-free LM): s = (2^(b-1) - 1) /
  max|x| (max clamped at 1e-5), x_q = clip(round(x s), -2^(b-1), 2^(b-1) - 1) / s."""
  top = 2.0 ** (bits - 1)
  scale = (top - 1) / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-5)
  return jnp.clip(jnp.round(x * scale), -top, top - 1) / scale


def ternarize(w: jax.Array) -> jax.Array:
  """Per-tensor absmean ternary weights: gamma = mean|W| (clamped at 1e-5),
  W_q = clip(round(W / gamma), -1, 1) gamma. The mean runs over the whole (sharded) tensor."""
  gamma = jnp.maximum(jnp.mean(jnp.abs(w)), 1e-5)
  return jnp.clip(jnp.round(w / gamma), -1.0, 1.0) * gamma


def straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
  """The quantized value forward, the identity's gradient backward (x + sg(q(x) - x))."""
  return x + jax.lax.stop_gradient(quantized - x)


@LINEARS.register("bitlinear")
class BitLinear(Linear):
  """BitLinear (MatMul-free LM, sec. 3.1; the released code's `BitLinear`): its own RMSNorm of
  the input (a gain per input feature, eps 1e-8), activations quantized per token to
  `act_bits`, weights ternary with one absmean scale per tensor, both through straight-through
  estimators; the optimizer keeps fp32 latent weights and evaluation uses the quantized ones
  (the forward always quantizes). The embedding and the LM head are not linears of this
  family, so they stay in full precision, as in the paper."""

  defaults = dict(bitlinear=dict(act_bits=8, norm=True))

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
               use_bias: bool, dtype, rngs: nnx.Rngs, cfg=None, gain: float = 1.0,
               site: str = ""):
    del gain
    b = cfg.linear.bitlinear if cfg is not None else None
    self.act_bits = b.act_bits if b is not None else 8
    if not 2 <= self.act_bits <= 16:
      raise ValueError(f"model.linear.bitlinear.act_bits must be in 2..16, got {self.act_bits}")
    self.proj = PlainLinear(in_features, out_features, axes=axes, std=std, use_bias=use_bias,
                            dtype=dtype, rngs=rngs)
    self.norm = (nnx.Param(jnp.ones((in_features,), jnp.float32), out_sharding=(axes[0],))
                 if b is None or b.norm else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.norm is not None:
      x = rms_norm(x, self.norm[...], 1e-8)
    x = straight_through(x, quantize_activations(x, self.act_bits))
    w = self.proj.kernel[...]
    w = straight_through(w, ternarize(w))
    y = token_matmul(x.astype(self.dtype), w.astype(self.dtype))
    if self.proj.bias is not None:
      y = y + self.proj.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def group_absmax_quantize(x: jax.Array, bits: int, group: int) -> jax.Array:
  """Symmetric AbsMax fake quantization along the last axis in contiguous groups of `group`
  values (0: the whole axis, per token / per output channel): s = max|x| / (2^(b-1) - 1) per
  group, x_q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1) s (the codes of |x| <= max use
  2^b - 1 levels). Bits >= 16: x unchanged (that side is not quantized)."""
  if bits >= 16:
    return x
  n = x.shape[-1]
  g = n if group == 0 else group
  xg = x.reshape(*x.shape[:-1], n // g, g)
  top = 2.0 ** (bits - 1)
  scale = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1, keepdims=True), 1e-8) / (top - 1)
  return (jnp.clip(jnp.round(xg / scale), -top, top - 1) * scale).reshape(x.shape)


@LINEARS.register("qat")
class QATLinear(Linear):
  """Quantization-aware training (Scaling Law for QAT, arXiv:2505.14302 §3.3): the kernel
  [in, out] fake-quantized to `w_bits` in groups of `group` along its input dimension, the
  input to `a_bits` in groups of `group` along its features, both by AbsMax through straight-
  through estimators; the FFN's down projection (FC2, `site="fc2"`) reads its input at
  `fc2_a_bits` when that is not 0 (the paper's fix: FC2's input at 8 bits). 16 bits: that side
  in full precision (W4A16, W16A4). The embedding and the head are not linears of this family.
  """

  defaults = dict(qat=dict(w_bits=4, a_bits=4, group=32, fc2_a_bits=0))  # group 0: per channel

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
               use_bias: bool, dtype, rngs: nnx.Rngs, cfg=None, gain: float = 1.0,
               site: str = ""):
    del gain
    q = cfg.linear.qat
    if cfg.channel.kind != "ffn":
      raise ConfigError(f"model.linear.kind='qat' reaches the linears made by make_linear; "
                        f"model.channel.kind='{cfg.channel.kind}' has its own matmuls, which "
                        "would stay in full precision")
    fc2 = site == "fc2" and q.fc2_a_bits
    a_bits = q.fc2_a_bits if fc2 else q.a_bits
    for name, bits in (("w_bits", q.w_bits), ("fc2_a_bits" if fc2 else "a_bits", a_bits)):
      if not 2 <= bits <= 16:
        raise ConfigError(f"model.linear.qat.{name}={bits} must be in 2..16 (16: not quantized)")
    if q.group < 0 or (q.group and in_features % q.group):
      raise ConfigError(f"model.linear.qat.group={q.group} must divide every linear's input "
                        f"width ({in_features} here; 0 = per channel / per token)")
    self.w_bits, self.a_bits, self.group = q.w_bits, a_bits, q.group
    self.proj = PlainLinear(in_features, out_features, axes=axes, std=std, use_bias=use_bias,
                            dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = straight_through(x, group_absmax_quantize(x, self.a_bits, self.group))
    w = self.proj.kernel[...]  # [in, out]: groups along the input dimension
    wq = group_absmax_quantize(w.T, self.w_bits, self.group).T
    w = straight_through(w, wq)
    y = token_matmul(x.astype(self.dtype), w.astype(self.dtype))
    if self.proj.bias is not None:
      y = y + self.proj.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def make_linear(cfg, in_features: int, out_features: int, *, axes: Sequence[str], role: str,
                layer: int, dtype, rngs: nnx.Rngs, site: str = "") -> nnx.Module:
  """Builds the configured linear layer of `role` ("in" or "out") in block `layer`; `cfg` is
  `config.model`."""
  if role not in ROLES:
    raise ValueError(f"linear role '{role}' is not one of {', '.join(ROLES)}")
  cls = LINEARS.get(cfg.linear.kind)
  depth = out_depth_factor(cfg, layer) if role == "out" else 1.0
  if cls.depth_scaling_in_gain:
    std, gain = init_std(cfg), depth
  else:
    std, gain = init_std(cfg) * depth, 1.0
  return cls(in_features, out_features, axes=axes, std=std, use_bias=cfg.linear.use_bias,
             dtype=dtype, rngs=rngs, cfg=cfg, gain=gain, site=site)
