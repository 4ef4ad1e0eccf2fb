"""Linear-layer family (`model.linear.kind`).

Every projection in the decoder is made by `make_linear`, so an option registered here (SDD,
fake-quantized QAT, ...) reaches every block without touching the other families. Kernels are
stored in the parameter dtype (fp32) and cast to the compute dtype at use.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research import sharding
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


def apply_shared_input(layers: Sequence[nnx.Module], x: jax.Array) -> list[jax.Array]:
  """[layer(x) for layer in layers], as one matmul where that is exact and cheaper.

  Projections that read the same input (q, k, v; an FFN's gate and up) are computed as one dot
  against their concatenated kernels when all are bias-free `plain` layers of one dtype and no
  multi-device mesh is active. One wide dot runs nearer the CPU's matmul peak than three narrow
  ones, and the backward gets one dx dot instead of several dots plus adds; the parameters stay
  separate (their gradients are slices of the concatenated kernel's). On a mesh the layers run
  one by one so each kernel keeps its own sharding.
  """
  mesh = sharding.current_mesh()
  fusable = (len(layers) > 1 and (mesh is None or mesh.size == 1)
             and all(type(l) is PlainLinear and l.bias is None for l in layers)
             and len({l.dtype for l in layers}) == 1)
  if not fusable:
    return [layer(x) for layer in layers]
  dtype = layers[0].dtype
  kernel = jnp.concatenate([l.kernel[...].astype(dtype) for l in layers], axis=1)
  y = jnp.dot(x.astype(dtype), kernel)
  splits = list(itertools.accumulate(l.kernel.shape[1] for l in layers))[:-1]
  return jnp.split(y, splits, axis=-1)


def make_linear(cfg, in_features: int, out_features: int, *, axes: Sequence[str], std: float,
                dtype, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the configured linear layer; `cfg` is `config.model`."""
  cls = LINEARS.get(cfg.linear.kind)
  return cls(in_features, out_features, axes=axes, std=std, use_bias=cfg.linear.use_bias,
             dtype=dtype, rngs=rngs, cfg=cfg)
