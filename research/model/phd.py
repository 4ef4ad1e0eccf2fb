"""Token repetition in pretraining: the PHD-Transformer (Wu et al. 2025, "Efficient Pretraining
Length Scaling", arXiv:2504.14992), `model.phd`.

Each input token x_n is run K times (copies s = 1..K, one embedding, §3 "sequence layout");
copy 1 is the *original*, copies 2..K are *hidden decoding tokens*, and only the final copy
x_n^K predicts x_(n+1) (§3 "loss"), so the decoder returns one logit row per original token and
the trainer's loss is unchanged. The kinds differ in what a copy may attend (the mask, §3 and
the digest's §4; query copy j of position n, key copy i of position m, copies from 1):

  none   no repetition (the default); `repeats = 1` is the same
  naive  every earlier copy: causal attention over the repeated sequence (Fig. 1)
  phd    (i = 1 and m < n) or (m = n and i <= j): earlier originals, and this position's
         copies up to j. The original stream is a plain causal Transformer, and the KV cache
         holds originals only (vanilla size)
  swa    phd, plus a hidden query sees the hidden keys of earlier positions within a window of
         W: `window_unit = tokens` (default), rank(n, j) - rank(m, i) <= W with hidden tokens
         ranked in sequence order, rank(n, j) = n (K - 1) + j - 2 ("the W most recent preceding
         hidden decoding tokens"); `positions`, n - m <= W (all copies of W positions)
  cswa   swa within chunks of C positions only: m // C = n // C

Settings (`model.phd.*`, dropped from a run's config when kind = none): repeats K, positions
(`same`: every copy at RoPE position n, the digest's inference; `flat`: n K + s - 1, positions
of the repeated sequence), window W and window_unit (swa, cswa), chunk C (cswa).

Layout. A forward lays its tokens out as [originals ; hidden copies], the hidden copies in
sequence order (position-major): the paper's rearrangement (§3 "kernel layout"), equivalent to
the interleaved x_1^1 .. x_1^K x_2^1 .. because attention sees only the mask and RoPE the
explicit positions. The mask is built here from each token's (position, copy) and travels to
attention in the forward context (`ctx.phd`, a `Layout`); a dense jnp mask, fine at the tiny
scale (the digest's §4), so the attention impl is the jnp path.

Inference (research/infer): the persistent KV cache (`layer<i>/k`, `layer<i>/v`) holds the
originals only, one slot per position as in the plain model; a decode step runs the K copies of
the new token, copy 1 writing its slot. swa / cswa also keep, per layer, the hidden K/V of the
last B hidden tokens (B = W, or W (K - 1) for window_unit = positions; cswa: at most its
chunk's (C - 1)(K - 1)) as cache states `layer<i>/hidden_k`, `layer<i>/hidden_v`: O(W),
constant in the context. Prefill cost: phd computes the originals and the K - 1 copies of the
last prompt token (about vanilla); swa every copy of every prompt token (K x: the hidden tokens
depend on each other); cswa the originals and the copies of the last prompt token's chunk
(vanilla + (K - 1) C at most). `naive` needs every copy's K/V (K x the cache) and has no
inference path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from research.errors import ConfigError
from research.model.registry import Switch

KINDS = ("none", "naive", "phd", "swa", "cswa")
POSITIONS = ("same", "flat")
WINDOW_UNITS = ("tokens", "positions")
_COPIES = dict(repeats=2, positions="same")
_WINDOW = dict(window=16, window_unit="tokens")
# The switch as the run config sees it: model.phd.kind selects a kind; each reads its settings.
SWITCH = Switch("model.phd.kind", "none", {
    "none": {}, "naive": _COPIES, "phd": _COPIES, "swa": {**_COPIES, **_WINDOW},
    "cswa": {**_COPIES, **_WINDOW, "chunk": 32}})


@dataclasses.dataclass(frozen=True)
class Settings:
  """The resolved `model.phd` (hashable: static module data)."""
  kind: str = "none"
  repeats: int = 1
  positions: str = "same"
  window: int = 0
  window_unit: str = "tokens"
  chunk: int = 0

  @property
  def active(self) -> bool:
    return self.kind != "none" and self.repeats > 1

  @property
  def copies(self) -> int:
    """Copies of each token a forward runs (1 when off)."""
    return self.repeats if self.active else 1

  @property
  def buffer(self) -> int:
    """B: the hidden tokens of earlier positions a decode step may see (swa, cswa), kept per
    layer in the KV cache; 0 for phd. Within chunks at most C - 1 earlier positions are seen."""
    if self.kind not in ("swa", "cswa"):
      return 0
    km1 = self.repeats - 1
    if self.window_unit == "tokens":
      return min(self.window, (self.chunk - 1) * km1) if self.kind == "cswa" else self.window
    return (min(self.window, self.chunk - 1) if self.kind == "cswa" else self.window) * km1


def settings(m) -> Settings:
  """Reads and checks `model.phd` of config.model `m`; bad values and combinations the
  repeated layout does not support raise ConfigError naming the key. A config without the
  section (stored before it existed) reads as none."""
  section = m.get("phd", None) or {}
  kind = section.get("kind", "none")
  if kind not in KINDS:
    raise ConfigError(f"model.phd.kind='{kind}' is not one of {', '.join(KINDS)}")
  values = {k: section.get(k, v) for k, v in SWITCH.settings[kind].items()}
  s = Settings(kind=kind, **values)
  if kind == "none":
    return s
  if not isinstance(s.repeats, int) or s.repeats < 1:
    raise ConfigError(f"model.phd.repeats={s.repeats!r} must be an integer >= 1 (copies of "
                      f"each token; 1 = no repetition)")
  if s.positions not in POSITIONS:
    raise ConfigError(f"model.phd.positions='{s.positions}' is not one of "
                      f"{', '.join(POSITIONS)}")
  if kind in ("swa", "cswa"):
    if s.window < 1:
      raise ConfigError(f"model.phd.window={s.window} must be >= 1 (hidden tokens, or "
                        f"positions, the sliding window reaches back)")
    if s.window_unit not in WINDOW_UNITS:
      raise ConfigError(f"model.phd.window_unit='{s.window_unit}' is not one of "
                        f"{', '.join(WINDOW_UNITS)}")
  if kind == "cswa" and s.chunk < 1:
    raise ConfigError(f"model.phd.chunk={s.chunk} must be >= 1 (positions per chunk)")
  if s.active:
    _check_combination(m, kind)
  return s


def _check_combination(m, kind: str) -> None:
  why = None
  if m.attention.kind != "dense":
    why = (f"model.attention.kind={m.attention.kind}: the repeated layout's mask is applied "
           f"by dense attention only")
  elif m.attention.get("impl", "xla") in ("pallas", "pallas_gpu", "pallas_tpu"):
    why = (f"model.attention.impl={m.attention.impl}: the flash kernels take no explicit mask; "
           f"set model.attention.impl=xla (or auto, which runs the jnp path with a mask)")
  elif m.attention.get("prefill", "dense") != "dense":
    why = f"model.attention.prefill={m.attention.prefill}: the prefill is the layout's own"
  elif m.head.kind == "mtp":
    why = "model.head.kind=mtp: its extra block would attend over the final copies only"
  if why:
    raise ConfigError(f"model.phd.kind={kind} cannot run with {why}")


_NO_CACHE = ("model.phd.kind=naive has no KV-cache path (every copy writes K/V later tokens "
             "see: K x the cache); the engine serves phd, swa and cswa")


def check_inference(m) -> None:
  """The engine's check: naive repetition has no cached path."""
  s = settings(m)
  if s.active and s.kind == "naive":
    raise ConfigError(_NO_CACHE)


