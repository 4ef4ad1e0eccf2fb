"""MoDA attention as a Pallas kernel in the Triton style (GPU; `interpret=True` on CPU).

Design (moda.md 4.2-4.6). The wrapper folds the G query heads that share a KV head into the row
axis, token-major: folded row r of KV head j is (t = r // G, query head j * G + r % G). A query
tile holds `block_q` positions, i.e. block_q * G folded rows, so a tile always starts on a token
boundary (the "BT % G == 0" rule of moda.md 4.4 holds by construction). The depth cache is
flattened token-major, [b, hk, t * S, d], and cut into the same tiles: query tile i owns exactly
the depth columns of its own block_q tokens (moda.md 4.6), fetched by the same BlockSpec index.

  forward   grid (q tile, batch, kv head). One running max / normalizer (log2 domain) over the
            sequence key blocks (unmasked blocks below the tile, then masked diagonal blocks),
            then over the tile's depth columns in chunks with the equality mask
            row_token == column_token. Saves o and the logsumexp.
  dq + depth dk/dv
            same grid and loops; recomputes p = exp2(s - lse), ds = p * (dp - delta). dq gathers
            the sequence and depth parts; the depth dk / dv of the tile's columns are written
            directly, because no other program touches them: no atomics, no reduction.
  dk / dv   grid (key block, batch, kv head); loops over the query tiles that see the block
            (all G heads of a tile at once, so the G-fold sum happens in the matmul).

Triton needs power-of-two block shapes: each tile's folded rows (block_q * G) and its depth
columns (block_q * S) are padded up per tile in the wrapper, and the head dim is zero-padded.
Padded rows, tokens and depth columns are masked or carry zero cotangents, so T need not be a
multiple of any block size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.moda import _compat

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked block is no NaN

# Untuned defaults: no GPU was available to measure them. A tile of 64 folded rows and key
# blocks of 64 follow the official kernel's A100/H800 choice (moda.md 4.4).
DEFAULT_TILE_ROWS = 64
DEFAULT_BLOCK_K = 64


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling of one MoDA call (hashable: it is a nondiff argument of the custom_vjp).

  tq: query positions per tile; p: folded rows per tile (>= tq * g, padded);
  bk: key block; bd: depth chunk; pd: depth columns per tile (>= tq * s, padded);
  tp: padded length (multiple of tq and bk); dp: padded head dim.
  """
  b: int
  t: int
  hq: int
  hk: int
  g: int
  d: int
  s: int
  causal: bool
  scale: float
  tq: int
  p: int
  bk: int
  bd: int
  pd: int
  tp: int
  dp: int
  interpret: bool

  @property
  def nq(self) -> int:
    return self.tp // self.tq

  @property
  def nk(self) -> int:
    return self.tp // self.bk


def requested_tiles(q, k, *, block_q, block_k, default_rows: int, default_block_k: int):
  """(b, t, hq, hk, g, d, tq, bk): the call's shape and the tile asked for (shared with tpu.py):
  tq query positions per tile (default: default_rows folded rows), bk keys per block."""
  b, t, hq, d = q.shape
  hk = k.shape[2]
  g = hq // hk
  tq = max(1, default_rows // g) if block_q is None else block_q
  bk = default_block_k if block_k is None else block_k
  if tq < 1:
    raise ValueError(f"block_q must be >= 1 (query positions per tile); got {tq}")
  return b, t, hq, hk, g, d, tq, bk


def make_plan(q, k, s: int, *, causal: bool, sm_scale, block_q, block_k, interpret: bool) -> Plan:
  """Tiling for the Triton-style kernels; all padded extents are powers of two (>= 16 for dots)."""
  b, t, hq, hk, g, d, tq, bk = requested_tiles(q, k, block_q=block_q, block_k=block_k,
                                               default_rows=DEFAULT_TILE_ROWS,
                                               default_block_k=DEFAULT_BLOCK_K)
  if bk < 16 or bk & (bk - 1):
    raise ValueError(f"block_k must be a power of two >= 16 for the GPU kernel; got {bk}")
  tq = min(tq, t)
  bk = min(bk, max(16, _next_pow2(t)))
  p = max(16, _next_pow2(tq * g))
  bd = max(16, min(bk, _next_pow2(tq * s))) if s else 0
  pd = _round_up(tq * s, bd) if s else 0
  tp = _round_up(t, math.lcm(tq, bk))
  scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
  return Plan(b=b, t=t, hq=hq, hk=hk, g=g, d=d, s=s, causal=causal, scale=scale, tq=tq, p=p,
              bk=bk, bd=bd, pd=pd, tp=tp, dp=max(16, _next_pow2(d)), interpret=interpret)


# ---------------------------------------------------------------------------------------------
# Folded layout (shared with tpu.py). Tile i of a folded tensor is rows [i * rows, (i+1) * rows).


def fold_q(x, plan: Plan):
  """[b, t, hq, d] -> [b, hk, nq * p, dp]: G heads folded into rows, tiles padded to p rows."""
  b, t, hq, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, plan.tp - t), (0, 0), (0, plan.dp - d)))
  x = x.reshape(b, plan.tp, plan.hk, plan.g, plan.dp).transpose(0, 2, 1, 3, 4)
  x = x.reshape(b, plan.hk, plan.nq, plan.tq * plan.g, plan.dp)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, plan.p - plan.tq * plan.g), (0, 0)))
  return x.reshape(b, plan.hk, plan.nq * plan.p, plan.dp)


