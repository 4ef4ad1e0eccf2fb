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

from research.errors import ConfigError  # noqa: F401  (defined in the leaf module; named here too)


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
  # off | on | auto: the blocks as one stacked module run by a scan (compile time flat in
  # depth), for homogeneous models only (lm.scan_unsupported names the options that need the
  # unrolled form); auto: on where supported (resolved into on / off)
  m.scan_blocks = "off"
  m.embed = ml_collections.ConfigDict(
      dict(kind="plain", factorized=False))  # over_width (VWN): factorized = E_base W_expand
  # residual: streams = n (hyper); fracs = m (frac, vwn); expansion = r = n/m (vwn, D' = r D);
  # dynamic / tanh: input-dependent weights and their tanh (hyper, frac, vwn); vwn only:
  # reduce_norm auto|on|off (group norm before W_reduce; auto: when D' % D == 0),
  # reduce_init random|select (W_reduce picks the first D features), temperature sqrt|width
  # (tanh logits / sqrt(D/m) as the paper's pseudocode, or / (D/m) as its text)
  m.residual = ml_collections.ConfigDict(
      dict(kind="plain", streams=4, fracs=4, expansion=2.0, dynamic=True, tanh=True,
           reduce_norm="auto", reduce_init="random", temperature="sqrt"))
  m.norm = ml_collections.ConfigDict(dict(kind="pre"))
  m.attention = ml_collections.ConfigDict(
      dict(kind="dense", impl="xla", rope_theta=10000.0,
           norms=""))  # norms inside attention: letters of "qkvc" ("qk" = QK-norm)
  # Inference only (research/infer): attention of a prompt's prefill; training is always dense.
  m.attention.prefill = "dense"  # dense | flexprefill
  m.attention.flexprefill = ml_collections.ConfigDict(dict(
      gamma=0.9, tau=0.1, block_size=128,  # FlexPrefill defaults (the official README/scripts)
      min_budget=1024, max_budget=0,  # tokens, per vertical / slash part; max 0 = no cap
      mode="flex",  # flex | vertical_slash | query_aware | fixed_budget (the ablations)
      budget=0,  # tokens; fixed_budget only
      count_rule="block",  # block | token (see kernels_pallas/sparse_prefill/README.md)
      impl="auto"))  # auto (kernel on GPU/TPU, jnp reference on CPU) | xla | pallas
  # MoDA (attention.kind="moda"): which sublayers write depth K/V (Table 3 of the paper)
  m.attention.moda = ml_collections.ConfigDict(
      dict(ffn_kv=True,  # a K/V projection beside each FFN writes a depth slot (the default)
           extra_attn_kv=False,  # attention writes a separate projection, not its sequence K/V
           ffn_kv_last_block=False))  # the last block's FFN K/V projection (it has no reader)
  m.channel = ml_collections.ConfigDict(
      dict(kind="ffn", activation="swiglu", d_ff=0, ff_multiple_of=32,
           poly_order=3))  # poly_order: PolyReLU / PolyNorm
  # channel.kind="moe" (research/model/moe.py): top-k softmax router, Switch balance loss
  m.channel.moe = ml_collections.ConfigDict(dict(
      num_experts=8, top_k=2,
      d_expert=0,  # 0: d_ff // top_k (activated FFN compute = the dense FFN's)
      dispatch="dropless",  # dropless (capacity = group size) | capacity
      capacity_factor=1.25,  # capacity: ceil(factor * seq * top_k / num_experts) slots
      aux_coef=0.01, z_coef=0.0,  # Switch load-balancing loss; router z-loss (ST-MoE)
      norm_topk=False))  # renormalize the top-k gates to sum 1
  # channel.kind="ultramem" / "ultramem_v2" (research/model/memory.py); 0 / "" = derived
  memory = dict(
      layers="",  # units "source:target,..."; "" = pairs 0:1,2:3,... (v1), every block (v2)
      num_keys=112,  # n physical keys per side: n^2 value rows per memory layer
      d_key=0, d_value=0,  # 0: d/4; d/2 (v1) or d/4 (v2)
      d_pre_value=0, peer=False,  # PEER pre-values (v2), 0: d/4
      heads=2, top_k=16,  # retrieval heads (one shared query), slots per head
      side_top_k=0,  # first-stage rows / columns per side; 0: min(top_k, 128)
      rank=2, cores=2,  # Tucker rank r (TDQKR), cores h (multi-core scoring)
      retrieval="tucker",  # tucker (TDQKR) | product (plain product keys: rank=cores=1)
      expansion=4,  # IVE rate E (a perfect square); 1 = off
      ive_projectors=True,  # one projector per virtual block (v1) or one shared (v2)
      per_rank_query=False,  # a separate query per Tucker rank (v2)
      tucker_aux_coef=0.0, tucker_aux_margin=0.15,  # the Tucker-core penalty (paper 0.001)
      init="code",  # code (official constants) | paper (calibrated scores, variance rule)
      value_lr=4.0, value_lr_decay=True,  # value-table lr multiplier, decaying to 1x
      impl="auto",  # memory_lookup: auto (kernel on GPU/TPU, xla on CPU) | xla | pallas
      match_flops=True,  # shrink the FFNs so FLOPs/token equal the dense d_ff model's
      ffn_width=0)  # the FFN width that runs; 0: derived (d_ff, or matched)
  m.channel.ultramem = ml_collections.ConfigDict(memory)
  m.channel.ultramem_v2 = ml_collections.ConfigDict(dict(
      memory, heads=1, expansion=1, ive_projectors=False, per_rank_query=True, peer=True,
      init="paper"))
  m.linear = ml_collections.ConfigDict(dict(kind="plain", use_bias=False))
  m.head = ml_collections.ConfigDict(
      dict(kind="plain", tie_embeddings=True, mtp_weight=0.3))  # mtp_weight: head.kind=mtp

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
  # corpus mqar | facts (research/data/synthetic.py; tokenizer "synthetic"): sizes of the tasks
  d.synthetic = ml_collections.ConfigDict(dict(
      num_keys=128, num_values=128,  # MQAR key / value vocabularies (facts use the values too)
      pairs=16,  # MQAR key-value pairs per sequence
      entities=1024, attributes=4,  # facts: entities x attributes facts, each one value
      train_sequences=20000, valid_sequences=512,  # instances generated per split
      seed=0))  # which facts / instances (the run seed only orders them)

  # ---- train
  t = c.train = ml_collections.ConfigDict()
  t.steps = 2000
  t.batch_size = 12  # global batch, sequences per optimizer step
  t.grad_accum = 1  # micro-batches per step (batch_size divides by it); 0: as few as fit the
                   # device's memory by research.plan's estimate (decided when the run starts)
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
  mixer = ffn_lib.CHANNEL_MIXERS.get(m.channel.kind)
  mixer.resolve(m)  # a channel mixer's own derived fields (moe.py, memory.py)
  if m.scan_blocks != "off":
    from research.model.lm import scan_unsupported  # pylint: disable=import-outside-toplevel
    why = scan_unsupported(m)
    if why and m.scan_blocks == "on":
      raise ConfigError(f"model.scan_blocks=on needs identical blocks that write nothing "
                        f"across layers: {why}; set model.scan_blocks=off (or auto)")
    m.scan_blocks = "off" if why else "on"
  t = c.train
  if t.grad_accum and t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if c.eval.batch_size == 0:
    c.eval.batch_size = t.batch_size
  return c