def allowed(s: Settings, qn, qj, kn, ki):
  """Whether query copy qj of position qn may attend key copy ki of position kn (copies count
  from 1; numpy or jax arrays, broadcast against each other). §3 "PHD attention mask"."""
  same = (kn == qn) & (ki <= qj)  # this position's copies up to the query's own
  if s.kind == "naive":
    return (kn < qn) | same  # causal over the repeated sequence (Fig. 1)
  ok = ((ki == 1) & (kn < qn)) | same  # earlier originals only: the KV cache stays vanilla
  if s.kind in ("swa", "cswa"):  # and earlier hidden tokens within the window (§3 PHD-SWA)
    if s.window_unit == "tokens":
      km1 = s.repeats - 1
      near = (qn * km1 + qj) - (kn * km1 + ki) <= s.window  # rank difference
    else:
      near = qn - kn <= s.window
    if s.kind == "cswa":  # within the query's chunk (§3 PHD-CSWA)
      near = near & (kn // s.chunk == qn // s.chunk)
    ok = ok | ((qj >= 2) & (ki >= 2) & (kn < qn) & near)
  return ok


def keys_per_token(s: Settings, seq_len: int) -> float:
  """Keys the mask lets the K copies of an original token attend, summed over the copies and
  averaged over a window of seq_len positions (closed form; equals mask.sum() / seq_len)."""
  t, k = seq_len, s.repeats
  if s.kind == "naive":
    return k * (k * t + 1) / 2
  n = np.arange(t, dtype=np.float64)
  total = t * (t + 1) / 2  # originals: n + 1 keys each
  km1 = k - 1
  for j in range(2, k + 1):
    total += float(np.sum(n + j))  # n earlier originals + copies 1..j of its own position
    if s.kind in ("swa", "cswa"):  # earlier hidden tokens, from rank `low` to n (K - 1) - 1
      if s.window_unit == "tokens":
        low = np.maximum(0, n * km1 + j - 2 - s.window)
      else:
        low = np.maximum(0, n - s.window) * km1
      if s.kind == "cswa":
        low = np.maximum(low, (n // s.chunk) * s.chunk * km1)
      total += float(np.sum(np.maximum(0, n * km1 - low)))
  return total / t


def rope_positions(s: Settings, positions, copies):
  """RoPE positions of copies of tokens at `positions`: the same (`same`) or those of the
  repeated sequence (`flat`: n K + s - 1)."""
  if s.positions == "same":
    return positions
  return positions * s.repeats + (copies - 1)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, n, ...] at index [b or 1, k] along axis 1 -> [b, k, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@dataclasses.dataclass
class Layout:
  """One forward's repeated layout [originals ; hidden copies] (module docstring): what the
  decoder gathers and what attention reads, built once per forward by `layout`."""
  index: jax.Array  # [b or 1, n]: the forward's token each laid-out token is a copy of
  positions: jax.Array  # [b, n] RoPE positions
  mask: jax.Array  # [b or 1, n, s] bool: query may attend key (the keys `keys` returns)
  final: jax.Array  # [b or 1, k]: laid-out index of the final copy of each output position
  originals: int  # the leading t originals: only they write the persistent KV cache
  buffer: int = 0  # B: hidden tokens kept per layer for the sliding window (inference)
  keep: jax.Array | None = None  # [b, B]: what [old buffer ; new hidden] the next buffer keeps

  def expand(self, h: jax.Array) -> jax.Array:
    """The forward's embeddings [b, t, ...] -> every copy's [b, n, ...] (one embedding)."""
    return _gather(h, self.index)

  def outputs(self, x: jax.Array) -> jax.Array:
    """The final copies of the output positions [b, k, ...] (§3: they carry the loss)."""
    return _gather(x, self.final)

  def keys(self, layer: int, k: jax.Array, v: jax.Array, ctx) -> tuple[jax.Array, jax.Array]:
    """The keys and values this forward's queries attend, in the order of the mask's keys.

    Training: the forward's own. Inference: the originals' k, v [b, t, kv, d] are appended to
    the persistent cache (`layer<i>/k`, `layer<i>/v`, as the plain model's); the keys are
    [cached originals ; the window's hidden buffer (swa, cswa) ; this forward's hidden
    copies], and the buffer is replaced by the last B hidden tokens (`keep`)."""
    if ctx.cache is None:
      return k, v
    t = self.originals
    cache, k_orig = ctx.cache.append(f"layer{layer}/k", k[:, :t])
    cache, v_orig = cache.append(f"layer{layer}/v", v[:, :t])
    if cache.prefill:  # the cache holds this prompt only: its own keys
      k_orig, v_orig = k[:, :t], v[:, :t]
    keys, values = [k_orig], [v_orig]
    if self.buffer:
      old = []
      for name, x in ((f"layer{layer}/hidden_k", k), (f"layer{layer}/hidden_v", v)):
        buf = cache.state(name)
        if buf is None:
          buf = jnp.zeros((x.shape[0], self.buffer) + x.shape[2:], x.dtype)
        old.append(buf)
        cache = cache.set_state(name, _gather(jnp.concatenate([buf, x[:, t:]], axis=1),
                                              self.keep))
      keys.append(old[0])
      values.append(old[1])
    keys.append(k[:, t:])
    values.append(v[:, t:])
    ctx.cache = cache
    return jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)


def layout(s: Settings, ctx, t: int, logits_at: jax.Array | None = None) -> Layout:
  """The layout of a forward of t tokens per row (ctx.positions [b, t], consecutive per row as
  every caller builds them). `logits_at` [b, k]: output positions (default: all t)."""
  if ctx.cache is not None:
    return _cached_layout(s, ctx, t, logits_at)
  k = s.repeats
  rel = np.concatenate([np.arange(t), np.repeat(np.arange(t), k - 1)])  # [n]
  copy = np.concatenate([np.ones(t, np.int32), np.tile(np.arange(2, k + 1), t)])
  # static: a window's mask depends on its length only (chunks from its first position)
  mask = allowed(s, rel[:, None], copy[:, None], rel[None, :], copy[None, :])[None]
  out = np.arange(t)[None] if logits_at is None else logits_at
  final = t + out * (k - 1) + k - 2
  positions = rope_positions(s, ctx.positions[:, rel], jnp.asarray(copy)[None])
  return Layout(index=jnp.asarray(rel)[None], positions=positions, mask=jnp.asarray(mask),
                final=jnp.asarray(final), originals=t)


def _cached_layout(s: Settings, ctx, t: int, logits_at) -> Layout:
  """The layout over a KV cache. Hidden copies are computed for H positions per row from
  `hstart`: all t (decode steps, continuations, swa's prefill), or in a prefill that asks for
  the last prompt token's logits only phd's last position (H = 1) and cswa's last chunk
  (H = C). Keys: [originals (the prompt in a prefill, else every cache slot) ; the hidden
  buffer (ranks p0 (K - 1) - B .. p0 (K - 1) - 1, p0 = tokens held) ; this forward's hidden]."""
  if s.kind == "naive":
    raise ConfigError(_NO_CACHE)
  cache, k = ctx.cache, s.repeats
  km1, b, i32 = k - 1, cache.batch, jnp.int32
  p0 = cache.lengths
  real = cache.real if cache.prefill and cache.real is not None else jnp.full((b,), t, i32)
  h, hstart = t, jnp.zeros((b,), i32)
  if cache.prefill and logits_at is not None:
    if logits_at.shape[1] != 1:
      raise ValueError("a model.phd prefill gives the logits at each row's last prompt token "
                       "only (logits_at [batch, 1])")
    if s.kind == "phd":
      h, hstart = 1, real - 1
    elif s.kind == "cswa" and t > s.chunk:  # copies of the last chunk's positions only
      h, hstart = s.chunk, (real - 1) // s.chunk * s.chunk
  hidden_rel = jnp.repeat(hstart[:, None] + jnp.arange(h, dtype=i32)[None], km1, axis=1)
  q_rel = jnp.concatenate([jnp.broadcast_to(jnp.arange(t, dtype=i32), (b, t)), hidden_rel], 1)
  q_copy = jnp.concatenate([jnp.ones((t,), i32), jnp.tile(jnp.arange(2, k + 1, dtype=i32), h)])
  q_copy = q_copy[None]  # [1, n]
  q_pos = p0[:, None] + q_rel  # positions past a ragged prompt (cswa's chunk) are never seen

  slots = t if cache.prefill else cache.max_len
  k_pos = [jnp.broadcast_to(jnp.arange(slots, dtype=i32), (b, slots))]
  k_copy = [jnp.ones((b, slots), i32)]
  k_valid = [jnp.ones((b, slots), bool) if cache.prefill else k_pos[0] < (p0 + t)[:, None]]
  keep = None
  if s.buffer:
    top = (p0 * km1)[:, None]
    ranks = top - s.buffer + jnp.arange(s.buffer, dtype=i32)[None]
    k_pos.append(ranks // km1)
    k_copy.append(ranks % km1 + 2)
    k_valid.append(ranks >= 0)
    # after this forward the buffer holds ranks (p0 + real)(K - 1) - B ..: from the old buffer
    # or this forward's hidden block (rank (p0 + hstart)(K - 1) onwards); ranks in neither
    # (before a cswa prefill's chunk) are in earlier chunks, never seen
    new = ((p0 + real) * km1)[:, None] - s.buffer + jnp.arange(s.buffer, dtype=i32)[None]
    index = jnp.where(new < top, new - (top - s.buffer),
                      s.buffer + new - ((p0 + hstart) * km1)[:, None])
    keep = jnp.clip(index, 0, s.buffer + h * km1 - 1)
  k_pos.append(q_pos[:, t:])
  k_copy.append(jnp.broadcast_to(q_copy[:, t:], (b, h * km1)))
  k_valid.append(jnp.ones((b, h * km1), bool))
  k_pos, k_copy, k_valid = (jnp.concatenate(x, axis=1) for x in (k_pos, k_copy, k_valid))
  mask = allowed(s, q_pos[:, :, None], q_copy[:, :, None], k_pos[:, None, :],
                 k_copy[:, None, :]) & k_valid[:, None, :]

  out = jnp.arange(t, dtype=i32)[None] if logits_at is None else logits_at
  final = t + (out - hstart[:, None]) * km1 + km1 - 1
  index = jnp.minimum(q_rel, t - 1)
  positions = rope_positions(s, jnp.take_along_axis(ctx.positions, index, axis=1), q_copy)
  return Layout(index=index, positions=positions, mask=mask, final=final, originals=t,
                buffer=s.buffer, keep=keep)
