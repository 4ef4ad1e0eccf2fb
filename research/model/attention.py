"""Sequence-mixer family (`model.attention.kind`) and the attention op.

`dense` is softmax attention with RoPE, MHA or GQA (num_kv_heads < num_heads) and optional
norms inside (`model.attention.norms`, letters of "qkvc"): q, k and v are RMS-normalized per
head over head_dim with one gain shared by the heads, before RoPE (QK-norm, Dehghani et al.
2023; QKV-norm, HybridNorm eq. (4)); c normalizes the context (the heads' concatenated output)
over its full width before W_O (the C of HybridNorm Table 6, SDD's context norm).

The core op `attention` dispatches on `impl` (`resolve_impl`): `xla` is plain jnp (the
reference); `cpu` the compiled CPU kernel of kernels_cpu/attention (forward and backward, built
on first use); `pallas`, `pallas_gpu` and `pallas_tpu` the flash-attention kernels of
kernels_pallas/moda; `auto` (the default) the CPU kernel on CPU and jnp on GPU/TPU, where the
Pallas kernels stay opt-in until they pass tests/kernels on the device.
A forward's keys come from `sequence_keys`: its own k, v in training, a KV cache's contents
when decoding; sequence mixers built on `DenseAttention` reuse that path. At inference,
`model.attention.prefill = flexprefill` makes a prompt's prefill block-sparse (`attend`,
model/prefill.py); training and decode steps stay dense.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.model.linear import make_linear
from research.model import prefill as prefill_lib
from research.model.norms import RMSNorm
from research.model.option import Option
from research.model.registry import Registry
from research.sharding import constrain, current_mesh, logical_to_spec


class SequenceMixer(Option):
  """Base of `model.attention.kind` options: the block's sequence mixer, (x [b, t, d], ctx) ->
  [b, t, d]. Hooks: `flops_per_token(seq_len)` (every option); `impls`, the values of
  model.attention.impl it runs; `channel_writer(cfg, layer=, dtype=, rngs=)`, a module the
  block runs beside its channel mixer, reading what the channel mixer reads (MoDA's FFN-side
  K/V projection), or None."""

  HOOKS = ("flops_per_token", "impls", "channel_writer")
  impls: tuple[str, ...] = ("xla",)
  # norms inside the mixer: letters of "qkvc" ("qk" = QK-norm); a norm placement adds its own
  # (HybridNorm's QKV-norm) when the config is resolved
  defaults = dict(norms="")

  def flops_per_token(self, seq_len: int) -> float:
    raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")

  @staticmethod
  def channel_writer(cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    del cfg, layer, dtype, rngs
    return None


SEQUENCE_MIXERS = Registry("model.attention.kind", base=SequenceMixer, default="dense")
# xla: plain jnp; cpu: the compiled CPU kernel (kernels_cpu.attention); pallas*: the Pallas
# flash-attention kernel of kernels_pallas.moda (pallas: this backend's, interpreted on CPU);
# auto: resolve_impl
ATTENTION_IMPLS = ("auto", "xla", "cpu", "pallas", "pallas_gpu", "pallas_tpu")


class SequenceKeys(NamedTuple):
  """What a forward's queries attend over: k, v [b, s, kv_heads, d], their positions [b, s],
  an optional validity mask [b, s] (cache slots not yet written, padding), whether they
  come from a KV cache (then s may differ from the query length), and an optional explicit
  mask [b or 1, t, s] that replaces the causal mask from positions (token repetition,
  model.phd; positions are then unused)."""
  k: jax.Array
  v: jax.Array
  positions: jax.Array | None
  valid: jax.Array | None = None
  cached: bool = False
  mask: jax.Array | None = None


ATTENTION_NORMS = "qkvc"


def check_attention_norms(norms: str) -> str:
  bad = sorted(set(norms) - set(ATTENTION_NORMS))
  if bad:
    raise ConfigError(f"model.attention.norms='{norms}' has unknown letters {''.join(bad)} "
                     f"(letters of {ATTENTION_NORMS}: q, k, v, c = context before W_O)")
  return norms


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotate-half form (Su et al. 2021, eq. 34).

  x: [batch, seq, heads, head_dim]; positions: [batch, seq]. Pairs (i, i + head_dim/2) are
  rotated by the angle position * theta^(-2i/head_dim).
  """
  half = x.shape[-1] // 2
  # numpy positions (known when traced: a forward over whole windows) give sin/cos tables as
  # constants, computed here in fp32 like the traced path; XLA would otherwise recompute them
  # per element inside each rotation's fusion
  xp = np if isinstance(positions, np.ndarray) else jnp
  if xp is np and positions.strides[0] == 0:  # every row the same (positions_for): one row
    positions = positions[:1]
  freqs = theta ** (-xp.arange(half, dtype=np.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(np.float32)[:, :, None, None] * freqs[None, None, None, :]  # [b, s, 1, half]
  return _rotate(x.astype(jnp.float32), xp.sin(angles), xp.cos(angles)).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, sin, cos):
  """Rotates the pairs (x1, x2) = split(x) by the angles whose sin and cos are given.

  A rotation's transpose is the rotation by the opposite angle, so the backward is the same
  single fused pass with -sin; autodiff of the split/concatenate instead emits pads, adds and
  a concatenate per input (measured ~0.6 ms of the tiny training step's 56 ms).
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x, sin, cos):
  return _rotate(x, sin, cos), (sin, cos)


def _rotate_bwd(res, dy):
  sin, cos = res
  # The angles come from integer positions: their cotangents are never used.
  return _rotate(dy, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def causal_mask(q_positions, k_positions) -> jax.Array:
  """[b, 1, 1, t, s]: key position <= query position. Numpy positions (positions_for) are
  taken as traced arrays, so the mask is computed inside the scores' fusion rather than stored
  in the program as a [b, t, s] constant."""
  q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
  return k_positions[:, None, None, None, :] <= q_positions[:, None, None, :, None]


def xla_attention(q, k, v, *, q_positions, k_positions, k_valid=None, causal: bool = True,
                  mask=None):
  """softmax(q k^T / sqrt(d) + mask) v with GQA folding.

  q: [b, t, h, d]; k, v: [b, s, kv, d] with h = kv * g. Positions give the causal mask
  (key position <= query position), so offsets and decoding work unchanged; `k_valid` [b, s]
  masks keys out (unwritten cache slots, padding). An explicit `mask` [b or 1, t, s] (True:
  attend) replaces the causal one.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  elif causal:
    mask = causal_mask(q_positions, k_positions)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  if k_valid is not None:
    scores = jnp.where(k_valid[:, None, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The implementation `impl` names on `backend` (default: jax's): `auto` is `cpu` on CPU
  where the kernel builds (else `xla`, with a warning saying why, once) and `xla` on GPU/TPU;
  `cpu` off a CPU is an error that says so (where its kernel cannot be built, the first
  float32 call raises kernels_cpu.build.KernelBuildError)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention.impl='{impl}' is not available "
                     f"(available: {', '.join(ATTENTION_IMPLS)})")
  backend = backend or jax.default_backend()
  if impl == "auto":
    if backend != "cpu":
      return "xla"
    from kernels_cpu import attention as cpu_attention  # pylint: disable=import-outside-toplevel
    why = cpu_attention.unavailable()
    if why:
      _warn_once(f"model.attention.impl=auto runs the jnp attention: the CPU kernel is not "
                 f"available here ({why.splitlines()[0]})")
      return "xla"
    return "cpu"
  check_backend(impl, backend)
  return impl


def check_backend(impl: str, backend: str) -> None:
  """ConfigError when `impl` cannot run on `backend` (the CPU kernel off a CPU)."""
  if impl == "cpu" and backend != "cpu":
    raise ConfigError(f"model.attention.impl=cpu runs on CPU only (the backend is {backend}); "
                      f"use auto, xla or pallas")


@functools.cache
def _warn_once(message: str) -> None:
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def attention(q, k, v, *, q_positions, k_positions, k_valid=None, causal: bool = True,
              impl: str = "auto", mask=None):
  """The attention op. The kernels cover self-attention over the forward's own tokens (q and k
  of one length, positions increasing along each row; the CPU kernel in float32); attention
  over a cache, with a validity mask, with an explicit mask or outside a kernel's dtypes runs
  the jnp path whatever `impl` says."""
  impl = resolve_impl(impl)
  if impl == "cpu":
    from kernels_cpu import attention as cpu_attention  # pylint: disable=import-outside-toplevel
  kernel_covers = (k_valid is None and mask is None and q.shape[1] == k.shape[1] and
                   (impl != "cpu" or not cpu_attention.unsupported(q, k, v, causal=causal)))
  if impl == "xla" or not kernel_covers:
    return xla_attention(q, k, v, q_positions=q_positions, k_positions=k_positions,
                         k_valid=k_valid, causal=causal, mask=mask)
  if impl == "cpu":
    return _per_shard(functools.partial(cpu_attention.attention, causal=causal), q, k, v)
  from kernels_pallas.moda import flash_attention  # pylint: disable=import-outside-toplevel
  return flash_attention(q, k, v, causal=causal, impl=impl)


def _per_shard(op, q, k, v):
  """`op(q, k, v)` (per batch row and head, [b, t, heads, d]) on each device's shard of the
  current mesh: a custom call has no partitioning rule of its own, and XLA would gather its
  operands onto every device. Heads stay whole unless q's and k's both split."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return op(q, k, v)
  q_spec = logical_to_spec(("batch", "seq", "act_heads", None), q.shape, mesh)
  k_spec = logical_to_spec(("batch", "seq", "act_kv_heads", None), k.shape, mesh)
  if q_spec[2] != k_spec[2]:
    q_spec, k_spec = P(q_spec[0], None, None, None), P(k_spec[0], None, None, None)
  return jax.shard_map(op, mesh=mesh, in_specs=(q_spec, k_spec, k_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v)


@SEQUENCE_MIXERS.register("dense")
class DenseAttention(SequenceMixer):
  """Causal multi-head (or grouped-query) self-attention."""

  impls = ATTENTION_IMPLS  # values of model.attention.impl this mixer runs
  API = ("project_qkv", "sequence_keys", "attend", "project_out")  # the steps MoDA reuses
  defaults = dict(impl="auto", rope_theta=10000.0)

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    a = cfg.attention
    if a.impl not in self.impls:
      raise ConfigError(f"model.attention.impl='{a.impl}' is not available "
                        f"(available: {', '.join(self.impls)})")
    check_backend(a.impl, jax.default_backend())
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.theta, self.impl = a.rope_theta, a.impl
    self.layer = layer  # names this layer's KV-cache entries
    self.prefill = prefill_lib.prefill_settings(a)  # inference prefill: dense | flexprefill
    d, hd, kvd = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.d_model = d
    lin = dict(layer=layer, dtype=dtype, rngs=rngs)
    self.q = make_linear(cfg, d, hd, axes=("embed", "heads"), role="in", **lin)
    self.k = make_linear(cfg, d, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    self.v = make_linear(cfg, d, kvd, axes=("embed", "kv_heads"), role="in", **lin)
    self.o = make_linear(cfg, hd, d, axes=("heads", "embed"), role="out", **lin)
    norms = check_attention_norms(a.norms)

    def norm(letter, dim):
      return RMSNorm(dim, eps=cfg.norm_eps, dtype=dtype) if letter in norms else None

    self.q_norm, self.k_norm, self.v_norm = (norm(x, cfg.head_dim) for x in "qkv")
    self.c_norm = norm("c", hd)

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    q, k, v = self.project_qkv(x, ctx)
    keys = self.sequence_keys(k, v, ctx)
    out = self.attend(q, keys, ctx)
    return self.project_out(out)

  # The steps of __call__, shared with the sequence mixers built on this one (MoDA).
  def project_qkv(self, x: jax.Array, ctx):
    """q [b, t, heads, d], k and v [b, t, kv_heads, d]: projected, normed, q and k rotated."""
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = constrain(q, ("batch", "seq", "act_heads", None))
    k = constrain(k, ("batch", "seq", "act_kv_heads", None))
    q, k, v = (x if n is None else n(x) for x, n in ((q, self.q_norm), (k, self.k_norm),
                                                     (v, self.v_norm)))
    return rope(q, ctx.positions, self.theta), rope(k, ctx.positions, self.theta), v

  def sequence_keys(self, k: jax.Array, v: jax.Array, ctx) -> "SequenceKeys":
    """The keys/values this forward's queries attend over (the KV-cache protocol).

    Training (`ctx.cache` None): the forward's own k, v at ctx.positions. Inference: k and v
    (post-norm, post-RoPE) are appended to this layer's cache entries `layer<i>/k`, `layer<i>/v`
    at each row's offset and `ctx.cache` is replaced by the updated cache; a prefill into an
    empty cache still attends over its own k, v (the cache holds nothing else), later forwards
    over the whole cache [b, max_len, kv_heads, d] with slot positions and validity
    (cached=True). Mixers with more per-token state add entries with `ctx.cache.append`.
    Under token repetition (`ctx.phd`, model.phd) the layout gives the keys and their mask.
    """
    if ctx.phd is not None:
      k, v = ctx.phd.keys(self.layer, k, v, ctx)
      return SequenceKeys(k=k, v=v, positions=None, cached=ctx.cache is not None,
                          mask=ctx.phd.mask)
    if ctx.cache is None:
      return SequenceKeys(k=k, v=v, positions=ctx.positions)
    cache, k_all = ctx.cache.append(f"layer{self.layer}/k", k)
    cache, v_all = cache.append(f"layer{self.layer}/v", v)
    ctx.cache = cache
    if cache.prefill:
      return SequenceKeys(k=k, v=v, positions=ctx.positions)
    positions, valid = cache.key_positions(k.shape[1])
    return SequenceKeys(k=k_all, v=v_all, positions=positions, valid=valid, cached=True)

  def attend(self, q: jax.Array, keys: "SequenceKeys", ctx) -> jax.Array:
    """The attention op over `keys`: FlexPrefill for a prompt's prefill when
    `model.attention.prefill = flexprefill` (its selection statistics are recorded in the
    cache), dense otherwise (training, decode steps, continuations over a cache)."""
    if self.prefill.kind == "flexprefill" and ctx.cache is not None and ctx.cache.prefill:
      out, stats = prefill_lib.flexprefill(q, keys.k, keys.v, self.prefill)
      for name, value in stats.items():
        ctx.cache = ctx.cache.record(f"flexprefill/{name}/layer{self.layer}", value)
      return out
    return attention(q, keys.k, keys.v, q_positions=ctx.positions, k_positions=keys.positions,
                     k_valid=keys.valid, impl=self.impl, mask=keys.mask)

  def project_out(self, out: jax.Array) -> jax.Array:
    """[b, t, heads, d] attention output -> [b, t, d_model] (context norm, then W_O)."""
    b, t = out.shape[:2]
    out = out.reshape(b, t, self.num_heads * self.head_dim)
    if self.c_norm is not None:
      out = self.c_norm(out)
    return self.o(out)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: projections plus q k^T and p v over the causal average
    of (seq_len + 1) / 2 keys."""
    hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    d = self.d_model
    proj = 2 * d * (2 * hd + 2 * kvd)
    core = 2 * 2 * hd * (seq_len + 1) / 2
    return proj + core
