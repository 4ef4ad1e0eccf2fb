"""The linear-recurrence core of the recurrent sequence mixers (research/model/recurrent.py).

Every recurrent mixer keeps, per head, a matrix state S [d_k, d_v] and reads it with a query
row, o_t = q_t S_t (row-vector convention). Two transitions cover the four papers:

  diagonal   S_t = Diag(a_t) S_{t-1} + k_t^T v_t          a_t = exp(log_a_t) in (0, 1]
             log_a [b, t, h] (one decay per head: RetNet's gamma, a scalar gate, MLGRU's
             forget gate with d_k = d_v = 1 per channel) or [b, t, h, d_k] (GLA's gate over
             key dimensions). a = 1 is plain linear attention.
  delta      S_t = g_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
             (gated DeltaNet; keys L2-normalised by the caller; g_t = exp(log_g_t) a scalar per
             head, beta_t in (0, 2)); DeltaProduct applies n_h such sub-steps per token, which
             is this recurrence over the interleaved sequence (`interleave_householder`).

and each has these forms, which compute the same function (tests/test_recurrence.py):

  recurrent   `lax.scan` over tokens: the definition, and the decode step
  chunkwise   the training path: chunks of `chunk` tokens; within a chunk a masked quadratic
              form, across chunks the state (a scan over chunks; every exponent <= 0)
  parallel    diagonal only: the T x T masked form (RetNet's parallel retention)
  scan        diagonal only: an associative scan over tokens that materialises every state
              (the fast form for MLGRU's per-channel scalars)

All take an optional initial state [b, h, d_k, d_v] and return (outputs [b, t, h, d_v], the
final state). Decays are accumulated in log space in fp32. A sequence whose length is not a
multiple of the chunk is padded with tokens that neither decay nor write (log_a = 0, k = 0), so
the final state is the last real token's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=HIGHEST)


def _lift(x, ndim: int):
  """x with leading singleton axes up to rank `ndim` (explicit broadcasting)."""
  return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _zeros_state(q, v):
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def _pad_time(x, n: int):
  """Pads axis 1 with n zeros."""
  if n == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, n)
  return jnp.pad(x, widths)


def _chunked(x, chunk: int):
  """[b, T, h, ...] (T a multiple of chunk) -> [b, h, n, chunk, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _unchunked(x):
  """[b, h, n, chunk, ...] -> [b, n * chunk, h, ...]."""
  b, h, n, c = x.shape[:4]
  return jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, *x.shape[4:])


# ------------------------------------------------------------------------------ diagonal


def diagonal_recurrent(q, k, v, log_a, initial_state=None):
  """S_t = Diag(exp(log_a_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t, one token at a time."""
  s0 = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
  vector = log_a.ndim == 4

  def step(s, xs):
    qt, kt, vt, lat = xs  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h(, dk)]
    decay = jnp.exp(lat)[..., None] if vector else jnp.exp(lat)[..., None, None]
    s = decay * s + kt[..., :, None] * vt[..., None, :]
    return s, _einsum("bhd,bhde->bhe", qt, s)

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, log_a))
  s, out = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(out, 0, 1), s


def _intra(q, k, v, cum, mask):
  """sum_{s: mask[t, s]} (q_t . (k_s * exp(cum_t - cum_s))) v_s within blocks:
  q, k [..., c, dk]; v [..., c, dv]; cum [..., c] or [..., c, dk] (cumulative log decays)."""
  if cum.ndim == q.ndim - 1:  # one decay per head: a [c, c] weight
    diff = cum[..., :, None] - cum[..., None, :]
    w = jnp.exp(jnp.where(_lift(mask, diff.ndim), diff, -jnp.inf))
    scores = _einsum("...cd,...sd->...cs", q, k) * w
  else:  # one decay per key dimension: [c, c, dk] weights, exact and stable in log space
    diff = cum[..., :, None, :] - cum[..., None, :, :]
    w = jnp.exp(jnp.where(_lift(mask[..., None], diff.ndim), diff, -jnp.inf))
    scores = _einsum("...cd,...sd,...csd->...cs", q, k, w)
  return _einsum("...cs,...se->...ce", scores, v)


