"""The shared run scales every experiment starts from (docs/architecture.md, Experiments).

  smoke  seconds on a CPU; what the tests train
  tiny   the CPU reproduction setting shared by all papers so they can be compared: nanoGPT's
         "baby" decoder (4 layers, width 128, 4 heads, context 64, batch 12, 2000 steps, lr 1e-3,
         100 warmup steps, cosine to 1e-4), character-level; about 2 minutes on a 2-core CPU
  small  one GPU, under an hour: GPT-2 small shape on WikiText-2 BPE
  paper  LLaMA-7B shape, for planning on real clusters (papers override it with their own)

An experiment's config calls `scaled_config(arg, experiment)` (or `apply_scale` on a config of
its own) and then changes what its paper needs. `COMMON_ARG` with `apply_common_setting` is the
common scoreboard setting (research/scoreboard.py): tiny, with the init and optimizer most
wave-1 experiments share.
"""

from __future__ import annotations

import functools
import json

import ml_collections

from research.config import parse_arg
from research.errors import ConfigError
from research.run_config import default_config

SCALES = ("smoke", "tiny", "small", "paper")
# the experiment-argument keys every experiment built on the shared scales accepts
SCALE_ARGS = dict(scale="tiny", corpus="", tokenizer="", seed=0)
# what an empty corpus / tokenizer means at each scale
DEFAULT_DATA = {"smoke": ("shakespeare", "char"), "tiny": ("shakespeare", "char"),
                "small": ("wikitext2", "gpt2"), "paper": ("wikitext2", "gpt2")}


def apply_scale(c: ml_collections.ConfigDict, scale: str, *, corpus: str = "",
                tokenizer: str = "", experiment: str = "") -> ml_collections.ConfigDict:
  """Sets model size, data and schedule of `scale` on the config `c` (in place; returned)."""
  if scale not in DEFAULT_DATA:
    raise ConfigError(f"{experiment or 'experiment'}: unknown scale '{scale}' "
                      f"(choose one of {', '.join(SCALES)})")
  default_corpus, default_tokenizer = DEFAULT_DATA[scale]
  c.data.corpus = corpus or default_corpus
  c.data.tokenizer = tokenizer or default_tokenizer
  m, t, e = c.model, c.train, c.eval
  if scale == "smoke":
    m.num_layers, m.d_model, m.num_heads = 2, 32, 2
    c.data.seq_len = 32
    t.steps, t.batch_size, t.warmup_steps = 12, 8, 2
    t.log_every, t.checkpoint_every, t.keep_checkpoints = 4, 6, 2
    e.every, e.batches = 6, 2
  elif scale == "tiny":
    pass  # run_config.default_config() is the nanoGPT-baby setting
  elif scale == "small":
    m.num_layers, m.d_model, m.num_heads = 12, 768, 12
    c.data.seq_len = 1024
    t.steps, t.batch_size, t.lr, t.warmup_steps = 5000, 32, 6e-4, 200
    t.grad_accum = 0  # as few micro-batches as fit: 1 on an 80 GB GPU, 4 on a 24 GB CPU
    m.scan_blocks = "auto"  # one block's program for all 12 where the options allow
    t.log_every, t.checkpoint_every = 50, 1000
    e.every, e.batches = 500, 0  # every validation window that fits (WikiText-2: 7 x 32 x 1024)
  elif scale == "paper":
    m.num_layers, m.d_model, m.num_heads = 32, 4096, 32
    m.channel.d_ff = 11008
    c.data.seq_len = 2048
    t.steps, t.batch_size, t.lr, t.warmup_steps = 100_000, 1024, 3e-4, 2000
    t.grad_accum = 0
    m.remat = "block"
    m.scan_blocks = "auto"
    c.mesh.preset = "fsdp"
    # every validation window that fits, 16 per batch (WikiText-2 at 2048: 7 batches)
    e.batches, e.batch_size = 0, 16
  return c


def scaled_config(arg: str, experiment: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config, scale) for the argument string "scale=...,corpus=...,tokenizer=...,seed=...":
  the default config with the seed set and the scale applied."""
  c, a = scaled_config_with_args(arg, experiment, {})
  return c, a["scale"]


def scaled_config_with_args(arg: str, experiment: str, extra: dict):
  """(config, args) as `scaled_config`, for an experiment that accepts the argument keys of
  `extra` (name -> typed default) besides the shared ones; args holds every key's value."""
  a = parse_arg(arg, {**SCALE_ARGS, **extra})
  c = default_config()
  c.seed = a["seed"]
  apply_scale(c, a["scale"], corpus=a["corpus"], tokenizer=a["tokenizer"], experiment=experiment)
  return c, a


def apply_moe_setting(c: ml_collections.ConfigDict, scale: str) -> ml_collections.ConfigDict:
  """The MoE setting the routing papers share (erc_loss, gatepro, max_score_routing), on a
  scaled config `c` (in place; returned): every FFN a mixture of 16 SwiGLU experts of width 128,
  top-2, capacity dispatch at 1.25 x the balanced load per expert and sequence (the static-
  shape dropless path executes E/k = 8x the expert FLOPs: 431 ms per tiny step against 107 ms
  on one CPU core), the Switch balance loss at 0.01, AdamW b2 0.95; 4 experts of width 32 at
  the smoke scale, width 384 (d / 2) at the small one. Each paper then sets its router, its
  loss or its capacity, and its own paper scale."""
  m = c.model
  m.channel.kind = "moe"
  e = m.channel.moe
  e.num_experts, e.top_k, e.d_expert = 16, 2, 128
  e.dispatch, e.capacity_factor = "capacity", 1.25
  e.aux_coef = 0.01
  c.train.b2 = 0.95
  if scale == "smoke":
    e.num_experts, e.d_expert = 4, 32
  elif scale == "small":
    e.d_expert = 384
  return c


