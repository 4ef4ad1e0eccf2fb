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
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """SwiGLU(x) = silu(x W_gate) * (x W_up) (Shazeer 2020, eq. 6)."""
  return jax.nn.silu(gate) * up


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
    up = self.up(x)
    h = self.act(self.gate(x), up) if self.gated else self.act(up)
    h = constrain(h, ("batch", "seq", "act_mlp"))
    return self.down(h)

  def flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return 2 * self.d_model * self.d_ff * (3 if self.gated else 2)
