"""FlexPrefill sparse prefill: selection rules, block-sparse kernels (GPU and TPU style, in
interpret mode) against the jnp reference, and argument checks.

Tolerances (max abs error vs the fp32 reference on the same inputs), the same on every backend
because fp32 dots, the kernels' included, run at full precision in these tests (conftest.py):
fp32 2e-5; bf16 inputs 2e-2 (bf16 output rounding plus bf16 probabilities in P V).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from kernels_pallas import sparse_prefill as sp
from kernels_pallas.sparse_prefill import bench, gpu, reference
from backends import tolerance

# (backend, dtype) -> max abs error; "any": every backend
ATOL = {("any", jnp.float32): 2e-5, ("any", jnp.bfloat16): 2e-2}
_indices_to_mask = jax.jit(reference.indices_to_mask, static_argnums=2)
_estimate_xla = jax.jit(reference.estimate_scores, static_argnames="block_size")


def _qkv(seed, b, t, hq, hk, d, dtype=jnp.float32, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = scale * jax.random.normal(ks[0], (b, t, hq, d))
  k = scale * jax.random.normal(ks[1], (b, t, hk, d))
  v = jax.random.normal(ks[2], (b, t, hk, d))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _close(out, want, dtype):
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=tolerance(ATOL, dtype), rtol=0)


# ---------------------------------------------------------------------------------------------
# Kernels vs reference.


@pytest.mark.parametrize("impl,dtype,t,hq,hk", [  # ragged T; G in {1, 2}
    ("pallas_gpu", jnp.float32, 61, 2, 1), ("pallas_gpu", jnp.bfloat16, 80, 2, 2),
    ("pallas_tpu", jnp.float32, 80, 2, 2), ("pallas_tpu", jnp.bfloat16, 61, 2, 1)])
def test_all_blocks_equals_dense(impl, dtype, t, hq, hk):
  q, k, v = _qkv(0, 1, t, hq, hk, 32, dtype)
  idx, cnt = sp.full_causal_selection(1, hq, t, 16)
  out = sp.block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl=impl)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  _close(out, sp.dense_causal_attention(*f32, impl="xla"), dtype)


def _random_lists(seed, b, hq, nb, drop_diagonal=False):
  """Random block masks (causal and some non-causal blocks), as padded lists."""
  rng = np.random.default_rng(seed)
  mask = rng.random((b, hq, nb, nb)) < 0.4
  mask |= np.eye(nb, dtype=bool)[None, None]
  if drop_diagonal:
    mask[:, :, 1, 1] = False
  m = nb + 1
  idx = np.full((b, hq, nb, m), nb - 1, np.int32)  # padding entries point at a real block
  cnt = mask.sum(-1).astype(np.int32)
  for pos in np.ndindex(b, hq, nb):
    listed = rng.permutation(np.flatnonzero(mask[pos]))  # order must not matter
    idx[pos][:len(listed)] = listed
  return jnp.asarray(idx), jnp.asarray(cnt)


@pytest.mark.parametrize("impl,hk", [("pallas_gpu", 1), ("pallas_tpu", 2)])
def test_random_lists_match_reference(impl, hk):
  """Random (unordered, some non-causal) lists: the kernel equals the reference, which equals
  dense attention with -inf on the unlisted blocks. Block row 1 drops its diagonal, so some of
  its rows see no key and give 0."""
  t, hq, bs, nb = 70, 2, 16, 5
  q, k, v = _qkv(1, 2, t, hq, hk, 16)
  idx, cnt = _random_lists(2, 2, hq, nb, drop_diagonal=True)
  out = sp.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, impl=impl)
  want = sp.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, impl="xla")
  _close(out, want, jnp.float32)
  blocks = np.asarray(_indices_to_mask(idx, cnt, nb))
  tok = np.arange(t) // bs
  mask = blocks[:, :, tok][:, :, :, tok] & (np.arange(t)[None, :] <= np.arange(t)[:, None])
  explicit = jax.jit(reference.masked_attention)(q, k, v, jnp.asarray(mask))
  np.testing.assert_allclose(want, explicit, atol=1e-6)
  empty = ~mask.any(-1)  # [B, H, T]
  assert empty.any() and np.all(np.asarray(want).transpose(0, 2, 1, 3)[empty] == 0)


# ---------------------------------------------------------------------------------------------
# Selection.


@pytest.fixture(scope="module")
def structured():
  make = jax.jit(bench.structured_qkv, static_argnums=(1, 2, 3, 4, 5, 6))
  q, k, v = make(jax.random.PRNGKey(0), 1, 300, 4, 2, 32, jnp.float32)
  return q, k, v


@pytest.mark.parametrize("gamma", [0.5, 0.8, 0.95])
def test_coverage_and_min_budget(structured, gamma):
  """The selected blocks hold >= gamma of the representative rows' attention (block count
  rule), and the vertical and slash budgets are at least ceil(min_budget / bs)."""
  q, k, _ = structured
  bs, min_budget = 16, 40
  sel = sp.select_blocks(q, k, gamma=gamma, tau=0.1, block_size=bs, min_budget=min_budget)
  t = q.shape[1]
  nb = -(-t // bs)
  blocks = np.asarray(_indices_to_mask(sel.indices, sel.counts, nb))
  attn = np.asarray(jax.jit(reference.representative_attention, static_argnames="block_size")(
      q, k, block_size=bs))  # [B, H, r, T]
  rows = np.arange(t - bs, t) // bs
  keyb = np.arange(t) // bs
  sel_tok = blocks[:, :, rows][:, :, :, keyb]  # [B, H, r, T]
  mass = (attn * sel_tok).sum(-1).mean(-1)  # mean over representative rows
  assert np.all(mass >= gamma - 1e-5), mass
  m_min = math.ceil(min_budget / bs)
  assert np.all(np.asarray(sel.n_vertical) >= m_min) and np.all(np.asarray(sel.n_slash) >= m_min)
  assert np.all(np.asarray(sel.counts)[:, :, -1] >= m_min)  # the last row sees every column
  assert np.all(blocks[:, :, :, 0]) and np.all(blocks[:, :, np.arange(nb), np.arange(nb)])
  assert 0.0 < float(sel.density()) < 1.0  # structured inputs are sparse


def test_gamma_one_is_dense():
  q, k, _ = _qkv(5, 1, 100, 2, 1, 16)
  sel = sp.select_blocks(q, k, gamma=1.0, tau=0.0, block_size=16, min_budget=0)
  assert float(sel.density()) == 1.0


def test_token_count_rule_uses_block_size():
  """count_rule='token' is the official c // bs + 1 (pitfall 1: bs, not the literal 128)."""
  q, k, _ = _qkv(6, 1, 200, 2, 1, 16, scale=2.0)
  est = _estimate_xla(q, k, block_size=16)
  sel = sp.select_blocks(q, k, gamma=0.9, tau=0.0, block_size=16, min_budget=0,
                         count_rule="token")
  c = reference.cover_count(est.vertical_tokens, est.vertical_tokens, 0.9)[0]
  np.testing.assert_array_equal(sel.n_vertical, np.minimum(np.asarray(c) // 16 + 1, 13))


def test_pattern_decision_by_js_threshold():
  """Head 0: zero queries -> uniform attention, pooled estimate exact (D ~ 0, query-aware at
  tau = 0.1). Head 1: a +u / -u key pair inside one block: the true attention has a spike but
  the block mean cancels it, so the estimate misses it (D > 2 tau, vertical-slash). tau = 0: every
  head vertical-slash; tau = 1 > sqrt(ln 2): every head query-aware."""
  t, d, bs = 128, 16, 16
  k = 0.1 * jax.random.normal(jax.random.PRNGKey(7), (1, t, 2, d))
  u = jnp.zeros((d,)).at[0].set(4.0)
  k = k.at[0, 40, 1].set(u).at[0, 41, 1].set(-u)
  q = jnp.zeros((1, t, 2, d)).at[:, :, 1, 0].set(4.0)
  sel = sp.select_blocks(q, k, gamma=0.9, tau=0.1, block_size=bs, min_budget=0)
  assert sel.pattern.tolist() == [[1, 0]]
  dist = np.asarray(sel.js_distance)
  # Head 0 is not exactly 0: the causal triangle of the last block thins its true mass.
  assert dist[0, 0] < 0.08 and dist[0, 1] > 0.2
  # The JS distance matches scipy's (natural log, square root of the divergence).
  est = _estimate_xla(q, k, block_size=bs)
  k_bar = reference.block_mean(k, bs)
  logits = jnp.einsum("bhd,bnhd->bhn", q[:, -bs:].mean(1), k_bar) / math.sqrt(d)
  a_bar = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  want = [jensenshannon(a_bar[0, h], np.asarray(est.vertical[0, h], np.float64)) for h in (0, 1)]
  np.testing.assert_allclose(dist[0], want, atol=1e-5)
  for tau, expect in ((0.0, 0), (1.0, 1)):
    sel = sp.select_blocks(q, k, gamma=0.9, tau=tau, block_size=bs, min_budget=0)
    assert np.all(np.asarray(sel.pattern) == expect)


def test_modes(structured):
  q, k, _ = structured
  kw = dict(gamma=0.9, tau=0.1, block_size=16, min_budget=0)
  vs = sp.select_blocks(q, k, mode="vertical_slash", **kw)
  qa = sp.select_blocks(q, k, mode="query_aware", **kw)
  fixed = sp.select_blocks(q, k, mode="fixed_budget", budget=40, **kw)
  assert np.all(np.asarray(vs.pattern) == 0) and np.all(np.asarray(qa.pattern) == 1)
  assert np.all(np.asarray(fixed.n_vertical) == 3) and np.all(np.asarray(fixed.n_slash) == 3)
  assert np.all(np.asarray(qa.n_vertical) == 1)  # query-aware heads keep the minimum budget


def test_slash_offset_mapping():
  """Offset o = c * bs + r puts (bs - r) / bs of its mass on block diagonal c, r / bs on c + 1."""
  bs, t = 16, 64
  tokens = jnp.zeros((t,)).at[0].set(1.0).at[16 + 3].set(2.0)
  pooled = np.asarray(reference.pool_slash(tokens, bs, 4))
  np.testing.assert_allclose(pooled, [1.0, 2.0 * 13 / 16, 2.0 * 3 / 16, 0.0], atol=1e-7)


def test_max_blocks_keeps_diagonal(structured):
  q, k, _ = structured
  sel = sp.select_blocks(q, k, gamma=0.99, tau=0.0, block_size=16, min_budget=0, max_blocks=2)
  assert sel.indices.shape[-1] == 2 and int(sel.counts.max()) <= 2
  np.testing.assert_array_equal(sel.indices[..., 0], np.broadcast_to(np.arange(19), (1, 4, 19)))


def test_estimate_kernel_matches_xla():
  q, k, _ = _qkv(8, 1, 77, 4, 2, 16, scale=2.0)
  want = _estimate_xla(q, k, block_size=16)
  got = gpu.estimate_scores(q, k, block_size=16, sm_scale=0.25, interpret=True)
  np.testing.assert_allclose(got.vertical, want.vertical, atol=1e-6)
  np.testing.assert_allclose(got.slash, want.slash, atol=1e-6)


def test_flexprefill_end_to_end(structured):
  q, k, v = structured
  kw = dict(gamma=0.9, tau=0.1, block_size=32, min_budget=32, return_selection=True)
  out, sel = sp.flexprefill_attention(q, k, v, impl="pallas", **kw)
  want, sel_x = sp.flexprefill_attention(q, k, v, impl="xla", **kw)
  np.testing.assert_array_equal(sel.counts, sel_x.counts)
  _close(out, want, jnp.float32)
  dense = sp.dense_causal_attention(q, k, v, impl="xla")
  err = float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))
  assert err < 0.2, err  # sparse, yet close to dense on structured inputs