def diagonal_parallel(q, k, v, log_a, initial_state=None):
  """The T x T form: o_t = sum_{s <= t} (q_t . k_s exp(L_t - L_s)) v_s (+ the initial state
  read through the decay q_t exp(L_t) S_0), L = cumsum(log_a). RetNet's parallel retention
  (eq. 5) when log_a is a constant per head."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  cum = jnp.cumsum(log_a.astype(jnp.float32), axis=1)  # [b, t, h(, dk)]
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  bh = lambda x: jnp.moveaxis(x, 2, 1)  # [b, t, h, ...] -> [b, h, t, ...]
  out = _intra(bh(q), bh(k), bh(v), bh(cum), mask)
  if initial_state is not None:
    decay = jnp.exp(cum)[..., None] if cum.ndim == 3 else jnp.exp(cum)
    out = out + bh(_einsum("bthd,bhde->bthe", q * decay, initial_state.astype(jnp.float32)))
  final = _final_state_from_parallel(k, v, cum, initial_state)
  return jnp.moveaxis(out, 1, 2), final


def _final_state_from_parallel(k, v, cum, initial_state):
  last = cum[:, -1]  # [b, h(, dk)]
  w = jnp.exp(last[:, None] - cum)  # [b, t, h(, dk)]
  kw = k * (w[..., None] if cum.ndim == 3 else w)
  s = _einsum("bthd,bthe->bhde", kw, v)
  if initial_state is not None:
    decay = jnp.exp(last)[..., None, None] if cum.ndim == 3 else jnp.exp(last)[..., None]
    s = s + decay * initial_state.astype(jnp.float32)
  return s


def diagonal_chunkwise(q, k, v, log_a, *, chunk: int, initial_state=None):
  """Chunks of `chunk` tokens (GLA's chunkwise form, section 3.4 of Yang et al.; RetNet's
  chunkwise retention, eq. 7): within chunk i, with L the cumulative log decay from the chunk's
  start,
    O_[i] = (Q ⊙ e^L) S_[i-1] + masked-quadratic(Q, K, V; e^(L_t - L_s))
    S_[i] = Diag(e^(L_C)) S_[i-1] + (K ⊙ e^(L_C - L))^T V
  every exponent <= 0. The per-chunk contributions are computed for all chunks at once; only
  the state recursion S_[i] is a scan over chunks."""
  b, t, h, dk = q.shape
  pad = -t % chunk
  q, k, v, log_a = (_pad_time(x.astype(jnp.float32), pad) for x in (q, k, v, log_a))
  qc, kc, vc, lc = (_chunked(x, chunk) for x in (q, k, v, log_a))  # [b, h, n, c, ...]
  vector = lc.ndim == 5
  cum = jnp.cumsum(lc, axis=3)
  last = cum[:, :, :, -1]  # [b, h, n(, dk)]
  e = lambda x: jnp.exp(x)[..., None] if not vector else jnp.exp(x)
  k_to_end = kc * e(last[:, :, :, None] - cum)
  contrib = _einsum("bhncd,bhnce->bhnde", k_to_end, vc)  # each chunk's write into the state
  decay = jnp.exp(last)[..., None, None] if not vector else jnp.exp(last)[..., None]

  s0 = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

  def step(s, xs):
    dec, add = xs
    return dec * s + add, s

  s, s_in = jax.lax.scan(step, s0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(contrib, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)  # [b, h, n, dk, dv]: the state entering each chunk
  inter = _einsum("bhncd,bhnde->bhnce", qc * e(cum), s_in)
  mask = jnp.tril(jnp.ones((chunk, chunk), bool))
  out = inter + _intra(qc, kc, vc, cum, mask)
  return _unchunked(out)[:, :t], s


def diagonal_scan(q, k, v, log_a, initial_state=None):
  """The diagonal recurrence as an associative scan over tokens (Blelloch): the pairs
  (a_t, k_t^T v_t) compose as (a, B) then (a', B') = (a a', a' B + B'), so every S_t comes out in
  log T parallel steps. It materialises every state, [b, t, h, d_k, d_v]: the fast form for
  small states (MLGRU's d_k = d_v = 1 per channel), a memory-hungry one for large."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  a = jnp.exp(log_a.astype(jnp.float32))
  a = a[..., None, None] if a.ndim == 3 else a[..., None]  # [b, t, h, dk or 1, 1]
  writes = k[..., :, None] * v[..., None, :]  # [b, t, h, dk, dv]
  if initial_state is not None:  # S_0 enters as the first token's write, decayed by a_1
    writes = writes.at[:, 0].add(a[:, 0] * initial_state.astype(jnp.float32))

  def combine(left, right):
    (a1, b1), (a2, b2) = left, right
    return a1 * a2, a2 * b1 + b2

  _, states = jax.lax.associative_scan(combine, (a, writes), axis=1)
  out = _einsum("bthd,bthde->bthe", q, states)
  return out, states[:, -1]


# ------------------------------------------------------------------------------ delta


def delta_recurrent(q, k, v, beta, log_g=None, initial_state=None):
  """S_t = g_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t (gated DeltaNet;
  DeltaNet when log_g is None). q, k [b, t, h, dk]; v [b, t, h, dv]; beta, log_g [b, t, h]."""
  s0 = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)
  if log_g is None:
    log_g = jnp.zeros(beta.shape, jnp.float32)

  def step(s, xs):
    qt, kt, vt, bt, gt = xs
    s = jnp.exp(gt)[..., None, None] * s
    err = vt - _einsum("bhd,bhde->bhe", kt, s)  # v_t - k_t S: the write the delta rule makes
    s = s + bt[..., None, None] * kt[..., :, None] * err[..., None, :]
    return s, _einsum("bhd,bhde->bhe", qt, s)

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, beta, log_g))
  s, out = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(out, 0, 1), s


