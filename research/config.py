"""The core of the run config, and override handling.

Every run is described by one `ml_collections.ConfigDict` with five sections:

  model  the decoder: sizes and the option chosen at each composition point
  data   corpus, tokenizer, sequence length
  train  optimizer, schedule, batch, steps, precision, checkpointing
  mesh   device mesh preset and multi-host start-up
  eval   validation cadence and size

This module holds what is outside every option (`core_config`: the model's sizes, data, train,
eval, mesh) and the generic tools; it imports nothing of the model. The whole default config,
with each composition point's section assembled from its options, and `resolve` are
research/run_config.py's. An experiment's `get_config(arg)` starts from that default and changes
values; the command line then applies dotted overrides (`--config.train.lr=3e-4`). Keys that do
not exist are errors that name the closest valid keys: a typo must never silently train the
wrong model.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable

import ml_collections

from research.errors import ConfigError  # noqa: F401  (defined in the leaf module; named here too)


def core_config() -> ml_collections.ConfigDict:
  """The settings outside every option: the model's sizes and the data, train, eval and mesh
  sections. research/run_config.py adds each composition point's section (model.<point>)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- model: the decoder's sizes (its options: research/model/options.py)
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
  # off | on | auto: the blocks as one stacked module run by a scan (compile time flat in
  # depth), for homogeneous models only (lm.scan_unsupported names the options that need the
  # unrolled form); auto: on where supported (resolved into on / off)
  m.scan_blocks = "off"
  # ---- data
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "tinyshakespeare"
  d.tokenizer = "char"  # bytes | char | gpt2
  d.data_dir = ""  # '' -> $RESEARCH_DATA_DIR
  d.seq_len = 64
  # a text corpus's training windows replaced, with this probability, by passkey prompts with
  # their answers (research/data/passkey.py), 1..passkey_keys needles each; 0: plain text
  d.passkey_mix = 0.0
  d.passkey_keys = 1
  d.passkey_key_len = 5
  # corpus mqar | facts | group (research/data/synthetic.py; tokenizer "synthetic"): sizes of the tasks
  d.synthetic = ml_collections.ConfigDict(dict(
      num_keys=128, num_values=128,  # MQAR key / value vocabularies (facts use the values too)
      pairs=16,  # MQAR key-value pairs per sequence
      entities=1024, attributes=4,  # facts: entities x attributes facts, each one value
      group="S3",  # group: the word problem's group (S3, S4, S5, A4, A5)
      # group: where its running products are: "targets" (only predicted, never seen: the
      # state-tracking task) or "inputs" (interleaved tokens: each product a lookup of the
      # two tokens before it, no state needed); research/data/synthetic.py
      products="inputs",
      train_sequences=20000, valid_sequences=512,  # instances generated per split
      seed=0))  # which facts / instances (the run seed only orders them)

  # ---- train
  t = c.train = ml_collections.ConfigDict()
  t.steps = 2000
  t.batch_size = 12  # global batch, sequences per optimizer step
  t.grad_accum = 1  # micro-batches per step (batch_size divides by it); 0: as few as fit the
                   # device's memory by research.plan's estimate (decided when the run starts)
  t.lr = 1e-3
  t.schedule = "cosine"  # constant | cosine | linear | wsd | step | inverse_time
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # cosine / linear / wsd / inverse_time floor as a fraction of lr
  t.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  t.step_milestones = (0.5, 0.75)  # step: fractions of train.steps where lr is multiplied by
  t.step_gamma = 0.1  # step_gamma
  t.b1 = 0.9
  t.b2 = 0.99
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.clip_norm = 1.0  # 0 disables clipping
  t.optimizer = "adamw"  # adamw | lowbit_adamw (Adam's moments as block-wise low-bit codes)
  # lowbit_adamw (research/train/lowbit.py, SOLO): each moment's bits, level grid (linear | de |
  # qema, the log grid for v) and rounding (nearest | stochastic); blocks of `block` values;
  # qema's quantile; tensors with fewer than min_size values keep fp32 moments
  t.lowbit = ml_collections.ConfigDict(dict(
      m_bits=4, m_grid="de", m_rounding="nearest", v_bits=2, v_grid="qema",
      v_rounding="stochastic", block=128, quantile=0.1, min_size=128))
  # SPARKLING's mid-training width expansion (research/train/expand.py): after `step` steps (0:
  # off) the MLP width grows to `d_ff` and / or the hidden width to `d_model` (0: unchanged;
  # heads and head_dim stay), new slices initialised `init` (<fan-out side>_<fan-in side>:
  # copy_copy | random_random | random_zero | zero_copy), fan-in weights rescaled (`rescale`:
  # rms, the paper's table, or none), the optimizer state of the new slices `state`
  # (reset_new: zeros, the old slices keep theirs | copy | reset_all) and, with `rewarm`, the
  # new parameters' lr warmed from eta(step) to rho x that over `warmup` steps, then cosine
  t.expand = ml_collections.ConfigDict(dict(
      step=0, d_ff=0, d_model=0, init="copy_copy", rescale="rms", state="reset_new",
      rewarm=True, rho=1.3, warmup=250))
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
  # what a run measures besides its losses (research/eval/__init__.py): modules of research/eval
  # run at every evaluation (exact_match: synthetic tasks only) or at the end (layer_cosine;
  # connections: heat maps of hyper / frac / vwn connections)
  e.evaluators = "exact_match,layer_cosine,connections"

  # ---- mesh
  h = c.mesh = ml_collections.ConfigDict()
  h.preset = "dp"  # dp | fsdp | fsdp_tp
  h.num_devices = 0  # 0: every device; N: the first N (must not exceed the devices present)
  h.tensor = 1  # size of the `tensor` axis for fsdp_tp
  h.expert = 1  # size of the reserved `expert` axis
  h.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


