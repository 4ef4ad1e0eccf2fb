"""Channel-mixer family (`model.channel.kind`) and FFN activations.

`ffn` is the position-wise feed-forward block; its activation (`model.channel.activation`) is
a registry of its own: gated ones (SwiGLU) use two input projections, plain ones one, so a
plain activation gets 1.5x the hidden width of a gated one at equal parameters
(research/model/options.py: resolve_model, d_ff = 8/3 d gated, 4 d plain). An activation is a
function, or an nnx.Module class for those with parameters (PolyCom's coefficients). MoE,
UltraMem and other channel mixers register
beside `ffn`.

  swiglu    silu(x W_gate) * (x W_up)                     gated
  gelu      gelu(x), tanh approximation
  relu      max(x, 0)
  relu2     max(x, 0)^2                                   (So et al. 2021, Primer)
  polyrelu  sum_i a_i relu(x)^i + a_0                     PolyCom Type I (Zhuo et al. 2025)
  polynorm  sum_i a_i N(x^i) + a_0, N = RMS over d_ff     PolyCom Type II
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from research.model.linear import make_linear
from research.model.option import Option
from research.model.registry import Registry
from research.sharding import constrain


class ChannelMixer(Option):
  """Base of `model.channel.kind` options: the block's channel mixer, (x [b, t, d], ctx) ->
  [b, t, d]. Hooks: `flops_per_token(seq_len)` (every option); `resolve(m)`, derived fields of
  `config.model` filled and checked by run_config.resolve; `lr_multipliers(m, steps)`, per-parameter
  lr multipliers for research.train.optim; `sparse_parameters()`, the partly read parameter
  tables [(items, params per item, items read per token)] for research/model/accounting.py."""

  HOOKS = ("flops_per_token", "resolve", "lr_multipliers", "sparse_parameters")
  # the FFN every channel mixer builds on: its activation (ACTIVATIONS), width (0: 8/3 d
  # gated, 4 d plain, rounded up to ff_multiple_of) and the PolyReLU / PolyNorm order
  defaults = dict(activation="swiglu", d_ff=0, ff_multiple_of=32, poly_order=3)

  def flops_per_token(self, seq_len: int) -> float:
    raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")

  @classmethod
  def resolve(cls, m) -> None:
    del m

  @classmethod
  def lr_multipliers(cls, m, steps: int) -> list:
    del m, steps
    return []

  def sparse_parameters(self) -> list[tuple[int, int, int]]:
    return []


CHANNEL_MIXERS = Registry("model.channel.kind", base=ChannelMixer, default="ffn")
ACTIVATIONS = Registry("model.channel.activation")


@ACTIVATIONS.register("swiglu")
@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """SwiGLU(x) = silu(x W_gate) * (x W_up) (Shazeer 2020, eq. 6).

  The backward is written by hand so that sigmoid(gate) is evaluated once per element; autodiff
  of silu keeps and re-derives it through several fusions (exp, divide, their transposes).
  With s = sigmoid(g): d_up = dh * g s,  d_gate = dh * up * s (1 + g (1 - s)).
  """
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(res, dh):
  gate, up = res
  s = jax.nn.sigmoid(gate)
  d_up = dh * gate * s
  d_gate = dh * up * s * (1 + gate * (1 - s))
  return d_gate, d_up


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)



ACTIVATIONS.register("gelu")(lambda x: jax.nn.gelu(x, approximate=True))
ACTIVATIONS.register("relu")(jax.nn.relu)
ACTIVATIONS.register("relu2")(lambda x: jnp.square(jax.nn.relu(x)))


class _PolyCom(nnx.Module):
  """The learnable polynomial of order r = `model.channel.poly_order` shared by PolyReLU and
  PolyNorm: a[0] multiplies the highest power (the official code's order), a_0 is `bias`.
  Initialised as the official code: every a_i = 1/r, bias 0. Computed in fp32."""

  def __init__(self, cfg, *, dtype):
    r = cfg.channel.poly_order
    if r < 1:
      raise ValueError(f"model.channel.poly_order={r} must be >= 1")
    self.order = r
    self.coeffs = nnx.Param(jnp.full((r,), 1.0 / r, jnp.float32), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())
    self.dtype = dtype

  def term(self, x: jax.Array, i: int) -> jax.Array:
    raise NotImplementedError

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    a = self.coeffs[...]
    y = sum(a[self.order - i] * self.term(x, i) for i in range(1, self.order + 1))
    return (y + self.bias[...]).astype(self.dtype)


@ACTIVATIONS.register("polyrelu")
class PolyReLU(_PolyCom):
  """PolyReLU(x) = sum_{i=1..r} a_i relu(x)^i + a_0 (PolyCom Type I with rho = ReLU, eq. 4)."""

  def term(self, x, i):
    return jax.nn.relu(x) ** i


@ACTIVATIONS.register("polynorm")
class PolyNorm(_PolyCom):
  """PolyNorm(x) = sum_{i=1..r} a_i N(x^i) + a_0 (PolyCom Type II with rho = normalization,
  eq. 5). N(z) = z / sqrt(mean(z^2) + 1e-6) per token over the FFN hidden dim, no gain: the
  official code's RMS form of the paper's z / ||z||_2 (they differ by sqrt(d_ff), which the
  a_i absorb). Under tensor sharding of d_ff the mean is over the whole (global) width."""

  def term(self, x, i):
    z = x ** i
    return z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + 1e-6)


# activations that take two projections, (x W_gate, x W_up): their FFN has three matrices
GATED_ACTIVATIONS = frozenset({"swiglu"})


def is_gated(activation: str) -> bool:
  ACTIVATIONS.get(activation)  # an unknown name is a ConfigError naming the registered ones
  return activation in GATED_ACTIVATIONS


@CHANNEL_MIXERS.register("ffn")
class FeedForward(ChannelMixer):

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    c = cfg.channel
    act = ACTIVATIONS.get(c.activation)
    self.gated = is_gated(c.activation)
    self.act = act(cfg, dtype=dtype) if isinstance(act, type) else act
    d, f = cfg.d_model, c.d_ff
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.up = make_linear(cfg, d, f, axes=("embed", "mlp"), role="in", **lin)
    self.gate = (make_linear(cfg, d, f, axes=("embed", "mlp"), role="in", **lin)
                 if self.gated else None)
    self.down = make_linear(cfg, f, d, axes=("mlp", "embed"), role="out", site="fc2", **lin)
    self.d_model, self.d_ff = d, f

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    del ctx
    if self.gated:
      h = self.act(self.gate(x), self.up(x))
    else:
      h = self.act(self.up(x))
    h = constrain(h, ("batch", "seq", "act_mlp"))
    return self.down(h)

  def flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return 2 * self.d_model * self.d_ff * (3 if self.gated else 2)
