"""MoDA attention as a Pallas kernel in the Mosaic TPU style (`interpret=True` on CPU).

Same folded layout as gpu.py (moda.md 4.6): G query heads of a KV head folded into the rows, a
query tile of block_q positions = block_q * G rows (padded to a multiple of 8 sublanes), and the
tile's own depth columns, block_q * S of them (padded to a multiple of 8), fetched with the same
block index. The head dim is the full last block dim. Unlike gpu.py the key loop is a grid axis:

  forward   grid (batch, kv head, q tile, key block), the key axis "arbitrary". VMEM scratch holds
            the running max m, normalizer l and accumulator; blocks above the causal diagonal are
            skipped (pl.when) and their index map is clamped so nothing new is fetched. At the
            last key block the tile's depth columns join the same online softmax, then o and the
            logsumexp are written.
  dq        same grid; dq accumulates in scratch; at the last key block the depth part adds to dq
            and the tile's depth dk / dv are written directly (the tile owns those columns).
  dk / dv   grid (batch, kv head, key block, q tile), the q-tile axis "arbitrary", dk / dv in
            scratch; tiles entirely before the key block are skipped and not fetched.

Masks avoid vector integer division: a folded row r of tile i has token i*tq + r // G, so
"token >= u" is r >= (u - i*tq) * G; the depth column tokens c // S come in as a small int32
input ([1, pd], -1 on padding columns) and "same token" is x*G <= r < x*G + G.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.moda import _compat
from kernels_pallas.moda import gpu
from kernels_pallas.moda.gpu import MASK_VALUE, Plan

# Untuned defaults: no TPU was available to measure them. 128 folded rows and 128-key blocks
# fill the MXU on every TPU generation.
DEFAULT_TILE_ROWS = 128
DEFAULT_BLOCK_K = 128


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def make_plan(q, k, s: int, *, causal: bool, sm_scale, block_q, block_k, interpret: bool) -> Plan:
  """Tiling for the Mosaic kernels: row extents are multiples of 8, the head dim is not padded."""
  b, t, hq, hk, g, d, tq, bk = gpu.requested_tiles(q, k, block_q=block_q, block_k=block_k,
                                                   default_rows=DEFAULT_TILE_ROWS,
                                                   default_block_k=DEFAULT_BLOCK_K)
  if bk < 8 or bk % 8:
    raise ValueError(f"block_k must be a positive multiple of 8 for the TPU kernel; got {bk}")
  tq = min(tq, t)
  bk = min(bk, _round_up(t, 8))
  pd = _round_up(tq * s, 8) if s else 0
  scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
  return Plan(b=b, t=t, hq=hq, hk=hk, g=g, d=d, s=s, causal=causal, scale=scale, tq=tq,
              p=_round_up(tq * g, 8), bk=bk, bd=pd, pd=pd, tp=_round_up(t, math.lcm(tq, bk)),
              dp=d, interpret=interpret)


def _col_tokens(plan: Plan):
  """[1, pd] int32: the in-tile token c // S of each depth column, -1 on padding columns."""
  c = jnp.arange(plan.pd, dtype=jnp.int32)
  return jnp.where(c < plan.tq * plan.s, c // max(plan.s, 1), -1)[None, :]


def _last_block(i, plan: Plan):
  """Last key block query tile i needs (causal): the one holding its last token."""
  return lax.div((i + 1) * plan.tq + plan.bk - 1, plan.bk) - 1


def _first_tile(j, plan: Plan):
  """First query tile that sees key block j (causal)."""
  return lax.div(j * plan.bk, plan.tq)


def _block_flags(i, j, plan: Plan):
  """(needed, needs_mask) for query tile i and key block j."""
  if plan.causal:
    return j <= _last_block(i, plan), (j + 1) * plan.bk - 1 > i * plan.tq
  return j >= 0, (j + 1) * plan.bk > plan.t


def _seq_mask(i, j, shape, plan: Plan):
  """[p, bk] visibility of key block j to the folded rows of query tile i."""
  r = lax.broadcasted_iota(jnp.int32, shape, 0)
  u = j * plan.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
  if plan.causal:
    return r >= (u - i * plan.tq) * plan.g       # token(r) = i*tq + r // G >= u
  return u < plan.t


def _depth_mask(ctok, plan: Plan):
  """[p, pd] visibility of the tile's depth columns: same token (ctok: [1, pd])."""
  r = lax.broadcasted_iota(jnp.int32, (plan.p, plan.pd), 0)
  lo = ctok * plan.g
  return (r >= lo) & (r < lo + plan.g)


def _dot(a, b, contract=(1, 0)):
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         preferred_element_type=jnp.float32)