def flat_keys(config: ml_collections.ConfigDict | dict, prefix: str = "") -> list[str]:
  """The dotted names of the leaves of a ConfigDict or of a nested dict."""
  keys = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
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


def get_dotted(d: dict, dotted: str, missing=None):
  """The value at a dotted key of a nested dict (a config's `to_dict()`), or `missing`."""
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return missing
    d = d[k]
  return d


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
    if isinstance(old, tuple) and isinstance(value, (int, float, str)):
      value = (value,)  # one element of a tuple setting: "0.5" for (0.5,)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
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


def resolve_core(c: ml_collections.ConfigDict) -> None:
  """Fills the derived core values (0 = "derive") of `c` in place and checks them; the options'
  own fields are research/model/options.py's (research/run_config.py: resolve runs both)."""
  check_values(c)
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
  t = c.train
  if t.grad_accum and t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if c.eval.batch_size == 0:
    c.eval.batch_size = t.batch_size


# The ranges of the core settings (each option checks its own fields where it is built). A bound
# is (low, high, low_inclusive, high_inclusive); None is unbounded.
_AT_LEAST_1 = (1, None, True, False)
_AT_LEAST_0 = (0, None, True, False)
_POSITIVE = (0, None, False, False)
_FRACTION = (0, 1, True, True)  # [0, 1]
_BELOW_1 = (0, 1, True, False)  # [0, 1)
_POSITIVE_BELOW_1 = (0, 1, False, False)  # (0, 1)
_POSITIVE_AT_MOST_1 = (0, 1, False, True)  # (0, 1]
RANGES = {
    "seed": _AT_LEAST_0,
    "model.num_layers": _AT_LEAST_1, "model.d_model": _AT_LEAST_1, "model.num_heads": _AT_LEAST_1,
    "model.num_kv_heads": _AT_LEAST_0, "model.head_dim": _AT_LEAST_0,
    "model.max_seq_len": _AT_LEAST_0, "model.vocab_size": _AT_LEAST_0,
    "model.dropout": _BELOW_1, "model.norm_eps": _AT_LEAST_0, "model.init_std": _AT_LEAST_0,
    "data.seq_len": _AT_LEAST_1, "data.passkey_mix": _BELOW_1, "data.passkey_keys": _AT_LEAST_1,
    "data.passkey_key_len": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1, "train.batch_size": _AT_LEAST_1, "train.grad_accum": _AT_LEAST_0,
    "train.lr": _POSITIVE, "train.warmup_steps": _AT_LEAST_0, "train.min_lr_ratio": _FRACTION,
    "train.decay_fraction": _FRACTION, "train.step_gamma": _POSITIVE_AT_MOST_1,
    "train.b1": _BELOW_1, "train.b2": _BELOW_1,
    "train.eps": _AT_LEAST_0, "train.weight_decay": _AT_LEAST_0, "train.clip_norm": _AT_LEAST_0,
    "train.log_every": _AT_LEAST_1, "train.checkpoint_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "train.lowbit.block": _AT_LEAST_1, "train.lowbit.quantile": _POSITIVE_BELOW_1,
    "train.lowbit.min_size": _AT_LEAST_0,
    "train.expand.step": _AT_LEAST_0, "train.expand.d_ff": _AT_LEAST_0,
    "train.expand.d_model": _AT_LEAST_0, "train.expand.rho": _POSITIVE,
    "train.expand.warmup": _AT_LEAST_0,
    "eval.every": _AT_LEAST_1, "eval.batches": _AT_LEAST_0, "eval.batch_size": _AT_LEAST_0,
    "mesh.num_devices": _AT_LEAST_0, "mesh.tensor": _AT_LEAST_1, "mesh.expert": _AT_LEAST_1,
}
CHOICES = {
    "train.schedule": ("constant", "cosine", "linear", "wsd", "step", "inverse_time"),  # optim.py
    "train.optimizer": ("adamw", "lowbit_adamw"),
    "train.lowbit.m_bits": (2, 3, 4, 8), "train.lowbit.v_bits": (2, 3, 4, 8),
    "train.lowbit.m_grid": ("linear", "de"),  # research/train/lowbit.py (qema: v only)
    "train.lowbit.v_grid": ("linear", "de", "qema"),
    "train.lowbit.m_rounding": ("nearest", "stochastic"),
    "train.lowbit.v_rounding": ("nearest", "stochastic"),
    "train.precision": ("auto", "fp32", "bf16"),
    # research/train/expand.py: INITS, RESCALES, STATES
    "train.expand.init": ("copy_copy", "random_random", "random_zero", "zero_copy"),
    "train.expand.rescale": ("rms", "none"),
    "train.expand.state": ("reset_new", "copy", "reset_all"),
    "model.init_out_scaling": ("none", "total_depth", "layer_depth"),
    "model.remat": ("none", "block"),
    "model.scan_blocks": ("off", "on", "auto"),
}


