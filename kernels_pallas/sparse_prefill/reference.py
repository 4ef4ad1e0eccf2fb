"""FlexPrefill in plain jnp: block selection, block-sparse attention and dense causal attention.

This file is the definition and the test oracle (no Pallas). Section numbers refer to the
FlexPrefill digest (Lai et al., ICLR 2025; the algorithm as implemented in the official code):

  §3.1  A_hat = softmax(Q_hat K^T / sqrt(d) + causal), Q_hat = the last `block_size` queries.
  §3.2  D = sqrt(JSD(a_bar || a_hat)); D < tau -> query-aware head, else vertical-slash.
  §3.3  vertical / slash scores, cumulative-attention budget gamma, top blocks, block grid.
  §3.4  query-aware: pooled Q_bar K_bar^T, block-causal softmax, global gamma * nb coverage.
  §3.5  O_i = softmax(Q_i K_J(i)^T / sqrt(d) + causal) V_J(i) over the selected key blocks only.

Layout: q [B, T, Hq, d]; k, v [B, T, Hk, d]; Hq = Hk * G and query head h reads KV head h // G.
Our choices where the official code has pitfalls are listed in README.md ("Pitfalls").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("flex", "vertical_slash", "query_aware", "fixed_budget")
COUNT_RULES = ("block", "token")


class BlockSelection(NamedTuple):
  """The key blocks each query block attends, per (batch, query head).

  indices: [B, Hq, nQB, max_blocks] int32; the row's diagonal block first, then the other
    selected key blocks in ascending order; entries past `counts` repeat the last valid one.
  counts: [B, Hq, nQB] int32, number of valid entries (>= 1: the diagonal is always kept).
  pattern: [B, Hq] int32, 0 = vertical-slash head, 1 = query-aware head (§3.2).
  js_distance: [B, Hq] float32, D = sqrt(JSD) of the pooled estimate vs the true block mass.
  n_vertical, n_slash: [B, Hq] int32, the vertical-column and slash-diagonal block budgets.
  """
  indices: jax.Array
  counts: jax.Array
  pattern: jax.Array
  js_distance: jax.Array
  n_vertical: jax.Array
  n_slash: jax.Array

  @property
  def num_blocks(self) -> int:
    return self.counts.shape[-1]

  def density(self) -> jax.Array:
    """Fraction of the causal blocks computed: sum(counts) / (B * Hq * nb (nb + 1) / 2).

    Relative to the causal triangle, not the full nb^2 square the official code reports
    (pitfall 6)."""
    return self.density_of(self.counts)

  @staticmethod
  def density_of(counts: jax.Array) -> jax.Array:
    """density() of a selection's counts [B, H, nb] alone."""
    b, h, nb = counts.shape
    causal = b * h * nb * (nb + 1) / 2
    return jnp.sum(counts.astype(jnp.float32)) / causal


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the public functions and the kernels).