def _fwd_kernel(*refs, plan: Plan):
  if plan.s:
    ctok_ref, q_ref, k_ref, v_ref, kd_ref, vd_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def update(s, v):
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))   # [p, 1]
    alpha = jnp.exp(m - m_new)
    pr = jnp.exp(s - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(pr, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot(pr.astype(v.dtype), v)
    m_sc[...] = m_new

  def seq_step(masked: bool):
    s = _dot(q_ref[...], k_ref[...], (1, 1)) * plan.scale        # [p, bk]
    if masked:
      s = jnp.where(_seq_mask(i, j, s.shape, plan), s, MASK_VALUE)
    update(s, v_ref[...])

  needed, needs_mask = _block_flags(i, j, plan)
  pl.when(needed & jnp.logical_not(needs_mask))(lambda: seq_step(False))
  pl.when(needed & needs_mask)(lambda: seq_step(True))

  @pl.when(j == plan.nk - 1)
  def _finish():
    if plan.s:
      s = _dot(q_ref[...], kd_ref[...], (1, 1)) * plan.scale     # [p, pd]
      update(jnp.where(_depth_mask(ctok_ref[...], plan), s, MASK_VALUE), vd_ref[...])
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _dq_kernel(*refs, plan: Plan):
  if plan.s:
    (ctok_ref, q_ref, k_ref, v_ref, kd_ref, vd_ref, do_ref, lse_ref, delta_ref,
     dq_ref, dkd_ref, dvd_ref, dq_sc) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def probs_and_ds(s, v):
    pr = jnp.exp(s - lse_ref[...])
    return pr, pr * (_dot(do_ref[...], v, (1, 1)) - delta_ref[...])

  def seq_step(masked: bool):
    k = k_ref[...]
    s = _dot(q_ref[...], k, (1, 1)) * plan.scale
    if masked:
      s = jnp.where(_seq_mask(i, j, s.shape, plan), s, MASK_VALUE)
    _, ds = probs_and_ds(s, v_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k)

  needed, needs_mask = _block_flags(i, j, plan)
  pl.when(needed & jnp.logical_not(needs_mask))(lambda: seq_step(False))
  pl.when(needed & needs_mask)(lambda: seq_step(True))

  @pl.when(j == plan.nk - 1)
  def _finish():
    if plan.s:
      q, do, kd = q_ref[...], do_ref[...], kd_ref[...]
      s = _dot(q, kd, (1, 1)) * plan.scale
      pr, ds = probs_and_ds(jnp.where(_depth_mask(ctok_ref[...], plan), s, MASK_VALUE),
                            vd_ref[...])
      dvd_ref[...] = _dot(pr.astype(do.dtype), do, (0, 0)).astype(dvd_ref.dtype)
      dkd_ref[...] = (_dot(ds.astype(q.dtype), q, (0, 0)) * plan.scale).astype(dkd_ref.dtype)
      dq_sc[...] += _dot(ds.astype(kd.dtype), kd)
    dq_ref[...] = (dq_sc[...] * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc,
                *, plan: Plan):
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step(masked: bool):
    # Scores stay [p, bk] (rows on sublanes, as in the forward) and the transposes go into
    # the matmuls' contracting dims, so no vector transpose is needed.
    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    s = _dot(q, k, (1, 1)) * plan.scale                           # [p, bk]
    if masked:
      s = jnp.where(_seq_mask(i, j, s.shape, plan), s, MASK_VALUE)
    pr = jnp.exp(s - lse_ref[...])
    ds = pr * (_dot(do, v_ref[...], (1, 1)) - delta_ref[...])
    dv_sc[...] += _dot(pr.astype(do.dtype), do, (0, 0))
    dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0))

  needed, needs_mask = _block_flags(i, j, plan)
  pl.when(needed & jnp.logical_not(needs_mask))(lambda: step(False))
  pl.when(needed & needs_mask)(lambda: step(True))

  @pl.when(i == plan.nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _params():
  return _compat.TPUCompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _specs(plan: Plan):
  """BlockSpecs of the (batch, kv head, q tile, key block) grid."""
  causal = plan.causal

  def kv_index(b, h, i, j):
    return (b, h, jnp.minimum(j, _last_block(i, plan)) if causal else j, 0)

  tile = pl.BlockSpec((None, None, plan.p, plan.dp), lambda b, h, i, j: (b, h, i, 0))
  row = pl.BlockSpec((None, None, plan.p, 1), lambda b, h, i, j: (b, h, i, 0))
  kv = pl.BlockSpec((None, None, plan.bk, plan.dp), kv_index)
  depth = pl.BlockSpec((None, None, plan.pd, plan.dp), lambda b, h, i, j: (b, h, i, 0))
  ctok = pl.BlockSpec((1, plan.pd), lambda b, h, i, j: (0, 0))
  return tile, row, kv, depth, ctok


def _call(kernel, plan: Plan, grid, in_specs, out_specs, out_shape, scratch, name):
  return pl.pallas_call(
      functools.partial(kernel, plan=plan),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=_params(), interpret=plan.interpret, name=name)


def forward(qf, kf, vf, kdf, vdf, plan: Plan):
  """Folded forward: o [b, hk, nq * p, d] and lse [b, hk, nq * p, 1] (natural log)."""
  tile, row, kv, depth, ctok = _specs(plan)
  in_specs = ([ctok] if plan.s else []) + [tile, kv, kv] + ([depth, depth] if plan.s else [])
  args = ((_col_tokens(plan),) if plan.s else ()) + (qf, kf, vf) + ((kdf, vdf) if plan.s else ())
  return _call(
      _fwd_kernel, plan, (plan.b, plan.hk, plan.nq, plan.nk), in_specs, [tile, row],
      [jax.ShapeDtypeStruct(qf.shape, qf.dtype),
       jax.ShapeDtypeStruct(qf.shape[:3] + (1,), jnp.float32)],
      [_compat.vmem((plan.p, 1), jnp.float32), _compat.vmem((plan.p, 1), jnp.float32),
       _compat.vmem((plan.p, plan.dp), jnp.float32)], "moda_fwd_tpu")(*args)


def backward(qf, kf, vf, kdf, vdf, of, lse, dof, plan: Plan):
  """Folded backward: (dq, dk, dv, d depth_k, d depth_v), the depth ones None when S = 0."""
  tile, row, kv, depth, ctok = _specs(plan)
  delta = jnp.sum(of.astype(jnp.float32) * dof.astype(jnp.float32), axis=-1, keepdims=True)
  in_specs = (([ctok] if plan.s else []) + [tile, kv, kv] + ([depth, depth] if plan.s else [])
              + [tile, row, row])
  args = (((_col_tokens(plan),) if plan.s else ()) + (qf, kf, vf)
          + ((kdf, vdf) if plan.s else ()) + (dof, lse, delta))
  out_shape = [jax.ShapeDtypeStruct(qf.shape, qf.dtype)]
  if plan.s:
    out_shape += [jax.ShapeDtypeStruct(kdf.shape, kdf.dtype),
                  jax.ShapeDtypeStruct(vdf.shape, vdf.dtype)]
  outs = _call(_dq_kernel, plan, (plan.b, plan.hk, plan.nq, plan.nk), in_specs,
               [tile] + ([depth, depth] if plan.s else []), out_shape,
               [_compat.vmem((plan.p, plan.dp), jnp.float32)], "moda_bwd_dq_tpu")(*args)
  dq, (dkd, dvd) = outs[0], (outs[1:] if plan.s else (None, None))

  def q_index(b, h, j, i):
    return (b, h, jnp.maximum(i, _first_tile(j, plan)) if plan.causal else i, 0)

  qt = pl.BlockSpec((None, None, plan.p, plan.dp), q_index)
  rt = pl.BlockSpec((None, None, plan.p, 1), q_index)
  kb = pl.BlockSpec((None, None, plan.bk, plan.dp), lambda b, h, j, i: (b, h, j, 0))
  dk, dv = _call(
      _dkv_kernel, plan, (plan.b, plan.hk, plan.nk, plan.nq), [qt, kb, kb, qt, rt, rt],
      [kb, kb],
      [jax.ShapeDtypeStruct(kf.shape, kf.dtype), jax.ShapeDtypeStruct(vf.shape, vf.dtype)],
      [_compat.vmem((plan.bk, plan.dp), jnp.float32)] * 2, "moda_bwd_dkv_tpu",
  )(qf, kf, vf, dof, lse, delta)
  return dq, dk, dv, dkd, dvd


_moda_tpu = gpu.make_op(forward, backward)


def moda_attention_tpu(q, k, v, depth_k=None, depth_v=None, *, causal: bool = True,
                       sm_scale: float | None = None, block_q: int | None = None,
                       block_k: int | None = None, interpret: bool = False):
  """MoDA attention with the Mosaic TPU kernels (shapes checked by the caller).

  block_q: query positions per tile (block_q * G folded rows, padded to a multiple of 8);
  default 128 // G. block_k: key block, a multiple of 8; default 128. Both defaults are
  untuned: no TPU was available to measure them.
  """
  s = 0 if depth_k is None else depth_k.shape[2]
  plan = make_plan(q, k, s, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                   interpret=interpret)
  if s == 0:
    depth_k = depth_v = None
  return _moda_tpu(q, k, v, depth_k, depth_v, plan)