def _describe_range(low, high, low_in, high_in) -> str:
  if high is None:
    return f"{'>=' if low_in else '>'} {low}"
  return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for a core setting out of its range or not among its choices,
  for a warmup longer than the run, and for schedule settings that cannot work (a step
  milestone inside the warmup, a 1/t decay to a floor of 0)."""
  d = config.to_dict()
  for key, (low, high, low_in, high_in) in RANGES.items():
    v = get_dotted(d, key)
    if v is None or isinstance(v, bool):
      continue
    ok = (v >= low if low_in else v > low) and (
        high is None or (v <= high if high_in else v < high))
    if not ok:
      raise ConfigError(f"{key}={v!r} must be {_describe_range(low, high, low_in, high_in)}")
  for key, choices in CHOICES.items():
    v = get_dotted(d, key)
    if v not in choices:
      raise ConfigError(f"{key}={v!r} is not one of {', '.join(map(str, choices))}")
  t = config.train
  if t.warmup_steps > t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
  milestones = t.get("step_milestones", ())
  if not isinstance(milestones, tuple) or not all(
      isinstance(m, (int, float)) and 0 < m < 1 for m in milestones):
    raise ConfigError(f"train.step_milestones={milestones!r} must be a tuple of fractions of "
                      "train.steps, each in (0, 1), e.g. (0.5, 0.75)")
  early = [m for m in milestones if int(round(m * t.steps)) < t.warmup_steps]
  if t.schedule == "step" and early:
    raise ConfigError(f"train.step_milestones {early} fall inside the warmup (train.warmup_steps="
                      f"{t.warmup_steps} of train.steps={t.steps}): a milestone must come after")
  if t.schedule == "inverse_time" and t.min_lr_ratio <= 0:
    raise ConfigError("train.schedule='inverse_time' (lr / (1 + k s)) reaches its floor "
                      "train.min_lr_ratio at the last step: the floor must be > 0, not "
                      f"{t.min_lr_ratio}")


# What train.expand can grow (research/train/expand.py reads the parameters' logical axes):
# key -> the value it needs, for any expansion and for a hidden-width one
_EXPAND_NEEDS = {"model.channel.kind": "ffn", "model.linear.kind": "plain",
                 "model.linear.use_bias": False, "train.optimizer": "adamw"}
_EXPAND_D_MODEL_NEEDS = {"model.embed.kind": "plain", "model.residual.kind": "plain",
                         "model.attention.kind": "dense", "model.head.kind": "plain",
                         "model.head.tie_embeddings": False}


def check_expand(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for a train.expand that cannot run on the resolved config
  `c` (its model's widths derived): a step outside the run, a width that does not grow, a
  re-warmup longer than what is left, an architecture the expansion does not know."""
  x = c.train.get("expand")
  if x is None or x.step == 0:
    return
  t, m = c.train, c.model
  if x.step >= t.steps:
    raise ConfigError(f"train.expand.step={x.step} must be below train.steps={t.steps}")
  if not x.d_ff and not x.d_model:
    raise ConfigError(f"train.expand.step={x.step} expands nothing: set train.expand.d_ff "
                      "and / or train.expand.d_model")
  for key, now in (("d_ff", m.channel.d_ff), ("d_model", m.d_model)):
    if x[key] and x[key] <= now:
      raise ConfigError(f"train.expand.{key}={x[key]} must exceed the model's {key}={now}: "
                        "an expansion grows the model (it cannot shrink or keep it)")
  needs = dict(_EXPAND_NEEDS, **(_EXPAND_D_MODEL_NEEDS if x.d_model else {}))
  d = c.to_dict()
  bad = [f"{k}={get_dotted(d, k)!r} (needs {v!r})" for k, v in needs.items()
         if get_dotted(d, k) != v]
  if bad:
    raise ConfigError(f"train.expand{'.d_model' if x.d_model else ''} does not support "
                      f"{'; '.join(bad)}")
  if x.rewarm and x.warmup >= t.steps - x.step:
    raise ConfigError(f"train.expand.warmup={x.warmup} must be shorter than the "
                      f"{t.steps - x.step} steps after train.expand.step={x.step}")


def expand_step(c) -> int:
  """train.expand.step of a resolved config: 0 when the run does not expand."""
  x = c.train.get("expand")
  return int(x.step) if x is not None else 0


def grown_config(c) -> ml_collections.ConfigDict:
  """The resolved config `c` with its model at the widths after train.expand's expansion
  (head_dim and every other derived size kept); research/train/expand.py grows the state."""
  g = ml_collections.ConfigDict(c.to_dict())
  x = c.train.expand
  if x.d_ff:
    g.model.channel.d_ff = x.d_ff
  if x.d_model:
    g.model.d_model = x.d_model
  return g


def grown_at(c, step: int) -> bool:
  """Whether a checkpoint of `c`'s run at `step` holds the grown model (one at
  train.expand.step itself holds the model before the expansion)."""
  return 0 < expand_step(c) < step