def delta_chunkwise(q, k, v, beta, log_g=None, *, chunk: int, initial_state=None):
  """The chunkwise delta rule (the WY / UT form of Yang et al. 2024, with a scalar gate):
  within a chunk, with b_t the cumulative log gate from the chunk's start and
  G_ts = e^(b_t - b_s) (t >= s), the pseudo-values U' = beta (V - e^b K S_0 - ...) solve
    (I + Diag(beta) (strict-tril(K K^T) ⊙ G)) U' = Diag(beta) (V - Diag(e^b) K S_0),
  so U' = U - W S_0 with U, W from one unit-triangular solve per chunk (independent of the
  state). Then
    O = (Diag(e^b) Q - P W) S_0 + P U,      P = tril(Q K^T) ⊙ G
    S = (e^(b_C) I - K_hat^T W) S_0 + K_hat^T U,   K_hat = K ⊙ e^(b_C - b)
  so the state recursion across chunks is S <- A_i S + B_i, the only sequential part."""
  b, t, h, dk = q.shape
  if log_g is None:
    log_g = jnp.zeros(beta.shape, jnp.float32)
  pad = -t % chunk
  q, k, v, beta, log_g = (_pad_time(x.astype(jnp.float32), pad) for x in (q, k, v, beta, log_g))
  qc, kc, vc, bc, gc = (_chunked(x, chunk) for x in (q, k, v, beta, log_g))
  cum = jnp.cumsum(gc, axis=3)  # [b, h, n, c]
  incl = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  diff = cum[..., :, None] - cum[..., None, :]
  g_strict = jnp.exp(jnp.where(_lift(strict, diff.ndim), diff, -jnp.inf))
  g_incl = jnp.exp(jnp.where(_lift(incl, diff.ndim), diff, -jnp.inf))
  kk = _einsum("bhncd,bhnsd->bhncs", kc, kc)
  m = _lift(jnp.eye(chunk, dtype=jnp.float32), 5) + bc[..., None] * kk * g_strict
  rhs = jnp.concatenate([bc[..., None] * vc, (bc * jnp.exp(cum))[..., None] * kc], axis=-1)
  sol = jax.lax.linalg.triangular_solve(m, rhs, left_side=True, lower=True, unit_diagonal=True)
  u, w = sol[..., :vc.shape[-1]], sol[..., vc.shape[-1]:]  # [b, h, n, c, dv], [.., c, dk]
  p = _einsum("bhncd,bhnsd->bhncs", qc, kc) * g_incl
  q_hat = jnp.exp(cum)[..., None] * qc - _einsum("bhncs,bhnsd->bhncd", p, w)
  pu = _einsum("bhncs,bhnse->bhnce", p, u)
  last = cum[..., -1]  # [b, h, n]
  k_hat = kc * jnp.exp(last[..., None] - cum)[..., None]
  a = (jnp.exp(last)[..., None, None] * _lift(jnp.eye(dk, dtype=jnp.float32), 5)
       - _einsum("bhncd,bhnce->bhnde", k_hat, w))  # [b, h, n, dk, dk]
  bmat = _einsum("bhncd,bhnce->bhnde", k_hat, u)  # [b, h, n, dk, dv]

  s0 = _zeros_state(q, v) if initial_state is None else initial_state.astype(jnp.float32)

  def step(s, xs):
    ai, bi = xs
    return _einsum("bhde,bhef->bhdf", ai, s) + bi, s

  s, s_in = jax.lax.scan(step, s0, (jnp.moveaxis(a, 2, 0), jnp.moveaxis(bmat, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)
  out = _einsum("bhncd,bhnde->bhnce", q_hat, s_in) + pu
  return _unchunked(out)[:, :t], s


def interleave_householder(q, k, v, beta, log_g=None):
  """DeltaProduct's n_h sub-steps per token as one delta-rule sequence of n_h T steps (the
  kernel trick of section 3.4 of the digest): k, v, beta [b, t, n_h, h, ...] -> [b, n_h t, h,
  ...] in (token, sub-step) order; the query is read only at each token's last sub-step and the
  gate applied only at its first. Returns (q, k, v, beta, log_g) of the long sequence; take the
  outputs back with `every_last(out, n_h)`."""
  b, t, nh = k.shape[:3]
  flat = lambda x: x.reshape(b, t * nh, *x.shape[3:])
  q_long = jnp.zeros((b, t, nh) + q.shape[2:], q.dtype).at[:, :, -1].set(q)
  g_long = None
  if log_g is not None:
    g_long = jnp.zeros((b, t, nh) + log_g.shape[2:], log_g.dtype).at[:, :, 0].set(log_g)
    g_long = flat(g_long)
  return flat(q_long), flat(k), flat(v), flat(beta), g_long


def every_last(out, nh: int):
  """[b, n_h t, ...] -> [b, t, ...]: each token's last sub-step."""
  b, tl = out.shape[:2]
  return out.reshape(b, tl // nh, nh, *out.shape[2:])[:, :, -1]


def householder_recurrent(q, k, v, beta, log_g=None, initial_state=None):
  """DeltaProduct by its definition: per token, the gate, then n_h rank-1 delta sub-steps
  (j = 1 first), then the read-out o_t = q_t S_t. k, v, beta [b, t, n_h, h, ...]."""
  s0 = _zeros_state(q, v[:, :, 0]) if initial_state is None else initial_state.astype(jnp.float32)
  nh = k.shape[2]
  if log_g is None:
    log_g = jnp.zeros(q.shape[:3], jnp.float32)

  def step(s, xs):
    qt, kt, vt, bt, gt = xs
    s = jnp.exp(gt)[..., None, None] * s
    for j in range(nh):
      err = vt[:, j] - _einsum("bhd,bhde->bhe", kt[:, j], s)
      s = s + bt[:, j, :, None, None] * kt[:, j, :, :, None] * err[..., None, :]
    return s, _einsum("bhd,bhde->bhe", qt, s)

  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, beta, log_g))
  s, out = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(out, 0, 1), s


FORMS = ("recurrent", "chunkwise", "parallel", "scan")
