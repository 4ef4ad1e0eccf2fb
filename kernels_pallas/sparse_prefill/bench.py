"""Prefill attention time: dense flash attention vs FlexPrefill, on the device this runs on.

  python -m kernels_pallas.sparse_prefill.bench            # T in {8K, 32K, 128K} as memory allows
  python -m kernels_pallas.sparse_prefill.bench --quick    # tiny sizes; on CPU the kernels run
                                                           # in interpret mode (not a speed figure)

Rows per T: dense causal attention by cuDNN (jax.nn.dot_product_attention forced to
implementation="cudnn", the baseline every speed-up is taken against) and by XLA (our fp32
reference, which materialises [T, T] logits), the block-sparse kernel with every causal block
listed (same backend, the "dense" point of our kernel), the estimate step in fused XLA vs the
Pallas estimate kernel, and FlexPrefill at gamma in {0.8, 0.9, 0.95, 0.99}: measured density
(fraction of causal blocks), the kernel time alone, selection + kernel, and the speed-ups over
the baseline. Where cuDNN cannot run (not an NVIDIA GPU, fp32) the first dense row that ran is
the baseline, and the table says which. A row that cannot run here (logits that would not fit,
out of memory, an unsupported configuration) says why, and the bench goes on.

Inputs are structured, because random q, k give near-uniform attention and the gamma cover then
selects almost every block (see structured_qkv). Timing: one warm-up call (compilation), then
the median of --reps calls, each ended by block_until_ready.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import statistics
import time

import jax
import jax.numpy as jnp

from kernels_pallas import sparse_prefill as sp
from kernels_pallas.bench_notes import unavailable
from kernels_pallas.sparse_prefill import gpu, reference

GAMMAS = (0.8, 0.9, 0.95, 0.99)
# structured_qkv settings by name. "long": calibrated on a CPU (--density_only) so that gamma 0.9
# keeps ~16% of the causal blocks at 64K (84% sparse, between the 75% and 95% random sparsity the
# official kernel benchmark times), where the defaults keep ~86%: every head scaled at least
# 0.8, a sink of +16 and heavy-hitter columns of +10, and little noise. See the README.
STRUCTURES = {"default": {},
              "long": dict(noise=0.3, sink=16.0, vertical=10.0, min_head_scale=0.8)}


def structured_qkv(key, batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int,
                   dtype=jnp.bfloat16, *, local: float = 6.0, sink: float = 8.0,
                   vertical: float = 6.0, n_vertical: int = 4, noise: float = 1.0,
                   min_head_scale: float = 0.4):
  """q [B, T, Hq, d], k, v [B, T, Hk, d] whose attention has sink, vertical and slash structure.

  Logits q.k / sqrt(d) are built from four parts on disjoint coordinates:
    local:    F = d / 8 rotary pairs at frequencies 2^-1 ... 2^-8 give sum_f cos(w_f (t - s)),
              peaked at t = s with height `local` and decaying over a few hundred tokens
              (the slash / local-window pattern);
    sink:     one coordinate where key 0 and every query meet with logit `sink`;
    vertical: `n_vertical` random key positions per KV head sharing one coordinate with every
              query, logit `vertical` (heavy-hitter columns);
    noise:    the remaining coordinates N(0, noise^2), logit noise of std ~ noise^2.
  Each query head scales its parts by its own factors in [min_head_scale, 1.2] so heads differ
  (a weakly scaled head attends almost uniformly at long T).
  """
  b, t, hq, hk, d = batch, seq_len, q_heads, kv_heads, head_dim
  if d < 32:
    raise ValueError(f"structured_qkv needs head_dim >= 32, got {d}")
  f = d // 8
  kq, kk, kv, kpos, kscale = jax.random.split(key, 5)
  root_d = math.sqrt(d)
  pos = jnp.arange(t, dtype=jnp.float32)
  freqs = 2.0 ** -jnp.linspace(1.0, 8.0, f)
  ang = pos[:, None] * freqs[None, :]  # [T, F]
  alpha = math.sqrt(local * root_d / f)
  rot = alpha * jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)  # [T, 2F]
  beta = math.sqrt(sink * root_d)
  gam = math.sqrt(vertical * root_d)
  rest = d - 2 * f - 2
  q_noise = noise * jax.random.normal(kq, (b, t, hq, rest))
  k_noise = noise * jax.random.normal(kk, (b, t, hk, rest))
  scale = jax.random.uniform(kscale, (hq, 3), minval=min_head_scale, maxval=1.2)  # [Hq, 3]
  # Queries: [rot * s_local, beta * s_sink, gam * s_vert, noise].
  q_rot = rot[None, :, None, :] * scale[None, None, :, 0:1]
  q_sink = jnp.broadcast_to(beta * scale[None, None, :, 1:2], (b, t, hq, 1))
  q_vert = jnp.broadcast_to(gam * scale[None, None, :, 2:3], (b, t, hq, 1))
  q = jnp.concatenate([jnp.broadcast_to(q_rot, (b, t, hq, 2 * f)), q_sink, q_vert, q_noise], -1)
  # Keys: [rot, beta at t = 0, gam at the vertical positions, noise].
  k_rot = jnp.broadcast_to(rot[None, :, None, :], (b, t, hk, 2 * f))
  k_sink = jnp.broadcast_to((pos == 0).astype(jnp.float32)[None, :, None, None] * beta,
                            (b, t, hk, 1))
  vpos = jax.random.randint(kpos, (hk, n_vertical), 1, t)
  is_vert = jnp.any(pos[:, None, None] == vpos[None, :, :].astype(jnp.float32), axis=-1)
  k_vert = jnp.broadcast_to(is_vert.astype(jnp.float32)[None, :, :, None] * gam, (b, t, hk, 1))
  k = jnp.concatenate([k_rot, k_sink, k_vert, k_noise], -1)
  v = jax.random.normal(kv, (b, t, hk, d))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def time_ms(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # warm-up and compilation
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def causal_flops(b: int, t: int, hq: int, d: int, density: float = 1.0) -> float:
  """2 matmuls of 2 * T * T * d / 2 (causal half) per head, times the computed fraction."""
  return 4.0 * b * hq * t * t * d / 2 * density


def random_causal_selection(key, batch: int, heads: int, seq_len: int, block_size: int,
                            density: float):
  """(indices, counts) of random causal block sets, as the official kernel benchmark times the
  kernel: each causal block is kept with probability `density`, the diagonal and column 0
  always, so the measured density is a little above `density` at short T."""
  nb = -(-seq_len // block_size)
  causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
  always = jnp.eye(nb, dtype=bool) | (jnp.arange(nb) == 0)[None, :]

  def one(key):  # [nb, nb] for one (batch, head)
    return reference.mask_to_indices(causal & ((jax.random.uniform(key, (nb, nb)) < density)
                                               | always))

  indices, counts = jax.jit(jax.vmap(one))(jax.random.split(key, batch * heads))
  return (indices.reshape(batch, heads, nb, nb), counts.reshape(batch, heads, nb))


def selection_densities(seq_lens, *, gammas=GAMMAS, batch=1, q_heads=32, kv_heads=8,
                        head_dim=128, block_size=128, min_budget=1024, tau=0.1,
                        dtype=jnp.bfloat16, structure=None):
  """Markdown rows of FlexPrefill's measured density on structured_qkv inputs (`structure`: its
  keyword arguments), without timing anything: the selection is a few [bs, T] products, so
  this runs at 64K-128K on a CPU and is how the inputs are calibrated to a target sparsity."""
  structure = structure or {}
  lines = ["| T | gamma | density | query-aware heads | inputs |", "|---|---|---|---|---|"]
  make = jax.jit(functools.partial(structured_qkv, **structure), static_argnums=(1, 2, 3, 4, 5, 6))
  for t in seq_lens:
    q, k, _ = make(jax.random.PRNGKey(t), batch, t, q_heads, kv_heads, head_dim, dtype)
    for gamma in gammas:
      sel = jax.jit(lambda q, k, gamma=gamma: sp.select_blocks(
          q, k, gamma=gamma, tau=tau, block_size=block_size, min_budget=min_budget))(q, k)
      qa = float(jnp.mean(sel.pattern.astype(jnp.float32)))
      lines.append(f"| {t} | {gamma} | {float(sel.density()):.3f} | {qa:.2f} | "
                   f"{structure or 'defaults'} |")
  return lines


def run(seq_lens, *, batch=1, q_heads=32, kv_heads=8, head_dim=128, block_size=128,
        min_budget=1024, tau=0.1, reps=5, dtype=jnp.bfloat16, impl="auto", kernel_tag="",
        gammas=GAMMAS, ref_budget_bytes=16 * 2**30, random_densities=(0.25, 0.05),
        structure=None):
  """Returns Markdown table rows (strings) for each sequence length."""
  lines = ["| T | impl | density | ms | TFLOP/s (effective dense) | speed-up vs baseline | note |",
           "|---|---|---|---|---|---|---|"]
  for t in seq_lens:
    q, k, v = structured_qkv(jax.random.PRNGKey(t), batch, t, q_heads, kv_heads, head_dim, dtype,
                             **(structure or {}))
    dense_flops = causal_flops(batch, t, q_heads, head_dim)
    base = {}  # the baseline's name and ms, once a dense row has run

    def row(name, ms, density, note=""):
      if ms is None:
        lines.append(f"| {t} | {name} | {density:.3f} | | | | {note} |")
        return
      tf = dense_flops / (ms * 1e-3) / 1e12
      ratio = f"{base['ms'] / ms:.2f}x" if base and base["name"] != name else ""
      lines.append(f"| {t} | {name} | {density:.3f} | {ms:.2f} | {tf:.1f} | {ratio} | {note} |")

    def timed(fn, *args):
      """(ms, None), or (None, why it cannot run)."""
      try:
        return time_ms(fn, *args, reps=reps), None
      except Exception as e:  # pylint: disable=broad-except  (OOM, unsupported, no cuDNN)
        return None, unavailable(e)

    logits = 4.0 * batch * q_heads * t * t * 2  # fp32 logits and probabilities
    for name, dense_impl in (("dense cuDNN flash attention", "cudnn"),
                             ("dense XLA reference", "xla")):
      if dense_impl == "xla" and logits > ref_budget_bytes:
        row(name, None, 1.0, f"skipped: its [T, T] logits need ~{logits / 2**30:.0f} GiB "
                             f"(budget {ref_budget_bytes / 2**30:.0f} GiB)")
        continue
      fn = jax.jit(lambda q, k, v, i=dense_impl: sp.dense_causal_attention(q, k, v, impl=i))
      ms, why = timed(fn, q, k, v)
      if ms is not None and not base:
        base.update(name=name, ms=ms)
        why = "baseline"
      row(name, ms, 1.0, why or "")

    idx_all, cnt_all = reference.full_causal_selection(batch, q_heads, t, block_size)
    sparse_fn = jax.jit(lambda q, k, v, i, c: sp.block_sparse_attention(
        q, k, v, i, c, block_size=block_size, impl=impl))
    ms, why = timed(sparse_fn, q, k, v, idx_all, cnt_all)
    row(f"block-sparse kernel, all blocks{kernel_tag}", ms, 1.0, why or "")
    for target in random_densities:
      idx, cnt = random_causal_selection(jax.random.PRNGKey(1), batch, q_heads, t, block_size,
                                         target)
      density = float(reference.BlockSelection.density_of(cnt))
      ms, why = timed(sparse_fn, q, k, v, idx, cnt)
      row(f"block-sparse kernel, random blocks at {1 - target:.0%} sparsity{kernel_tag}", ms,
          density, why or "")

    est_xla = jax.jit(lambda q, k: reference.estimate_scores(q, k, block_size=block_size))
    scale = 1.0 / math.sqrt(head_dim)
    est_pl = jax.jit(lambda q, k: gpu.estimate_scores(
        q, k, block_size=block_size, sm_scale=scale, interpret=jax.default_backend() != "gpu"))
    (ms_xla, why_xla), (ms_pl, why_pl) = timed(est_xla, q, k), timed(est_pl, q, k)
    show = lambda ms, why: why if ms is None else f"{ms:.2f} ms"
    lines.append(f"| {t} | estimate step: xla {show(ms_xla, why_xla)}, pallas{kernel_tag} "
                 f"{show(ms_pl, why_pl)} | | | | | |")

    for gamma in gammas:
      def select(q, k, gamma=gamma):
        return sp.select_blocks(q, k, gamma=gamma, tau=tau, block_size=block_size,
                                min_budget=min_budget)
      select_fn = jax.jit(select)
      try:
        sel = select_fn(q, k)
      except Exception as e:  # pylint: disable=broad-except
        row(f"flexprefill gamma={gamma}", None, 0.0, unavailable(e))
        continue
      density = float(sel.density())
      ms_sel, why_sel = timed(select_fn, q, k)
      ms_attn, why_attn = timed(sparse_fn, q, k, v, sel.indices, sel.counts)
      qa = float(jnp.mean(sel.pattern.astype(jnp.float32)))
      row(f"flexprefill gamma={gamma} kernel only{kernel_tag}", ms_attn, density, why_attn or "")
      both = None if ms_sel is None or ms_attn is None else ms_sel + ms_attn
      row(f"flexprefill gamma={gamma} selection+kernel (select "
          f"{show(ms_sel, why_sel)}, query-aware heads {qa:.2f})", both, density,
          why_sel or why_attn or "")
    if base:
      lines.append(f"| {t} | baseline of the speed-ups: {base['name']} | | | | | |")
  return lines


def parse_structure(spec: str) -> dict:
  """--structure: a name of STRUCTURES, or comma-separated key=value settings of structured_qkv
  (its keyword-only arguments, each read as the type of its default)."""
  if spec in STRUCTURES:
    return dict(STRUCTURES[spec])
  settings = {name: p.default for name, p in inspect.signature(structured_qkv).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  out = {}
  for item in filter(None, spec.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in settings:
      raise SystemExit(f"--structure: '{item}' is not a preset ({', '.join(STRUCTURES)}) nor "
                       f"key=value with a key of {', '.join(settings)}")
    out[key] = type(settings[key])(value)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  parser.add_argument("--seq-lens", type=str, default="8192,32768,131072")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--gammas", type=str, default=",".join(map(str, GAMMAS)))
  parser.add_argument("--ref_budget_gib", type=float, default=16.0,
                      help="the XLA dense row is skipped where its logits need more than this")
  parser.add_argument("--random_densities", type=str, default="0.25,0.05",
                      help="densities of the random block sets the kernel is also timed on "
                           "(the official benchmark's 75%% and 95%% sparsity); '' for none")
  parser.add_argument("--structure", type=str, default="default",
                      help=f"structured_qkv's settings: one of {', '.join(STRUCTURES)}, or "
                           "keyword values such as 'sink=12,vertical=8,noise=0.5'")
  parser.add_argument("--density_only", action="store_true",
                      help="print the selection's density on the structured inputs, no timing "
                           "(runs at 64K-128K on a CPU)")
  args = parser.parse_args(argv)
  gammas = tuple(float(g) for g in args.gammas.split(","))
  randoms = tuple(float(x) for x in args.random_densities.split(",") if x)
  structure = parse_structure(args.structure)
  if args.density_only:
    seqs = [256] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    small = dict(q_heads=2, kv_heads=1, head_dim=32, block_size=32, min_budget=32,
                 dtype=jnp.float32) if args.quick else {}
    lines = selection_densities(seqs, gammas=gammas, structure=structure, **small)
    print("\n".join(lines))
    return lines
  backend = jax.default_backend()
  print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}")
  if args.quick:
    lines = run([256], batch=1, q_heads=2, kv_heads=1, head_dim=32, block_size=32,
                min_budget=32, reps=1, dtype=jnp.float32, impl="pallas",
                kernel_tag=" (interpret)" if backend == "cpu" else "", gammas=gammas,
                ref_budget_bytes=args.ref_budget_gib * 2**30, random_densities=randoms,
                structure=structure)
  else:
    lines = run([int(s) for s in args.seq_lens.split(",")], reps=args.reps, gammas=gammas,
                ref_budget_bytes=args.ref_budget_gib * 2**30, random_densities=randoms,
                structure=structure)
  print("\n".join(lines))
  return lines


if __name__ == "__main__":
  main()
