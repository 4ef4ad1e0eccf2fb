"""Attention of a prompt's prefill at inference (`model.attention.prefill`): dense or FlexPrefill.

Training always runs dense attention; this applies only to the first forward of a prompt into an
empty KV cache (research/infer). `flexprefill` (Lai et al., ICLR 2025) picks, per prompt and per
query head, the key blocks each query block attends (kernels_pallas/sparse_prefill: §3.1-3.4 of
the digest, the paper's Algorithms 3 and 4) and runs exact softmax attention over those blocks
only (§3.5); the decode steps that follow stay dense over the cache.

Config (`model.attention.flexprefill.*`, budgets in tokens as in the official code): gamma
(attention coverage), tau (threshold on the JS distance for query-aware heads), block_size,
min_budget / max_budget (per vertical and per slash part; max 0 = no cap), mode (flex |
vertical_slash | query_aware | fixed_budget), budget (fixed_budget's tokens), count_rule
(block | token), impl (auto | xla | pallas | pallas_gpu | pallas_tpu).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.model.registry import Switch

PREFILL_KINDS = ("dense", "flexprefill")
FLEXPREFILL_DEFAULTS = dict(
    gamma=0.9, tau=0.1, block_size=128,  # FlexPrefill defaults (the official README/scripts)
    min_budget=1024, max_budget=0,  # tokens, per vertical / slash part; max 0 = no cap
    mode="flex",  # flex | vertical_slash | query_aware | fixed_budget (the ablations)
    budget=0,  # tokens; fixed_budget only
    count_rule="block",  # block | token (see kernels_pallas/sparse_prefill/README.md)
    impl="auto")  # auto (kernel on GPU/TPU, jnp reference on CPU) | xla | pallas
# The switch as the run config sees it: model.attention.prefill selects a kind, and only
# flexprefill reads model.attention.flexprefill.*
SWITCH = Switch("model.attention.prefill", "dense",
                {"dense": {}, "flexprefill": {"flexprefill": FLEXPREFILL_DEFAULTS}})


@dataclasses.dataclass(frozen=True)
class PrefillSettings:
  """The resolved `model.attention.prefill` and `model.attention.flexprefill` (hashable: it is
  static module data)."""
  kind: str = "dense"
  gamma: float = 0.9
  tau: float = 0.1
  block_size: int = 128
  min_budget: int = 1024
  max_budget: int | None = None
  mode: str = "flex"
  budget: int | None = None
  count_rule: str = "block"
  impl: str = "auto"


def prefill_settings(attention_cfg) -> PrefillSettings:
  """Reads and checks the prefill fields of `model.attention`; bad values raise ConfigError.

  A config without these fields (written before they existed, or resolved for a dense-prefill
  run) reads as dense prefill with the defaults.
  """
  kind = attention_cfg.get("prefill", "dense")
  if kind not in PREFILL_KINDS:
    raise ConfigError(f"model.attention.prefill='{kind}' is not one of {', '.join(PREFILL_KINDS)}")
  f = attention_cfg.get("flexprefill", None) or {}  # absent: a dense-prefill run's config
  known = {x.name for x in dataclasses.fields(PrefillSettings)} - {"kind"}
  unknown = sorted(set(f.keys()) - known)
  if unknown:
    raise ConfigError(f"model.attention.flexprefill has unknown keys {', '.join(unknown)} "
                      f"(known: {', '.join(sorted(known))})")
  f = {**FLEXPREFILL_DEFAULTS, **f}
  s = PrefillSettings(
      kind=kind, gamma=float(f["gamma"]), tau=float(f["tau"]), block_size=f["block_size"],
      min_budget=f["min_budget"], max_budget=f["max_budget"] or None, mode=f["mode"],
      budget=f["budget"] or None, count_rule=f["count_rule"], impl=f["impl"])
  # The kernels' own argument checks, reported as config errors naming the key.
  from kernels_pallas import sparse_prefill  # pylint: disable=import-outside-toplevel
  from kernels_pallas.sparse_prefill import reference  # pylint: disable=import-outside-toplevel
  try:
    reference.check_block_size(s.block_size)
    reference.check_selection_args(s.gamma, s.tau, s.min_budget, s.max_budget, s.mode, s.budget,
                                   s.count_rule, None)
  except ValueError as e:
    raise ConfigError(f"model.attention.flexprefill: {e}") from e
  if s.impl not in sparse_prefill.IMPLS:
    raise ConfigError(f"model.attention.flexprefill.impl='{s.impl}' is not one of "
                      f"{', '.join(sparse_prefill.IMPLS)}")
  return s


def selection_stats(sel) -> dict[str, jax.Array]:
  """Per-row statistics of a BlockSelection: `density` [batch], the fraction of the causal
  blocks computed (Σ counts / (Hq nb (nb + 1) / 2), the triangle, not the official code's nb²;
  pitfall 6), and `query_aware` [batch], the fraction of query-aware heads (§3.2)."""
  _, hq, nb = sel.counts.shape
  density = jnp.sum(sel.counts.astype(jnp.float32), axis=(1, 2)) / (hq * nb * (nb + 1) / 2)
  return {"density": density, "query_aware": jnp.mean(sel.pattern.astype(jnp.float32), axis=1)}


def flexprefill(q: jax.Array, k: jax.Array, v: jax.Array, s: PrefillSettings):
  """FlexPrefill causal attention of a prompt over its own keys (positions 0..t-1 in every row).

  q [b, t, heads, d] after RoPE; k, v [b, t, kv_heads, d]. Returns (out [b, t, heads, d],
  selection_stats). Every row's pattern comes from its own last block of queries, so rows
  must be real tokens to the end (no right padding).
  """
  from kernels_pallas import sparse_prefill  # pylint: disable=import-outside-toplevel
  # Alg. 3 / 4 (vertical-slash and query-aware selection, §3.2-3.4), then §3.5's attention
  # over the selected blocks only.
  out, sel = sparse_prefill.flexprefill_attention(
      q, k, v, gamma=s.gamma, tau=s.tau, block_size=s.block_size, min_budget=s.min_budget,
      max_budget=s.max_budget, mode=s.mode, budget=s.budget, count_rule=s.count_rule,
      impl=s.impl, return_selection=True)
  return out.astype(q.dtype), selection_stats(sel)