def unfold_q(x, plan: Plan):
  """Inverse of fold_q: [b, hk, nq * p, dp] -> [b, t, hq, d]."""
  b = x.shape[0]
  x = x.reshape(b, plan.hk, plan.nq, plan.p, plan.dp)[:, :, :, :plan.tq * plan.g]
  x = x.reshape(b, plan.hk, plan.tp, plan.g, plan.dp).transpose(0, 2, 1, 3, 4)
  return x.reshape(b, plan.tp, plan.hq, plan.dp)[:, :plan.t, :, :plan.d]


def fold_kv(x, plan: Plan):
  """[b, t, hk, d] -> [b, hk, tp, dp]."""
  x = jnp.pad(x, ((0, 0), (0, plan.tp - plan.t), (0, 0), (0, plan.dp - plan.d)))
  return x.transpose(0, 2, 1, 3)


def unfold_kv(x, plan: Plan):
  return x.transpose(0, 2, 1, 3)[:, :plan.t, :, :plan.d]


def fold_depth(x, plan: Plan):
  """[b, t, s, hk, d] -> [b, hk, nq * pd, dp]: token-major flat depth, tiles padded to pd."""
  b = x.shape[0]
  x = jnp.pad(x, ((0, 0), (0, plan.tp - plan.t), (0, 0), (0, 0), (0, plan.dp - plan.d)))
  x = x.transpose(0, 3, 1, 2, 4).reshape(b, plan.hk, plan.nq, plan.tq * plan.s, plan.dp)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, plan.pd - plan.tq * plan.s), (0, 0)))
  return x.reshape(b, plan.hk, plan.nq * plan.pd, plan.dp)


def unfold_depth(x, plan: Plan):
  """Inverse of fold_depth: [b, hk, nq * pd, dp] -> [b, t, s, hk, d]."""
  b = x.shape[0]
  x = x.reshape(b, plan.hk, plan.nq, plan.pd, plan.dp)[:, :, :, :plan.tq * plan.s]
  x = x.reshape(b, plan.hk, plan.tp, plan.s, plan.dp).transpose(0, 2, 3, 1, 4)
  return x[:, :plan.t, :, :, :plan.d]


# ---------------------------------------------------------------------------------------------
# Kernel pieces.