def test_bench_rows_that_cannot_run_say_why():
  """The bench's code path at a tiny size (the reference standing in for the kernel): a dense
  row that cannot run here (cuDNN off NVIDIA GPUs, or for fp32) says why and the bench goes on
  with the next dense row as the baseline; an XLA row whose logits exceed the budget is
  skipped with its size."""
  kw = dict(batch=1, q_heads=2, kv_heads=1, head_dim=32, block_size=32, min_budget=32, reps=1,
            dtype=jnp.float32, impl="xla", gammas=(0.9,))
  lines = bench.run([64], **kw)
  rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| 64 |")}
  assert "unavailable: " in rows["dense cuDNN flash attention"]
  assert rows["dense XLA reference"].endswith("| baseline |")
  assert "baseline of the speed-ups: dense XLA reference" in rows
  assert any(name.startswith("flexprefill gamma=0.9 kernel only") for name in rows)
  assert {"block-sparse kernel, random blocks at 75% sparsity",
          "block-sparse kernel, random blocks at 95% sparsity"} <= set(rows)
  skipped = bench.run([64], ref_budget_bytes=1, **kw)
  assert any("dense XLA reference" in line and "skipped: its [T, T] logits need" in line
             for line in skipped)


def test_random_block_sets_have_the_asked_density_and_keep_diagonal_and_sink():
  """The official benchmark's random causal block sets: each causal block kept with the given
  probability, the diagonal and column 0 always (the kernel needs the diagonal)."""
  idx, cnt = bench.random_causal_selection(jax.random.PRNGKey(0), 1, 4, 128 * 32, 32, 0.25)
  mask = np.asarray(_indices_to_mask(idx, cnt, 128))
  assert np.all(mask[:, :, np.arange(128), np.arange(128)]) and np.all(mask[:, :, :, 0])
  assert not np.any(np.triu(np.ones((128, 128), bool), 1) & mask)  # causal blocks only
  density = float(reference.BlockSelection.density_of(cnt))
  assert 0.25 < density < 0.28, density  # + the diagonal and column 0