# The ranges of the core settings (each option checks its own fields where it is built). A bound
# is (low, high, low_inclusive, high_inclusive); None is unbounded.
_AT_LEAST_1 = (1, None, True, False)
_AT_LEAST_0 = (0, None, True, False)
_POSITIVE = (0, None, False, False)
_FRACTION = (0, 1, True, True)  # [0, 1]
_BELOW_1 = (0, 1, True, False)  # [0, 1)
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
    "train.decay_fraction": _FRACTION, "train.b1": _BELOW_1, "train.b2": _BELOW_1,
    "train.eps": _AT_LEAST_0, "train.weight_decay": _AT_LEAST_0, "train.clip_norm": _AT_LEAST_0,
    "train.log_every": _AT_LEAST_1, "train.checkpoint_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "eval.every": _AT_LEAST_1, "eval.batches": _AT_LEAST_0, "eval.batch_size": _AT_LEAST_0,
    "mesh.num_devices": _AT_LEAST_0, "mesh.tensor": _AT_LEAST_1, "mesh.expert": _AT_LEAST_1,
}
CHOICES = {
    "train.schedule": ("constant", "cosine", "wsd"),  # research/train/optim.py
    "train.precision": ("auto", "fp32", "bf16"),
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
  and for a warmup longer than the run."""
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
      raise ConfigError(f"{key}={v!r} is not one of {', '.join(choices)}")
  t = config.train
  if t.warmup_steps > t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