# The common scoreboard setting (research/scoreboard.py): this argument, then
# `apply_common_setting`.
COMMON_ARG = "scale=tiny,corpus=tinyshakespeare"


def apply_common_setting(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The init and optimizer most wave-1 experiments share, on a scaled config `c` (in place;
  returned): weights N(0, 1/(2.5 d)) (`init_std` 0) with output projections scaled by
  1/sqrt(2L), AdamW (0.9, 0.95), as sdd, polycom, ultramem, ultramem_v2, hybridnorm's
  Megatron-init arms and the residual-stream papers' fair tables train (the default std 0.02
  handicaps a pre-norm baseline: experiments/hyper_connections/README.md). At `COMMON_ARG` it is
  the common scoreboard setting: the dense baseline those 4 x 128 experiments share, where
  scoreboard rows compare like-for-like and compose."""
  c.model.init_std = 0.0
  c.model.init_out_scaling = "total_depth"
  c.train.b2 = 0.95
  return c


def apply_recurrent_setting(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The setting the recurrent-mixer papers share (retnet, gla, deltaproduct, matmul_free), on a
  scaled config `c` (in place; returned): the scale's decoder and data as they are, so their rows
  compare with each other and with the softmax baseline of the same scale, and the
  `extrapolation` evaluator (validation loss at 1x-8x the training context) at the end."""
  names = [n for n in c.eval.evaluators.split(",") if n]
  if "extrapolation" not in names:
    c.eval.evaluators = ",".join(names + ["extrapolation"])
  return c


def non_embedding_params(c: ml_collections.ConfigDict) -> int:
  """Non-embedding parameters of the (unresolved) config `c`, built abstractly (memoised)."""
  return _non_embedding_params(c)


def _non_embedding_params(c: ml_collections.ConfigDict) -> int:
  from research import run_config  # pylint: disable=import-outside-toplevel
  r = run_config.resolve(c)
  r.model.vocab_size = 256  # the embedding does not depend on the FFN width
  return _model_params(json.dumps(r.model.to_dict(), sort_keys=True), r.data.seq_len)


@functools.lru_cache(maxsize=None)
def _model_params(model_json: str, seq_len: int) -> int:
  """Non-embedding parameters of a resolved model section (as sorted JSON), built abstractly;
  memoised: a sweep's arms share their dense reference, and `matched_arm` re-matches a config
  whose experiment default was matched already."""
  from research.model.lm import abstract_model, model_summary  # pylint: disable=import-outside-toplevel
  model = ml_collections.ConfigDict(json.loads(model_json))
  return int(model_summary(abstract_model(model), seq_len)["params_non_embedding"])


def match_dense_params(c: ml_collections.ConfigDict, multiple: int = 8) -> ml_collections.ConfigDict:
  """Sets `model.channel.d_ff` (in place; `c` returned) so that the decoder has the
  non-embedding parameters of the same config with softmax attention (`model.attention.kind =
  dense`) at its derived FFN width, to the nearest `multiple`: a sequence mixer with more
  projections than attention's four (RetNet's 8 d^2, DeltaProduct's n_h-fold keys and values)
  gives the difference back from its FFN, as the papers compare at equal size."""
  ref = ml_collections.ConfigDict(c.to_dict())
  ref.model.attention.kind = "dense"
  ref.model.channel.d_ff = 0
  from research import run_config  # pylint: disable=import-outside-toplevel
  base_ff = run_config.resolve(ref).model.channel.d_ff
  target = _non_embedding_params(ref)
  trial = ml_collections.ConfigDict(c.to_dict())
  trial.model.channel.d_ff = base_ff
  p0 = _non_embedding_params(trial)
  trial.model.channel.d_ff = base_ff + 64
  slope = (_non_embedding_params(trial) - p0) / 64
  width = base_ff + (target - p0) / slope
  d_ff = int(max(multiple, multiple * round(width / multiple)))
  c.model.channel.d_ff = d_ff
  return c


def matched_arm(experiment: str, arg: str, overrides: dict) -> dict:
  """A sweep arm's overrides plus the `model.channel.d_ff` that matches the arm's non-embedding
  parameters to softmax attention's at the same config (`match_dense_params`), so an arm that
  changes the mixer's projections (a gate removed, n_h Householder keys) moves the difference
  into its FFN, and the arm's overrides state the width it trains."""
  from research import experiments  # pylint: disable=import-outside-toplevel
  from research.config import apply_overrides  # pylint: disable=import-outside-toplevel
  c = experiments.get_config(f"{experiment}:{arg}")
  apply_overrides(c, overrides)
  match_dense_params(c)
  return {**overrides, "model.channel.d_ff": int(c.model.channel.d_ff)}