def test_density_only_mode_prints_the_selection_density():
  lines = bench.main(["--quick", "--density_only", "--gammas", "0.9", "--structure", "sink=12"])
  assert lines[-1].startswith("| 256 | 0.9 | ") and "'sink': 12.0" in lines[-1]


# ---------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"), (dict(tau=-0.1), "tau"),
    (dict(block_size=24), "block_size"), (dict(block_size=8), "block_size"),
    (dict(min_budget=-1), "min_budget"), (dict(max_budget=8, min_budget=64), "max_budget"),
    (dict(mode="dense"), "mode"), (dict(mode="fixed_budget"), "budget"),
    (dict(count_rule="tokens"), "count_rule"), (dict(impl="cuda"), "impl"),
    (dict(estimate_impl="triton"), "estimate_impl"),
])
def test_bad_arguments(kwargs, match):
  q, k, v = _qkv(9, 1, 48, 2, 1, 16)
  with pytest.raises(ValueError, match=match):
    sp.flexprefill_attention(q, k, v, **kwargs)


def test_bad_shapes():
  q, k, v = _qkv(9, 1, 48, 3, 2, 16)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    sp.dense_causal_attention(q, k, v)
  q, k, v = _qkv(9, 1, 48, 2, 1, 16)
  with pytest.raises(ValueError, match="q_len == k_len"):
    sp.select_blocks(q, k[:, :40])
  idx, cnt = sp.full_causal_selection(1, 2, 48, 16)
  with pytest.raises(ValueError, match="indices"):
    sp.block_sparse_attention(q, k, v, idx[:, :, :2], cnt, block_size=16)
  with pytest.raises(ValueError, match="head_dim"):
    sp.block_sparse_attention(q[..., :12], k[..., :12], v[..., :12], idx, cnt, block_size=16,
                              impl="pallas_gpu")