def check_qkv(q, k, v=None) -> None:
  """Raises ValueError naming the problem when q, k (, v) do not follow the layout."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q and k must be [B, T, H, d]; got q{q.shape}, k{k.shape}")
  if v is not None and v.shape != k.shape:
    raise ValueError(f"v must have the shape of k; got v{v.shape}, k{k.shape}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or k.shape[1] != t:
    raise ValueError(f"q and k must share batch and length (prefill, q_len == k_len); "
                     f"got q{q.shape}, k{k.shape}")
  if k.shape[3] != d:
    raise ValueError(f"q and k head_dim differ: {d} vs {k.shape[3]}")
  if k.shape[2] == 0 or hq % k.shape[2]:
    raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[2]})")
  if t == 0:
    raise ValueError("sequence length must be positive")


def check_block_size(block_size) -> None:
  if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
    raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def check_selection_args(gamma, tau, min_budget, max_budget, mode, budget, count_rule,
                         max_blocks) -> None:
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"gamma must be in (0, 1], got {gamma}")
  if tau < 0.0:
    raise ValueError(f"tau must be >= 0, got {tau}")
  if not isinstance(min_budget, int) or min_budget < 0:
    raise ValueError(f"min_budget (tokens) must be an int >= 0, got {min_budget!r}")
  if max_budget is not None and (not isinstance(max_budget, int) or max_budget < max(min_budget, 1)):
    raise ValueError(f"max_budget (tokens) must be None or an int >= max(min_budget, 1), "
                     f"got {max_budget!r}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
  if mode == "fixed_budget" and (not isinstance(budget, int) or budget < 1):
    raise ValueError(f"mode='fixed_budget' needs budget= a positive int (tokens), got {budget!r}")
  if mode != "fixed_budget" and budget is not None:
    raise ValueError(f"budget= is only used with mode='fixed_budget' (mode={mode!r})")
  if count_rule not in COUNT_RULES:
    raise ValueError(f"count_rule must be one of {', '.join(COUNT_RULES)}; got {count_rule!r}")
  if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 1):
    raise ValueError(f"max_blocks must be None or a positive int, got {max_blocks!r}")


def check_indices(q, indices, counts, block_size) -> None:
  b, t, hq, _ = q.shape
  nb = -(-t // block_size)
  if indices.ndim != 4 or indices.shape[:3] != (b, hq, nb):
    raise ValueError(f"indices must be [B, Hq, nQB, max_blocks] = [{b}, {hq}, {nb}, m]; "
                     f"got {indices.shape}")
  if counts.shape != (b, hq, nb):
    raise ValueError(f"counts must be [B, Hq, nQB] = [{b}, {hq}, {nb}]; got {counts.shape}")
  if not jnp.issubdtype(indices.dtype, jnp.integer) or not jnp.issubdtype(counts.dtype,
                                                                         jnp.integer):
    raise ValueError(f"indices and counts must be integers; got {indices.dtype}, {counts.dtype}")


# ---------------------------------------------------------------------------------------------
# Small helpers.


class BlockLayout(NamedTuple):
  """A kernel call's shape with T padded to whole blocks (shared by gpu.py and tpu.py)."""
  b: int
  t: int
  hq: int
  hk: int
  g: int
  d: int
  num_blocks: int
  padded: int

  def pad(self, x):
    """[B, T, H, d] -> [B, padded, H, d] with zeros after the last token."""
    return jnp.pad(x, ((0, 0), (0, self.padded - self.t), (0, 0), (0, 0)))


def block_layout(q, k, block_size: int) -> BlockLayout:
  b, t, hq, d = q.shape
  hk = k.shape[2]
  nb = -(-t // block_size)
  return BlockLayout(b=b, t=t, hq=hq, hk=hk, g=hq // hk, d=d, num_blocks=nb,
                     padded=nb * block_size)


def _scale(d: int, sm_scale) -> float:
  return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)


