"""Linear-layer family (`model.linear.kind`).

Every projection in the decoder is made by `make_linear`, so an option registered here (SDD,
fake-quantized QAT, ...) reaches every block without touching the other families. Kernels are
stored in the parameter dtype (fp32) and cast to the compute dtype at use.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.registry import Registry

LINEARS = Registry("model.linear.kind")


@LINEARS.register("plain")
class PlainLinear(nnx.Module):
  """y = x W (+ b), W: [in, out] with logical axes `axes`."""

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
               use_bias: bool, dtype, rngs: nnx.Rngs, cfg=None):
    del cfg
    init = jax.nn.initializers.normal(std)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32),
                            out_sharding=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), out_sharding=(axes[1],))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def make_linear(cfg, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
                dtype, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the configured linear layer; `cfg` is `config.model`."""
  cls = LINEARS.get(cfg.linear.kind)
  return cls(in_features, out_features, axes=axes, std=std, use_bias=cfg.linear.use_bias,
             dtype=dtype, rngs=rngs, cfg=cfg)