def _dot(a, b, contract=(1, 0)):
  """2-D matmul with fp32 accumulation; contract=(1, 1) is a @ b.T, (0, 0) is a.T @ b."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=jnp.float32)


def _seq_ranges(i, plan: Plan):
  """Key blocks of query tile i: [0, n_full) need no mask, [n_full, n_end) need one."""
  if plan.causal:
    n_full = lax.div(i * plan.tq + 1, plan.bk)     # every key <= the tile's first token
    n_end = lax.div((i + 1) * plan.tq + plan.bk - 1, plan.bk)
    return n_full, jnp.minimum(n_end, plan.nk)
  return plan.t // plan.bk, plan.nk              # only keys >= t (padding) are masked


def _seq_mask(rows, cols, plan: Plan):
  """rows: [p, 1] token of each folded row; cols: [1, bk] key positions -> [p, bk] visibility."""
  if plan.causal:
    return rows >= cols
  return jnp.broadcast_to(cols < plan.t, (rows.shape[0], cols.shape[1]))


def _depth_mask(p: int, n, plan: Plan):
  """[p, bd] visibility of depth chunk n of a tile: same token, and not a padding column."""
  r = lax.div(lax.broadcasted_iota(jnp.int32, (p, plan.bd), 0), plan.g)
  c = n * plan.bd + lax.broadcasted_iota(jnp.int32, (p, plan.bd), 1)
  return (c < plan.tq * plan.s) & (lax.div(c, plan.s) == r)


def _fwd_kernel(*refs, plan: Plan):
  """One (q tile, batch, kv head): online softmax over sequence blocks, then depth chunks."""
  if plan.s:
    q_ref, k_ref, v_ref, kd_ref, vd_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  i = pl.program_id(0)
  p, bk, bd = plan.p, plan.bk, plan.bd
  q = q_ref[...]                                                  # [p, dp]
  rows = i * plan.tq + lax.div(lax.broadcasted_iota(jnp.int32, (p, 1), 0), plan.g)
  c = plan.scale * LOG2E                                          # logits in the log2 domain

  def update(carry, s, v):
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    pr = jnp.exp2(s - m_new[:, None])
    l_new = alpha * l + jnp.sum(pr, axis=1)
    return acc * alpha[:, None] + _dot(pr.astype(v.dtype), v), m_new, l_new

  def seq_block(j, carry, masked):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, (1, 1)) * c                                    # [p, bk]
    if masked:
      cols = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      s = jnp.where(_seq_mask(rows, cols, plan), s, MASK_VALUE)
    return update(carry, s, v)

  def depth_chunk(n, carry):
    kd = kd_ref[pl.ds(n * bd, bd), :]
    vd = vd_ref[pl.ds(n * bd, bd), :]
    s = jnp.where(_depth_mask(p, n, plan), _dot(q, kd, (1, 1)) * c, MASK_VALUE)
    return update(carry, s, vd)

  carry = (jnp.zeros((p, plan.dp), jnp.float32), jnp.full((p,), -jnp.inf, jnp.float32),
           jnp.zeros((p,), jnp.float32))
  n_full, n_end = _seq_ranges(i, plan)
  carry = lax.fori_loop(0, n_full, functools.partial(seq_block, masked=False), carry)
  carry = lax.fori_loop(n_full, n_end, functools.partial(seq_block, masked=True), carry)
  if plan.s:
    carry = lax.fori_loop(0, plan.pd // bd, depth_chunk, carry)
  acc, m, l = carry
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(*refs, plan: Plan):
  """dq of one tile (sequence + depth parts) and the depth dk / dv of the columns it owns."""
  if plan.s:
    (q_ref, k_ref, v_ref, kd_ref, vd_ref, do_ref, lse_ref, delta_ref,
     dq_ref, dkd_ref, dvd_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  i = pl.program_id(0)
  p, bk, bd = plan.p, plan.bk, plan.bd
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]    # [p, 1]
  rows = i * plan.tq + lax.div(lax.broadcasted_iota(jnp.int32, (p, 1), 0), plan.g)
  c = plan.scale * LOG2E

  def probs_and_ds(s, v):
    pr = jnp.exp2(s - lse)                                        # softmax probabilities
    ds = pr * (_dot(do, v, (1, 1)) - delta)                       # d loss / d natural logits
    return pr, ds

  def seq_block(j, dq, masked):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, (1, 1)) * c
    if masked:
      cols = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      s = jnp.where(_seq_mask(rows, cols, plan), s, MASK_VALUE)
    _, ds = probs_and_ds(s, v)
    return dq + _dot(ds.astype(k.dtype), k)

  def depth_chunk(n, dq):
    sl = pl.ds(n * bd, bd)
    kd, vd = kd_ref[sl, :], vd_ref[sl, :]
    s = jnp.where(_depth_mask(p, n, plan), _dot(q, kd, (1, 1)) * c, MASK_VALUE)
    pr, ds = probs_and_ds(s, vd)
    dvd_ref[sl, :] = _dot(pr.astype(do.dtype), do, (0, 0)).astype(dvd_ref.dtype)
    dkd_ref[sl, :] = (_dot(ds.astype(q.dtype), q, (0, 0)) * plan.scale).astype(dkd_ref.dtype)
    return dq + _dot(ds.astype(kd.dtype), kd)

  dq = jnp.zeros((p, plan.dp), jnp.float32)
  n_full, n_end = _seq_ranges(i, plan)
  dq = lax.fori_loop(0, n_full, functools.partial(seq_block, masked=False), dq)
  dq = lax.fori_loop(n_full, n_end, functools.partial(seq_block, masked=True), dq)
  if plan.s:
    dq = lax.fori_loop(0, plan.pd // bd, depth_chunk, dq)
  dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, plan: Plan):
  """Sequence dk / dv of one key block: a loop over the query tiles (all G heads) that see it."""
  j = pl.program_id(0)
  p, bk = plan.p, plan.bk
  k, v = k_ref[...], v_ref[...]                                   # [bk, dp]
  cols = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)    # key positions
  c = plan.scale * LOG2E

  def q_tile(i, carry, masked):
    dk, dv = carry
    sl = pl.ds(i * p, p)
    q, do = q_ref[sl, :], do_ref[sl, :]
    lse, delta = lse_ref[sl][None, :], delta_ref[sl][None, :]    # [1, p]
    st = _dot(k, q, (1, 1)) * c                                   # [bk, p] = s transposed
    if masked:
      rows = i * plan.tq + lax.div(lax.broadcasted_iota(jnp.int32, (1, p), 1), plan.g)
      vis = (rows >= cols if plan.causal
             else jnp.broadcast_to(cols < plan.t, (bk, p)))          # [bk, p]
      st = jnp.where(vis, st, MASK_VALUE)
    pt = jnp.exp2(st - lse)
    dst = pt * (_dot(v, do, (1, 1)) - delta)
    return dk + _dot(dst.astype(q.dtype), q), dv + _dot(pt.astype(do.dtype), do)

  if plan.causal:
    i_lo = lax.div(j * bk, plan.tq)                               # first tile reaching key j*bk
    i_full = jnp.minimum(lax.div((j + 1) * bk - 1 + plan.tq - 1, plan.tq), plan.nq)
  else:
    i_lo = 0
    # nq for a block holding padded keys (>= t), else 0; integer arithmetic only: the loop
    # index takes the bound's type, and a boolean there fails Triton's lowering ('i1', 'i32')
    i_full = plan.nq * jnp.minimum(lax.div((j + 1) * bk - 1, plan.t), 1)
  carry = (jnp.zeros((bk, plan.dp), jnp.float32), jnp.zeros((bk, plan.dp), jnp.float32))
  carry = lax.fori_loop(i_lo, i_full, functools.partial(q_tile, masked=True), carry)
  carry = lax.fori_loop(i_full, plan.nq, functools.partial(q_tile, masked=False), carry)
  dk, dv = carry
  dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_calls on the folded layout.


def _params(plan: Plan):
  return _compat.TritonCompilerParams(num_warps=4 if plan.dp <= 64 else 8, num_stages=2)


def _specs(plan: Plan):
  """BlockSpecs for the (q tile, batch, kv head) grid."""
  tile = pl.BlockSpec((None, None, plan.p, plan.dp), lambda i, b, h: (b, h, i, 0))
  row = pl.BlockSpec((None, None, plan.p), lambda i, b, h: (b, h, i))
  seq = pl.BlockSpec((None, None, plan.tp, plan.dp), lambda i, b, h: (b, h, 0, 0))
  depth = pl.BlockSpec((None, None, plan.pd, plan.dp), lambda i, b, h: (b, h, i, 0))
  return tile, row, seq, depth


def forward(qf, kf, vf, kdf, vdf, plan: Plan):
  """Folded forward: returns o [b, hk, nq * p, dp] and lse [b, hk, nq * p] (log2 units)."""
  tile, row, seq, depth = _specs(plan)
  in_specs = [tile, seq, seq] + ([depth, depth] if plan.s else [])
  args = (qf, kf, vf) + ((kdf, vdf) if plan.s else ())
  return pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan),
      grid=(plan.nq, plan.b, plan.hk),
      in_specs=in_specs,
      out_specs=[tile, row],
      out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                 jax.ShapeDtypeStruct(qf.shape[:3], jnp.float32)],
      compiler_params=_params(plan),
      interpret=plan.interpret,
      name="moda_fwd",
  )(*args)


def backward(qf, kf, vf, kdf, vdf, of, lse, dof, plan: Plan):
  """Folded backward: (dq, dk, dv, d depth_k, d depth_v), the depth ones None when S = 0."""
  tile, row, seq, depth = _specs(plan)
  delta = jnp.sum(of.astype(jnp.float32) * dof.astype(jnp.float32), axis=-1)  # [b, hk, rows]
  in_specs = [tile, seq, seq] + ([depth, depth] if plan.s else []) + [tile, row, row]
  args = (qf, kf, vf) + ((kdf, vdf) if plan.s else ()) + (dof, lse, delta)
  out_specs = [tile] + ([depth, depth] if plan.s else [])
  out_shape = [jax.ShapeDtypeStruct(qf.shape, qf.dtype)]
  if plan.s:
    out_shape += [jax.ShapeDtypeStruct(kdf.shape, kdf.dtype),
                  jax.ShapeDtypeStruct(vdf.shape, vdf.dtype)]
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(plan.nq, plan.b, plan.hk),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(plan), interpret=plan.interpret, name="moda_bwd_dq",
  )(*args)
  dq, (dkd, dvd) = outs[0], (outs[1:] if plan.s else (None, None))

  kblock = pl.BlockSpec((None, None, plan.bk, plan.dp), lambda j, b, h: (b, h, j, 0))
  qall = pl.BlockSpec((None, None, plan.nq * plan.p, plan.dp), lambda j, b, h: (b, h, 0, 0))
  rall = pl.BlockSpec((None, None, plan.nq * plan.p), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan),
      grid=(plan.nk, plan.b, plan.hk),
      in_specs=[qall, kblock, kblock, qall, rall, rall],
      out_specs=[kblock, kblock],
      out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype),
                 jax.ShapeDtypeStruct(vf.shape, vf.dtype)],
      compiler_params=_params(plan), interpret=plan.interpret, name="moda_bwd_dkv",
  )(qf, kf, vf, dof, lse, delta)
  return dq, dk, dv, dkd, dvd


# ---------------------------------------------------------------------------------------------
# custom_vjp on the caller's layout, generic over the folded forward / backward.


def make_op(forward_fn, backward_fn, fold_q_fn=fold_q, unfold_q_fn=unfold_q,
            fold_kv_fn=fold_kv, unfold_kv_fn=unfold_kv, fold_depth_fn=fold_depth,
            unfold_depth_fn=unfold_depth):
  """Builds op(q, k, v, depth_k, depth_v, plan) with a custom_vjp from folded kernels."""

  def fold_all(q, k, v, kd, vd, plan):
    depth = (fold_depth_fn(kd, plan), fold_depth_fn(vd, plan)) if plan.s else (None, None)
    return (fold_q_fn(q, plan), fold_kv_fn(k, plan), fold_kv_fn(v, plan)) + depth

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def op(q, k, v, kd, vd, plan):
    of, _ = forward_fn(*fold_all(q, k, v, kd, vd, plan), plan)
    return unfold_q_fn(of, plan)

  def op_fwd(q, k, v, kd, vd, plan):
    of, lse = forward_fn(*fold_all(q, k, v, kd, vd, plan), plan)
    return unfold_q_fn(of, plan), (q, k, v, kd, vd, of, lse)

  def op_bwd(plan, res, do):
    q, k, v, kd, vd, of, lse = res
    dq, dk, dv, dkd, dvd = backward_fn(*fold_all(q, k, v, kd, vd, plan), of, lse,
                                       fold_q_fn(do.astype(q.dtype), plan), plan)
    depth_grads = ((unfold_depth_fn(dkd, plan), unfold_depth_fn(dvd, plan)) if plan.s
                   else (None, None))                            # S = 0 passes no depth
    return (unfold_q_fn(dq, plan), unfold_kv_fn(dk, plan), unfold_kv_fn(dv, plan)) + depth_grads

  op.defvjp(op_fwd, op_bwd)
  return op


_moda_gpu = make_op(forward, backward)


def moda_attention_gpu(q, k, v, depth_k=None, depth_v=None, *, causal: bool = True,
                       sm_scale: float | None = None, block_q: int | None = None,
                       block_k: int | None = None, interpret: bool = False):
  """MoDA attention with the Triton-style kernels (shapes checked by the caller).

  block_q: query positions per tile (a tile holds block_q * G folded rows); default 64 // G.
  block_k: key block, a power of two >= 16; default 64. Both defaults are untuned: no GPU was
  available to measure them.
  """
  s = 0 if depth_k is None else depth_k.shape[2]
  plan = make_plan(q, k, s, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                   interpret=interpret)
  if s == 0:
    depth_k = depth_v = None
  return _moda_gpu(q, k, v, depth_k, depth_v, plan)
