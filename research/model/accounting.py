"""What tokens touch: activated parameters and parameter bytes read per token, analytic.

A module whose parameters a token reads only in part describes them with
`sparse_parameters() -> [(items, params_per_item, items_per_token), ...]`: MoE's experts
(E experts, k per token), a memory layer's value rows (N rows of d_value + d_pre_value, H m per
token). Every other parameter is dense: read in full. An untied input embedding is a sparse
table too (vocab rows, one per token); a tied one is read in full by the output head.

  params_activated          params - sum over the modules' tables of
                            (items - items_per_token) * params_per_item
  param_bytes_per_token(B)  bytes of parameters a batch of B tokens reads, divided by B: dense
                            weights once, and of each sparse table the expected number of
                            distinct items B tokens touch under uniform routing,
                            items * (1 - (1 - per_token / items)^B)

B = 1 (decoding one token) gives "dense weights read fully, MoE only the active experts, memory
only the touched slots (and all keys)". Larger B shows what batching does: MoE soon reads
every expert, a memory layer keeps reading few of its rows (UltraMem §4). Counts come from
parameter shapes, so they work on `abstract_model` without memory.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from research.model.ffn import ChannelMixer


def _mixer_tables(model: nnx.Module) -> list[tuple[int, int, int]]:
  return [t for _, node in nnx.iter_graph(model) if isinstance(node, ChannelMixer)
          for t in node.sparse_parameters()]


def sparse_tables(model: nnx.Module) -> list[tuple[int, int, int]]:
  """(items, params_per_item, items_per_token) of every partly read parameter table (a tied
  token table is read whole by the head, so it is not one)."""
  return _mixer_tables(model) + model.embed.lookup_tables(tied=model.cfg.head.tie_embeddings)


def count_params(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def params_activated(model: nnx.Module) -> int:
  """Parameters one token reads (the token table counts in full, as is usual; hashed n-gram
  tables by the rows a token reads)."""
  tables = _mixer_tables(model) + model.embed.lookup_tables(tied=True)  # not the token table
  inactive = sum((items - min(per, items)) * size for items, size, per in tables)
  return count_params(model) - inactive


def param_bytes_per_token(model: nnx.Module, batch: int = 1,
                          bytes_per_param: float | None = None) -> float:
  """Bytes of parameters read per token when `batch` tokens are processed together (see the
  module docstring); `bytes_per_param` defaults to the parameters' dtype (4 for fp32)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  if bytes_per_param is None:
    bytes_per_param = max(jax.numpy.dtype(x.dtype).itemsize for x in leaves)
  tables = sparse_tables(model)
  dense = count_params(model) - sum(items * size for items, size, _ in tables)
  touched = sum(items * (1.0 - (1.0 - min(per, items) / items) ** batch) * size
                for items, size, per in tables)
  return float((dense + touched) * bytes_per_param / batch)
