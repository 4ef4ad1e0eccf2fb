"""Channel-mixer family (`model.channel.kind`) and FFN activations.

`ffn` is the position-wise feed-forward block; its activation (`model.channel.activation`) is
a registry of its own: gated ones (SwiGLU) use two input projections, plain ones one. MoE,
UltraMem and other channel mixers register beside it.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from research.model.linear import make_linear
from research.model.registry import Registry
from research.sharding import constrain

CHANNEL_MIXERS = Registry("model.channel.kind")
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


swiglu.gated = True


@CHANNEL_MIXERS.register("ffn")
class FeedForward(nnx.Module):

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    del layer
    c = cfg.channel
    self.act = ACTIVATIONS.get(c.activation)
    self.gated = getattr(self.act, "gated", False)
    d, f = cfg.d_model, c.d_ff
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.up = make_linear(cfg, d, f, axes=("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
    self.gate = (make_linear(cfg, d, f, axes=("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
                 if self.gated else None)
    self.down = make_linear(cfg, f, d, axes=("mlp", "embed"), std=out_std, dtype=dtype, rngs=rngs)
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
