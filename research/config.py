"""Default configuration and override handling.

Every run is described by one `ml_collections.ConfigDict` with five sections:

  model  the decoder: sizes and the option chosen at each composition point
  data   corpus, tokenizer, sequence length
  train  optimizer, schedule, batch, steps, precision, checkpointing
  mesh   device mesh preset and multi-host start-up
  eval   validation cadence and size

An experiment's `get_config(arg)` starts from `default_config()` and changes values; the command
line then applies dotted overrides (`--config.train.lr=3e-4`). Keys that do not exist are errors
that name the closest valid keys: a typo must never silently train the wrong model.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A configuration problem: unknown key, bad value, or an inconsistent combination."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- model: one decoder assembled from the composition points of docs/architecture.md.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: taken from the tokenizer
  m.num_layers = 4
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: equal to num_heads (MHA); fewer gives GQA
  m.head_dim = 0  # 0: d_model // num_heads
  m.max_seq_len = 0  # 0: data.seq_len
  m.dropout = 0.0
  m.norm_eps = 1e-5
  m.init_std = 0.02  # 0: 1/sqrt(2.5 d_model)
  m.init_out_scaling = "total_depth"  # output projections: none | total_depth | layer_depth
  m.remat = "none"  # none | block
  m.embed = ml_collections.ConfigDict(dict(kind="plain"))
  m.residual = ml_collections.ConfigDict(dict(kind="plain"))
  m.norm = ml_collections.ConfigDict(dict(kind="pre"))
  m.attention = ml_collections.ConfigDict(
      dict(kind="dense", impl="xla", rope_theta=10000.0,
           norms=""))  # norms inside attention: letters of "qkvc" ("qk" = QK-norm)
  m.channel = ml_collections.ConfigDict(
      dict(kind="ffn", activation="swiglu", d_ff=0, ff_multiple_of=32,
           poly_order=3))  # poly_order: PolyReLU / PolyNorm
  m.linear = ml_collections.ConfigDict(dict(kind="plain", use_bias=False))
  m.head = ml_collections.ConfigDict(dict(kind="plain", tie_embeddings=True))

  # ---- data
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "tinyshakespeare"
  d.tokenizer = "char"  # bytes | char | gpt2
  d.data_dir = ""  # '' -> $RESEARCH_DATA_DIR
  d.seq_len = 64

  # ---- train
  t = c.train = ml_collections.ConfigDict()
  t.steps = 2000
  t.batch_size = 12  # global batch, sequences per optimizer step
  t.grad_accum = 1  # micro-batches per step; batch_size must divide by it
  t.lr = 1e-3
  t.schedule = "cosine"  # constant | cosine | wsd
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # cosine / wsd floor as a fraction of lr
  t.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  t.b1 = 0.9
  t.b2 = 0.99
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.clip_norm = 1.0  # 0 disables clipping
  t.precision = "auto"  # auto (fp32 on CPU, bf16 compute on GPU/TPU) | fp32 | bf16
  t.log_every = 50
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  t.progress = True
  t.log_layer_grad_norms = False  # log grad_norm/block_<i> (the gradient-norm profile over depth)
  t.stop_on_divergence = True  # end the run (summary marks it diverged) when the loss is not finite

  # ---- eval
  e = c.eval = ml_collections.ConfigDict()
  e.every = 250
  e.batches = 40  # fixed validation batches; 0: the whole validation split
  e.batch_size = 0  # 0: train.batch_size

  # ---- mesh
  h = c.mesh = ml_collections.ConfigDict()
  h.preset = "dp"  # dp | fsdp | fsdp_tp
  h.num_devices = 0  # 0: every device; N: the first N (must not exceed the devices present)
  h.tensor = 1  # size of the `tensor` axis for fsdp_tp
  h.expert = 1  # size of the reserved `expert` axis
  h.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, name + "."))
    else:
      keys.append(name)
  return keys


def unknown_key_error(key: str, valid: Iterable[str], what: str = "config key") -> ConfigError:
  valid = list(valid)
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return ConfigError(f"unknown {what} '{key}'{hint}")


def parse_value(text: str) -> Any:
  """Reads a command-line value: Python literals where they parse, else the bare string."""
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted keys in place; unknown keys and type mismatches raise ConfigError."""
  valid = flat_keys(config)
  for key, value in overrides.items():
    if key not in valid:
      raise unknown_key_error(key, valid)
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
      value = parse_value(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if old is not None and value is not None and type(old) is not type(value):
      raise ConfigError(
          f"config key '{key}' expects {type(old).__name__}, got {value!r}")
    node[leaf] = value


def parse_arg(arg: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """Parses an experiment's variant string "k=v,k2=v2" against typed defaults.

  The keys allowed are those of `defaults`; values are converted to the default's type.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ConfigError(f"experiment argument '{item}' is not of the form key=value")
    k, v = (s.strip() for s in item.split("=", 1))
    if k not in defaults:
      raise unknown_key_error(k, defaults, what="experiment argument")
    default = defaults[k]
    if isinstance(default, bool):
      if v.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"experiment argument '{k}' expects true/false, got '{v}'")
      out[k] = v.lower() in ("true", "1")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      try:
        out[k] = type(default)(ast.literal_eval(v))
      except (ValueError, SyntaxError, TypeError) as e:
        raise ConfigError(
            f"experiment argument '{k}' expects {type(default).__name__}, got '{v}'") from e
    else:
      out[k] = v
  return out


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills derived values (0 = "derive") and checks the combination; returns a new config."""
  c = ml_collections.ConfigDict(config.to_dict())
  m = c.model
  if m.num_kv_heads == 0:
    m.num_kv_heads = m.num_heads
  if m.head_dim == 0:
    if m.d_model % m.num_heads:
      raise ConfigError(
          f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    m.head_dim = m.d_model // m.num_heads
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(
        f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
  if m.max_seq_len == 0:
    m.max_seq_len = c.data.seq_len
  # Lazy import: the model registries import this module for ConfigError.
  from research.model import attention as attention_lib, ffn as ffn_lib, norms as norms_lib
  # A norm placement may put norms inside attention (HybridNorm: QKV-norm); merge them so the
  # saved config says what runs.
  implied = norms_lib.NORM_PLACEMENTS.get(m.norm.kind).attention_norms
  norms = attention_lib.check_attention_norms(m.attention.norms + implied)
  m.attention.norms = "".join(x for x in attention_lib.ATTENTION_NORMS if x in norms)
  if m.channel.d_ff == 0:
    # A gated FFN (3 matrices) at 8/3 d, rounded up to ff_multiple_of (LLaMA); a plain one
    # (2 matrices) at 1.5x that width, so both have the same parameters (PolyCom's matching).
    mult = m.channel.ff_multiple_of
    gated = int(mult * -(-int(8 / 3 * m.d_model) // mult))
    m.channel.d_ff = gated if ffn_lib.is_gated(m.channel.activation) else 3 * gated // 2
  t = c.train
  if t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if c.eval.batch_size == 0:
    c.eval.batch_size = t.batch_size
  return c