def _pad_time(x: jax.Array, tp: int) -> jax.Array:
  """Zero-pads axis 1 (time) of x [B, T, ...] to length tp."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, tp - x.shape[1])
  return jnp.pad(x, pad)


def block_mean(x: jax.Array, block_size: int) -> jax.Array:
  """Mean of each time block of x [B, T, H, d] -> [B, nb, H, d]; the last partial block is
  averaged over its real length (§3.2 avgpool(K), §3.4 Q_bar)."""
  b, t, h, d = x.shape
  nb = -(-t // block_size)
  sums = _pad_time(x.astype(jnp.float32), nb * block_size).reshape(b, nb, block_size, h, d)
  lens = jnp.minimum(block_size, t - jnp.arange(nb) * block_size).astype(jnp.float32)  # [nb]
  return sums.sum(axis=2) / lens[None, :, None, None]


def _xlogy_safe(x):
  """x * log(x) with 0 log 0 = 0 (pitfall 4: the official JS has no epsilon)."""
  return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)


def js_distance(p: jax.Array, q: jax.Array) -> jax.Array:
  """sqrt(JSD(p || q)) over the last axis, natural log (§3.2); in [0, sqrt(ln 2)]."""
  m = 0.5 * (p + q)
  kl_pm = jnp.sum(_xlogy_safe(p) - p * jnp.log(jnp.where(m > 0, m, 1.0)), axis=-1)
  kl_qm = jnp.sum(_xlogy_safe(q) - q * jnp.log(jnp.where(m > 0, m, 1.0)), axis=-1)
  return jnp.sqrt(jnp.maximum(0.5 * kl_pm + 0.5 * kl_qm, 0.0))


def cover_count(mass: jax.Array, priority: jax.Array, gamma: float):
  """Smallest n such that the n entries of highest priority hold >= gamma of the total mass.

  mass, priority: [..., n]. Returns (count [...] int32, rank [..., n] int32), rank being each
  entry's position in the priority order. One "reach gamma" rule for vertical, slash and
  query-aware selection (pitfall 2: the official code is off by one between them).
  """
  order = jnp.argsort(-priority, axis=-1)
  cum = jnp.cumsum(jnp.take_along_axis(mass, order, axis=-1), axis=-1)
  total = cum[..., -1:]
  count = jnp.sum(cum < gamma * total, axis=-1) + 1
  count = jnp.minimum(count, mass.shape[-1]).astype(jnp.int32)
  rank = jnp.argsort(order, axis=-1).astype(jnp.int32)
  return count, rank


# ---------------------------------------------------------------------------------------------
# Estimate (§3.1-3.2): the exact attention of the representative queries, pooled to blocks.


class Estimate(NamedTuple):
  """Pooled scores from the last `block_size` queries (per batch and query head).

  vertical: [B, Hq, nb] key-block mass of the representative rows (sums to 1).
  slash: [B, Hq, nb] mass of the token diagonals falling on block diagonal s (sums to <= 1).
  vertical_tokens, slash_tokens: [B, Hq, T] token-level scores (for count_rule="token"), or
    None when the estimate was pooled inside a kernel.
  """
  vertical: jax.Array
  slash: jax.Array
  vertical_tokens: jax.Array | None
  slash_tokens: jax.Array | None


def representative_attention(q, k, *, block_size: int, sm_scale=None) -> jax.Array:
  """A_hat [B, Hq, r, T] fp32 for the last r = min(block_size, T) queries (§3.1)."""
  b, t, hq, d = q.shape
  hk = k.shape[2]
  r = min(block_size, t)
  qh = q[:, t - r:].astype(jnp.float32).reshape(b, r, hk, hq // hk, d)
  logits = jnp.einsum("brkgd,bnkd->bkgrn", qh, k.astype(jnp.float32), precision=HIGHEST)
  logits = logits.reshape(b, hq, r, t) * _scale(d, sm_scale)
  pos = jnp.arange(t - r, t)
  causal = jnp.arange(t)[None, :] <= pos[:, None]  # [r, T]
  return jax.nn.softmax(jnp.where(causal[None, None], logits, -jnp.inf), axis=-1)


def pool_slash(slash_tokens: jax.Array, block_size: int, nb: int) -> jax.Array:
  """Token-offset slash scores [..., T] -> block-diagonal scores [..., nb] (pitfall 3).

  A token diagonal at offset o = c * bs + r (0 <= r < bs) lies on block diagonal c for the
  query rows u >= r of a block and on c + 1 for the rows u < r, i.e. fractions (bs - r) / bs
  and r / bs. The score of block diagonal s is the mass of the token diagonals falling on it.
  """
  t = slash_tokens.shape[-1]
  o = jnp.arange(t)
  rem = (o % block_size).astype(jnp.float32)
  w_same = ((block_size - rem) / block_size).reshape((1,) * (slash_tokens.ndim - 1) + (t,))
  pad = [(0, 0)] * (slash_tokens.ndim - 1) + [(0, nb * block_size - t)]
  lead = slash_tokens.shape[:-1]
  same = jnp.pad(slash_tokens * w_same, pad).reshape(lead + (nb, block_size)).sum(-1)
  nxt = jnp.pad(slash_tokens * (1.0 - w_same), pad).reshape(lead + (nb, block_size)).sum(-1)
  shifted = jnp.concatenate([jnp.zeros(lead + (1,), nxt.dtype), nxt[..., :-1]], axis=-1)
  return same + shifted


def estimate_scores(q, k, *, block_size: int, sm_scale=None) -> Estimate:
  """Vertical and slash scores of §3.3 steps 1, 2 and 4, in fused XLA."""
  b, t, hq, _ = q.shape
  nb = -(-t // block_size)
  attn = representative_attention(q, k, block_size=block_size, sm_scale=sm_scale)
  r = attn.shape[2]
  vertical_tokens = attn.mean(axis=2)  # [B, Hq, T]; a_v
  # a_s[o] = mean_r A_hat[r, pos_r - o]: the diagonal at offset o (query minus key position).
  key = jnp.arange(t - r, t)[:, None] - jnp.arange(t)[None, :]  # [r, T]
  diag = jnp.take_along_axis(attn, jnp.maximum(key, 0)[None, None], axis=-1)
  slash_tokens = jnp.where((key >= 0)[None, None], diag, 0.0).mean(axis=2)  # [B, Hq, T]
  vertical = jnp.pad(vertical_tokens, ((0, 0), (0, 0), (0, nb * block_size - t)))
  vertical = vertical.reshape(b, hq, nb, block_size).sum(-1)
  slash = pool_slash(slash_tokens, block_size, nb)
  return Estimate(vertical, slash, vertical_tokens, slash_tokens)


# ---------------------------------------------------------------------------------------------
# Selection (§3.2-3.4).


def pattern_distance(q, k, vertical, *, block_size: int, sm_scale=None) -> jax.Array:
  """D [B, Hq] between a_bar = softmax(mean(Q_hat) K_bar^T / sqrt(d)) and a_hat = vertical."""
  b, t, hq, d = q.shape
  hk = k.shape[2]
  r = min(block_size, t)
  q_mean = q[:, t - r:].astype(jnp.float32).mean(axis=1).reshape(b, hk, hq // hk, d)
  k_bar = block_mean(k, block_size)  # [B, nb, Hk, d]
  logits = jnp.einsum("bkgd,bnkd->bkgn", q_mean, k_bar, precision=HIGHEST)
  est = jax.nn.softmax(logits.reshape(b, hq, -1) * _scale(d, sm_scale), axis=-1)
  return js_distance(est, vertical)


def query_aware_mask(q, k, gamma: float, *, block_size: int, sm_scale=None) -> jax.Array:
  """Global gamma-coverage of the block-causal pooled map (§3.4) -> [B, Hq, nb, nb] bool."""
  b, t, hq, d = q.shape
  hk = k.shape[2]
  q_bar = block_mean(q, block_size)  # [B, nb, Hq, d]
  k_bar = block_mean(k, block_size)  # [B, nb, Hk, d]
  nb = q_bar.shape[1]
  q_bar = q_bar.reshape(b, nb, hk, hq // hk, d)
  logits = jnp.einsum("bikgd,bjkd->bkgij", q_bar, k_bar, precision=HIGHEST)
  logits = logits.reshape(b, hq, nb, nb) * _scale(d, sm_scale)
  causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
  probs = jax.nn.softmax(jnp.where(causal[None, None], logits, -jnp.inf), axis=-1)
  flat = probs.reshape(b, hq, nb * nb)  # total mass nb: the global rule keeps gamma * nb
  count, rank = cover_count(flat, flat, gamma)
  return (rank < count[..., None]).reshape(b, hq, nb, nb) & causal[None, None]


def _forced_first(scores: jax.Array, forced: int) -> jax.Array:
  """Priority vector: scores with entry `forced` moved to the front (§3.3 step 4)."""
  return scores.at[..., forced].set(jnp.inf)


def select_blocks(q, k, *, gamma: float = 0.9, tau: float = 0.1, block_size: int = 64,
                  min_budget: int = 1024, max_budget: int | None = None, mode: str = "flex",
                  budget: int | None = None, count_rule: str = "block",
                  max_blocks: int | None = None, sm_scale=None,
                  estimate: Estimate | None = None) -> BlockSelection:
  """FlexPrefill's per-head pattern decision and block selection (§3.1-3.4).

  gamma: attention coverage in (0, 1]. tau: threshold on D = sqrt(JSD) (0: every head
  vertical-slash; > sqrt(ln 2) ~ 0.833: every head query-aware). Budgets are in tokens and
  become ceil(budget / block_size) blocks; min_budget and max_budget bound the vertical and
  the slash counts separately (pitfall 5). mode: "flex" (the paper), "vertical_slash" (tau
  ignored, no query-aware heads), "query_aware" (every head query-aware), "fixed_budget"
  (vertical-slash with ceil(budget / block_size) columns and diagonals, no gamma).
  count_rule: "block" (default) counts the gamma cover on block-pooled scores, which
  guarantees the coverage; "token" is the official rule c // block_size + 1 on token scores
  (with block_size, not the official literal 128; pitfall 1). max_blocks caps the padded list
  width (rows over the cap keep the diagonal, then the lowest key blocks; counts shrink).
  estimate: precomputed vertical/slash scores (e.g. from the Pallas estimate kernel).
  """
  check_qkv(q, k)
  check_block_size(block_size)
  check_selection_args(gamma, tau, min_budget, max_budget, mode, budget, count_rule, max_blocks)
  return select_blocks_traced(
      q, k, gamma, tau, block_size=block_size, min_budget=min_budget, max_budget=max_budget,
      mode=mode, budget=budget, count_rule=count_rule, max_blocks=max_blocks, sm_scale=sm_scale,
      with_query_aware=mode == "query_aware" or (mode == "flex" and tau > 0.0),
      estimate=estimate)


def select_blocks_traced(q, k, gamma, tau, *, block_size: int, min_budget: int,
                         max_budget: int | None, mode: str, budget: int | None, count_rule: str,
                         max_blocks: int | None, sm_scale, with_query_aware: bool,
                         estimate: Estimate | None = None) -> BlockSelection:
  """select_blocks with gamma and tau as (possibly traced) values; arguments already checked.
  with_query_aware=False skips the pooled map of §3.4 (no head can be query-aware)."""
  if estimate is None:
    estimate = estimate_scores(q, k, block_size=block_size, sm_scale=sm_scale)
  elif count_rule == "token" and estimate.vertical_tokens is None:
    raise ValueError("count_rule='token' needs token-level scores; use the XLA estimate")
  b, t, hq, _ = q.shape
  nb = -(-t // block_size)
  m_min = max(1, -(-min_budget // block_size))
  m_max = nb if max_budget is None else -(-max_budget // block_size)
  lo, hi = min(m_min, nb), min(max(m_max, 1), nb)

  vertical, slash = estimate.vertical, estimate.slash
  vert_prio = _forced_first(vertical, 0)  # key block 0: the attention sink
  slash_prio = _forced_first(slash, 0)  # block diagonal 0: the local window
  n_v, rank_v = cover_count(vertical, vert_prio, gamma)
  n_s, rank_s = cover_count(slash, slash_prio, gamma)
  if count_rule == "token":
    n_v = cover_count(estimate.vertical_tokens, estimate.vertical_tokens, gamma)[0]
    n_s = cover_count(estimate.slash_tokens, estimate.slash_tokens, gamma)[0]
    n_v, n_s = n_v // block_size + 1, n_s // block_size + 1
  if mode == "fixed_budget":
    n_fixed = -(-budget // block_size)
    n_v = n_s = jnp.full((b, hq), n_fixed, jnp.int32)

  dist = pattern_distance(q, k, vertical, block_size=block_size, sm_scale=sm_scale)
  if mode == "flex":
    qa = dist < tau
  else:
    qa = jnp.full((b, hq), mode == "query_aware")
  # Query-aware heads keep only the minimum vertical and slash budgets (§3.4).
  n_v = jnp.where(qa, lo, n_v)
  n_s = jnp.where(qa, lo, n_s)
  n_v = jnp.clip(n_v, lo, hi).astype(jnp.int32)
  n_s = jnp.clip(n_s, lo, hi).astype(jnp.int32)

  # §3.3 step 6: expand the columns and diagonals to the block grid.
  ii = jnp.arange(nb)[:, None]
  jj = jnp.arange(nb)[None, :]
  causal = jj <= ii  # [nb, nb]
  cols = rank_v < n_v[..., None]  # [B, Hq, nb] selected key-block columns
  diags = rank_s < n_s[..., None]  # [B, Hq, nb] selected block diagonals s = i - j
  mask = cols[:, :, None, :] | jnp.take(diags, jnp.clip(ii - jj, 0, nb - 1), axis=-1)
  mask = (mask | (jj == ii)[None, None]) & causal[None, None]
  if with_query_aware:
    qa_mask = query_aware_mask(q, k, gamma, block_size=block_size, sm_scale=sm_scale)
    mask = mask | (qa_mask & qa[:, :, None, None])
  indices, counts = mask_to_indices(mask, max_blocks)
  return BlockSelection(indices, counts, qa.astype(jnp.int32), dist, n_v, n_s)


def mask_to_indices(mask: jax.Array, max_blocks: int | None = None):
  """Block mask [..., nb, nb] -> (indices [..., nb, m], counts [..., nb]) with m = max_blocks
  or nb. Each row lists its diagonal first, then the other selected blocks ascending; padding
  repeats the diagonal. The diagonal must be selected."""
  nb = mask.shape[-1]
  m = nb if max_blocks is None else min(max_blocks, nb)
  ii = jnp.arange(nb)[:, None]
  jj = jnp.broadcast_to(jnp.arange(nb)[None, :], (nb, nb))
  key = jnp.where(jj == ii, -1, jj)  # the diagonal sorts first
  key = jnp.where(mask, key, 2 * nb)
  key = jnp.sort(key, axis=-1)[..., :m]
  indices = jnp.where(key == -1, ii, key)
  indices = jnp.where(indices >= nb, ii, indices).astype(jnp.int32)
  counts = jnp.minimum(jnp.sum(mask, axis=-1), m).astype(jnp.int32)
  return indices, counts


def indices_to_mask(indices: jax.Array, counts: jax.Array, num_blocks: int) -> jax.Array:
  """(indices [..., nQB, m], counts [..., nQB]) -> block mask [..., nQB, num_blocks] bool."""
  m = indices.shape[-1]
  valid = jnp.arange(m)[None, :] < counts.reshape(-1, 1)  # [rows, m]
  rows = indices.reshape(-1, m)

  def one(idx, ok):
    return jnp.zeros((num_blocks,), jnp.bool_).at[idx].max(ok, mode="drop")

  out = jax.vmap(one)(rows, valid)
  return out.reshape(counts.shape + (num_blocks,))


def full_causal_selection(batch: int, heads: int, seq_len: int, block_size: int):
  """(indices, counts) listing every causal key block for every query block (dense)."""
  nb = -(-seq_len // block_size)
  causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
  indices, counts = mask_to_indices(causal)
  shape = (batch, heads) + indices.shape
  return jnp.broadcast_to(indices, shape), jnp.broadcast_to(counts, shape[:-1])


# ---------------------------------------------------------------------------------------------
# Attention (§3.5) and the dense reference.


def masked_attention(q, k, v, mask, *, sm_scale=None) -> jax.Array:
  """softmax(q k^T * scale + mask) v with mask [B, Hq, T, T] bool; fp32 softmax. Rows with no
  allowed key give 0. Output in q's dtype."""
  b, t, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  qg = q.astype(jnp.float32).reshape(b, t, hk, g, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=HIGHEST)
  s = s.reshape(b, hq, t, t) * _scale(d, sm_scale)
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = (p / jnp.where(l > 0, l, 1.0)).reshape(b, hk, g, t, t)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=HIGHEST)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def dense_causal_attention(q, k, v, *, sm_scale=None) -> jax.Array:
  """Dense causal softmax attention (the comparison baseline), fp32 softmax."""
  check_qkv(q, k, v)
  t = q.shape[1]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  return masked_attention(q, k, v, causal[None, None], sm_scale=sm_scale)


def block_sparse_attention(q, k, v, indices, counts, *, block_size: int,
                           sm_scale=None) -> jax.Array:
  """Causal attention of each query block over its listed key blocks only (§3.5)."""
  check_qkv(q, k, v)
  check_block_size(block_size)
  check_indices(q, indices, counts, block_size)
  t = q.shape[1]
  nb = -(-t // block_size)
  blocks = indices_to_mask(indices, counts, nb)  # [B, Hq, nb, nb]
  tb = jnp.arange(t) // block_size
  mask = jnp.take(jnp.take(blocks, tb, axis=2), tb, axis=3)  # [B, Hq, T, T]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  return masked_attention(q, k, v, mask & causal[None, None], sm_scale=sm_scale)
