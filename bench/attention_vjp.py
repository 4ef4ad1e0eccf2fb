"""Attention forward + backward on XLA:CPU: the module's xla_attention against candidate rewrites.

  python bench/attention_vjp.py --check                 # candidates == reference (values, grads)
  python bench/attention_vjp.py                         # attention fwd+bwd alone, tiny shape
  python bench/attention_vjp.py --step                  # the whole training step of --spec
  taskset -c 0 python bench/attention_vjp.py --step     # one core: CPU time measures the work

Variants (`--variants`, the first is the reference of the ratios):
  module       research.model.attention.xla_attention as it is (5-D einsums, autodiff backward)
  head_major   the same formula on head-major operands [b, kv, g*t, d] with 4-D dot_generals
               (XLA:CPU then runs q k^T and p^T do as transposed-operand dots, no copies)
  vjp_rows     head_major with a hand-written backward (jax.custom_vjp, flash-attention's:
               dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K, dK = dS^T Q)
               and softmax reductions over chunks of 32 keys, which XLA:CPU fuses
  vjp_keys     vjp_rows on S^T [b, kv, s, g*t] (keys major): its reductions run over a major
               axis, which XLA:CPU vectorizes (a max over the minor axis of [12,4,64,64] is
               ~190 us on one core, over a major axis ~40 us)
  elementwise  no attention (q * k * v): the step's cost without it

All variants are compiled in one process and timed in alternating windows (the order reversed
every other round), so a machine busy with other work slows them alike; prints wall and process
CPU time per call, per-variant medians, and the median of the paired window ratios. With
`--step` each variant is patched in as research.model.attention.xla_attention before the
config's training step is traced.

Measured 2026-12 (AMD EPYC, 2 cores, both busy with two training sweeps; baseline tiny, fp32):
attention fwd+bwd alone, CPU time per call, paired window ratios against `module`: head_major
0.80-0.85, vjp_rows 0.75-0.80, vjp_keys 0.73-0.76. The training step (16-60 rounds of 5-6
steps, `--step`): vjp_rows and vjp_keys 0.98-1.02 on two cores and on one; head_major 0.95-0.99
on two cores (medians of paired ratios; quartiles reach past 1.0), 0.99-1.00 on one. The step's
plain attention already has its operand copies fused into the RoPE fusions, and its dots, about
half the attention's cost, stay as they are. None reached the 3% of the step asked for adoption.
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from research import experiments, sharding
from research.model import attention as attention_lib

MODULE_ATTENTION = attention_lib.xla_attention  # before step_programs patches the module


def reference_attention(q, k, v, *, q_positions, k_positions, k_valid=None, causal=True,
                        mask=None):
  """The textbook formula at HIGHEST matmul precision: KV heads repeated, masked softmax."""
  b, t, h, d = q.shape
  k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision=hi).astype(jnp.float32) / math.sqrt(d)
  allowed = jnp.ones((1, 1, t, k.shape[1]), bool)
  if mask is not None:
    allowed = mask[:, None]
  elif causal:
    allowed = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
  if k_valid is not None:
    allowed = allowed & k_valid[:, None, None, :]
  p = jax.nn.softmax(jnp.where(allowed, s, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, precision=hi)


def _allowed(b, t, q_positions, k_positions, k_valid, causal, mask):
  """[b or 1, 1, t, s] bool (True: attend) or None, as xla_attention masks."""
  del b, t
  allowed = None
  if mask is not None:
    allowed = mask[:, None]
  elif causal:
    allowed = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
  if k_valid is not None:
    valid = k_valid[:, None, None, :]
    allowed = valid if allowed is None else allowed & valid
  return allowed


def _head_major(q, k, v):
  """q [b, t, h, d] -> [b, kv, g * t, d] (a KV head's group stacked along rows); k, v
  [b, s, kv, d] -> [b, kv, s, d]."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, h // kv * t, d)
  return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _from_head_major(out, t):
  b, kv, m, d = out.shape
  return out.reshape(b, kv, m // t, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * m // t, d)


def _dot(x, y, contract):
  """Batched over (b, kv), the leading axes: contract = (x's axis, y's axis) among 2, 3."""
  return jax.lax.dot_general(x, y, ((contract[:1], contract[1:]), ((0, 1), (0, 1))))


def _mask(x, allowed, groups, fill, keys_axis):
  """x [b, kv, g * t, s] (keys_axis 3) or [b, kv, s, g * t] (keys_axis 2) where `allowed`
  [b or 1, 1, t, s], `fill` elsewhere."""
  if allowed is None:
    return x
  b, kv = x.shape[:2]
  if keys_axis == 3:
    m, s = x.shape[2:]
    return jnp.where(allowed[:, :, None], x.reshape(b, kv, groups, m // groups, s),
                     fill).reshape(x.shape)
  s, m = x.shape[2:]
  return jnp.where(jnp.swapaxes(allowed, 2, 3)[:, :, :, None],
                   x.reshape(b, kv, s, groups, m // groups), fill).reshape(x.shape)


def head_major(q, k, v, *, q_positions, k_positions, k_valid=None, causal=True, mask=None):
  b, t, h, d = q.shape
  allowed = _allowed(b, t, q_positions, k_positions, k_valid, causal, mask)
  groups = h // k.shape[2]
  q, k, v = _head_major(q, k, v)
  scores = _dot(q, k, (3, 3)).astype(jnp.float32) / math.sqrt(d)
  scores = _mask(scores, allowed, groups, jnp.finfo(jnp.float32).min, 3)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return _from_head_major(_dot(probs, v, (3, 2)), t)


_CHUNK = 32  # XLA:CPU splits reductions over more elements into an unfused reduce-window


def _row_reduce(x, op):
  """op (jnp.max or jnp.sum) over the last axis, keepdims: per chunk of 32, then elementwise."""
  n = x.shape[-1]
  if n <= _CHUNK or n % _CHUNK or n // _CHUNK > 8:
    return op(x, axis=-1, keepdims=True)
  parts = op(x.reshape(*x.shape[:-1], n // _CHUNK, _CHUNK), axis=-1)
  combine = jnp.maximum if op is jnp.max else jnp.add
  out = parts[..., :1]
  for i in range(1, n // _CHUNK):
    out = combine(out, parts[..., i:i + 1])
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _vjp_attention(q, k, v, allowed, groups, keys_major):
  """q [b, kv, g * t, d], k, v [b, kv, s, d], allowed [b or 1, 1, t, s] or None."""
  return _vjp_attention_fwd(q, k, v, allowed, groups, keys_major)[0]


def _vjp_attention_fwd(q, k, v, allowed, groups, keys_major):
  scale, low = 1 / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min
  if keys_major:  # S^T [b, kv, s, m]
    scores = _mask(_dot(k, q, (3, 3)).astype(jnp.float32) * scale, allowed, groups, low, 2)
    e = jnp.exp(scores - jnp.max(scores, axis=2, keepdims=True))
    probs = e / jnp.sum(e, axis=2, keepdims=True)
    out_t = _dot(v, probs.astype(v.dtype), (2, 2))  # O^T [b, kv, d, m]
    return jnp.swapaxes(out_t, 2, 3), (q, k, v, allowed, probs, out_t)
  scores = _mask(_dot(q, k, (3, 3)).astype(jnp.float32) * scale, allowed, groups, low, 3)
  e = jnp.exp(scores - _row_reduce(scores, jnp.max))
  probs = e / _row_reduce(e, jnp.sum)
  out = _dot(probs.astype(v.dtype), v, (3, 2))
  return out, (q, k, v, allowed, probs, out)


def _vjp_attention_bwd(groups, keys_major, res, dout):
  q, k, v, allowed, probs, out = res
  scale = 1 / math.sqrt(q.shape[-1])
  f32 = jnp.float32
  if keys_major:  # probs = P^T [s, m], out = O^T [d, m]
    dout_t = jnp.swapaxes(dout, 2, 3)
    dv = _dot(probs.astype(v.dtype), dout, (3, 2))
    dprobs = _dot(v, dout_t, (3, 2)).astype(f32)
    delta = jnp.sum(dout_t.astype(f32) * out.astype(f32), axis=2, keepdims=True)  # rowsum(dO O)
    ds = _mask(probs * (dprobs - delta) * scale, allowed, groups, 0.0, 2).astype(q.dtype)
    return _dot(ds, k, (2, 2)), _dot(ds, q, (3, 2)), dv, None
  dv = _dot(probs.astype(v.dtype), dout, (2, 2))
  dprobs = _dot(dout, v, (3, 3)).astype(f32)
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  # masked scores are constants: no gradient, also in rows that attend to no key
  ds = _mask(probs * (dprobs - delta) * scale, allowed, groups, 0.0, 3).astype(q.dtype)
  return _dot(ds, k, (3, 2)), _dot(ds, q, (2, 2)), dv, None


_vjp_attention.defvjp(_vjp_attention_fwd, _vjp_attention_bwd)


def vjp_attention(q, k, v, *, q_positions, k_positions, k_valid=None, causal=True, mask=None,
                  keys_major=False):
  b, t, h, _ = q.shape
  allowed = _allowed(b, t, q_positions, k_positions, k_valid, causal, mask)
  out = _vjp_attention(*_head_major(q, k, v), allowed, h // k.shape[2], keys_major)
  return _from_head_major(out, t)


def elementwise(q, k, v, **_):
  """No attention at all (kv_heads = heads): the step's cost without it."""
  return q * k * v


VARIANTS = {"module": MODULE_ATTENTION, "head_major": head_major, "vjp_rows": vjp_attention,
            "vjp_keys": functools.partial(vjp_attention, keys_major=True),
            "elementwise": elementwise}


def check() -> None:
  """Every variant but elementwise against reference_attention, values and gradients (of
  <out, w> for a random w), on MHA / GQA, causal or not, padding (k_valid), decode-like
  queries at the end of a longer key sequence, an explicit mask, fp32 and bf16."""
  cases = [  # (name, b, t, s, h, kv, kwargs, dtype)
      ("mha causal", 2, 64, 64, 4, 4, {}, jnp.float32),
      ("gqa causal", 2, 16, 16, 4, 2, {}, jnp.float32),
      ("mqa not causal", 2, 8, 8, 4, 1, dict(causal=False), jnp.float32),
      ("gqa k_valid", 2, 8, 8, 6, 2, dict(k_valid=True), jnp.float32),
      ("decode-like", 2, 3, 40, 4, 2, dict(offset=37, k_valid=True), jnp.float32),
      ("explicit mask", 2, 8, 8, 4, 2, dict(mask=True), jnp.float32),
      ("mha causal bf16", 2, 64, 64, 4, 4, {}, jnp.bfloat16),
  ]
  for name, b, t, s, h, kv, kw, dtype in cases:
    ks = jax.random.split(jax.random.key(len(name)), 5)
    q = jax.random.normal(ks[0], (b, t, h, 8), dtype)
    k, v = (jax.random.normal(x, (b, s, kv, 8), dtype) for x in ks[1:3])
    w = jax.random.normal(ks[3], (b, t, h, 8), jnp.float32)
    offset = kw.pop("offset", 0)
    args = dict(q_positions=jnp.broadcast_to(offset + jnp.arange(t), (b, t)),
                k_positions=jnp.broadcast_to(jnp.arange(s), (b, s)), **kw)
    if kw.get("k_valid"):
      args["k_valid"] = jnp.arange(s)[None, :] < jnp.array([s, s - 3])[:, None]
    if kw.get("mask"):
      # every row attends to key 0 but row 2 of batch 0, which attends to no key
      allowed = jax.random.bernoulli(ks[4], 0.6, (b, t, s)).at[:, :, 0].set(True)
      args["mask"] = allowed.at[0, 2].set(False)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)

    def value_and_grads(fn, *qkv):
      f = lambda *x: jnp.sum(fn(*x, **args).astype(jnp.float32) * w)
      return fn(*qkv, **args), jax.grad(f, argnums=(0, 1, 2))(*qkv)

    want = value_and_grads(reference_attention, q, k, v)
    if dtype == jnp.bfloat16:  # the reference in fp32 on the same bf16 inputs
      want = value_and_grads(reference_attention, *(x.astype(jnp.float32) for x in (q, k, v)))
    for variant in ("module", "head_major", "vjp_rows", "vjp_keys"):
      got = value_and_grads(VARIANTS[variant], q, k, v)
      pairs = zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want))
      for label, x, y in pairs:
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   err_msg=f"{name}: {variant} {label}", **tol)
    print(f"ok  {name}")


def step_programs(spec: str, variants):
  """{variant: [step, state, batch, next_batch]}: the config's training step compiled with
  each attention as research.model.attention.xla_attention, each from a fresh build."""
  from research.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  config = experiments.get_config(spec, {})
  programs = {}
  try:
    for name in variants:
      attention_lib.xla_attention = VARIANTS[name]
      jax.clear_caches()  # retrace: the step's trace would otherwise be reused
      with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, tmp, log=lambda *_: None)
        r = trainer.build()
      with sharding.use_mesh(r.mesh):
        batch = trainer.put_batch(r, next(r.train_iter))
        step = r.step_fn.lower(r.state, batch).compile()
      next_batch = lambda trainer=trainer, r=r: trainer.put_batch(r, next(r.train_iter))
      programs[name] = [step, r.state, batch, next_batch]
  finally:
    attention_lib.xla_attention = MODULE_ATTENTION
  texts = [p[0].as_text() for p in programs.values()]
  assert len(set(texts)) == len(texts), "two variants compiled to the same program"
  return programs


def step_windows(args) -> dict:
  programs = step_programs(args.spec, args.variants)

  def window(p, n):
    step, state, batch, next_batch = p
    for _ in range(n):
      state, _ = step(state, batch)
      batch = next_batch()
    jax.block_until_ready(state)
    p[1], p[2] = state, batch

  for p in programs.values():
    window(p, 20)
  return {name: functools.partial(window, p, args.calls) for name, p in programs.items()}


def attention_windows(args) -> dict:
  b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k, v = (jax.random.normal(x, (b, t, kv, d)) for x in ks[1:3])
  w = jax.random.normal(ks[3], (b, t, h, d))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  inputs = (q, k, v, w, pos)

  def fwd_bwd(fn):
    def loss(q, k, v, w, pos):
      return jnp.sum(fn(q, k, v, q_positions=pos, k_positions=pos) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*inputs).compile()

  def window(f, n):
    for _ in range(n):
      out = f(*inputs)
    jax.block_until_ready(out)

  fns = {name: fwd_bwd(VARIANTS[name]) for name in args.variants}
  for f in fns.values():
    window(f, 20)
  return {name: functools.partial(window, f, args.calls) for name, f in fns.items()}


def alternate(windows: dict, rounds: int) -> dict:
  """{name: ([wall s], [CPU s])}, one entry per window: each round runs every variant's window
  once, the order reversed every other round."""
  names = list(windows)
  times = {name: ([], []) for name in names}
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      t0, c0 = time.perf_counter(), time.process_time()
      windows[name]()
      times[name][0].append(time.perf_counter() - t0)
      times[name][1].append(time.process_time() - c0)
  return times


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--check", action="store_true", help="compare the variants with the reference")
  p.add_argument("--step", action="store_true", help="time the training step of --spec")
  p.add_argument("--spec", default="baseline:scale=tiny")
  p.add_argument("--variants", nargs="+", default=["module", "vjp_keys"], choices=list(VARIANTS))
  p.add_argument("--calls", type=int, default=None,
                 help="calls per window (default 100 alone, 6 with --step)")
  p.add_argument("--windows", type=int, default=10, help="windows per variant")
  p.add_argument("--batch", type=int, default=12)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
  p.add_argument("--head-dim", dest="head_dim", type=int, default=32)
  args = p.parse_args()
  if args.check:
    check()
    return
  if args.calls is None:
    args.calls = 6 if args.step else 100
  times = alternate(step_windows(args) if args.step else attention_windows(args), args.windows)
  ref = args.variants[0]
  for i, clock in enumerate(("wall", "CPU")):
    print(f"{clock} ms per call:")
    per_call = {name: np.array(ts[i]) / args.calls * 1e3 for name, ts in times.items()}
    for name, ts in per_call.items():
      print(f"  {name:>12}: median {np.median(ts):.3f}  windows "
            + " ".join(f"{x:.2f}" for x in ts))
    for name in args.variants[1:]:
      paired = per_call[name] / per_call[ref]
      print(f"  {name} / {ref}: ratio of medians "
            f"{np.median(per_call[name]) / np.median(per_call[ref]):.3f}, paired window ratios: "
            f"median {np.median(paired):.3f}, quartiles {np.quantile(paired, 0.25):.3f}-"
            f"{np.quantile(paired, 0.75):.3f}")


if __name__ == "__main__":
  main()
