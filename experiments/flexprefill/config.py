"""FlexPrefill (Lai et al., ICLR 2025): context-aware block-sparse attention for the prefill.

FlexPrefill is inference-only: we train one dense decoder at the longest context the CPU
budget allows, then evaluate its checkpoint with dense and with sparse prefill.

  research run flexprefill                                  # train: tiny, context 512, char-level
  research run flexprefill:scale=smoke                      # seconds; used by the tests
  research sweep flexprefill --group train                  # the model, 3 seeds
  python experiments/flexprefill/evaluate.py --workdir runs/flexprefill/train/dense/seed0
                                                            # the evaluation sweep (sweep.py)

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The prefill settings (`model.attention.prefill`, `model.attention.flexprefill.*`) are inference
settings: training ignores them. The ones set here are the defaults of the evaluation grid,
scaled down as the digest advises (blocks of 64 at a 512 context, a minimum budget of 2 blocks
rather than the paper's 1024 tokens, which would make such a prompt dense).
RoPE theta is `model.attention.rope_theta` (10000 here, a config value: raise it with
--config.model.attention.rope_theta for longer contexts).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("FlexPrefill's per-head sparse prefill (gamma 0.9-0.95) keeps retrieval accuracy and "
         "perplexity close to dense attention while computing a fraction of the causal blocks")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "flexprefill")
  m, t, f = c.model, c.train, c.model.attention.flexprefill
  m.attention.rope_theta = 10000.0
  f.gamma, f.tau, f.mode, f.impl = 0.9, 0.1, "flex", "auto"
  if scale == "smoke":
    # room for every 2-needle passkey prompt (the longest needs a window of 131 tokens): the
    # smoke run mixes them in too
    c.data.seq_len = 160
    c.data.passkey_mix, c.data.passkey_keys = 0.5, 2
    f.block_size, f.min_budget = 16, 16
  elif scale == "tiny":
    # The shared tiny width at an 8x longer context, with about the shared tiny run's tokens
    # (800 x 4 x 512 = 1.6M) so one run stays near the CPU budget. 1024 is the next step
    # (--config.data.seq_len=1024; longer attention per token, see README.md).
    m.num_kv_heads = 2  # GQA, so the per-query-head patterns meet shared KV tiles
    c.data.seq_len = 512
    # Half the training windows are passkey prompts with their answers (1-4 needles,
    # research/data/passkey.py): a model trained on plain text never learns to retrieve, and
    # retrieval accuracy is what FlexPrefill must preserve.
    c.data.passkey_mix, c.data.passkey_keys = 0.5, 4
    t.batch_size, t.steps, t.warmup_steps = 4, 800, 50
    t.log_every, t.checkpoint_every = 50, 200
    c.eval.every, c.eval.batches = 200, 8
    f.block_size, f.min_budget = 64, 128
  elif scale == "small":
    m.num_kv_heads = 4
    c.data.seq_len = 4096
    t.batch_size = 8
    f.block_size, f.min_budget = 64, 256
  elif scale == "paper":
    # Llama-3.1-8B-Instruct, the paper's main model (evaluated up to 128K; γ 0.95 there).
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 32, 4096, 32, 8
    m.channel.d_ff = 14336
    m.attention.rope_theta = 500_000.0
    c.data.seq_len = 8192
    f.gamma, f.block_size, f.min_budget = 0.95, 128, 1024
  return c
