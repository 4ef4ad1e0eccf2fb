"""SPARKLING (Yu et al. 2026, arXiv:2602.02472): widen a model mid-training (at 50% of its
steps) with RMS-preserving rescaling, then break the symmetry of the copies with an asymmetric
optimizer-state reset and an asymmetric learning-rate re-warmup of the new parameters.

  research run sparkling                       # SPARKLING inner 2x (d_ff 256 -> 512), tiny scale
  research run sparkling:scale=smoke           # seconds; used by the tests
  research run sparkling --config.train.expand.state=copy --config.train.expand.rewarm=False
  research sweep sparkling && research report sparkling

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

The expansion is the trainer's option `train.expand` (research/train/expand.py): after
`train.expand.step` steps the run continues with the grown model. Every scale here is the
digest's tiny plan (§6) scaled: a dense pre-norm SwiGLU decoder with untied embeddings (a tied
table needs a logit scale under a hidden expansion, §3.1, which is not built), AdamW (0.9,
0.95), cosine schedule with 3% warmup to 1% of the peak lr, expansion at half the steps,
copy-copy init rescaled by the paper's table, asymmetric reset, re-warmup rho 1.3 over 250
steps (smoke: 1 step). tiny: 4 x 128, 4 heads, context 64, batch 12, character-level
Shakespeare (complete works, 4.6M characters: 4000 steps of 768 tokens stay inside one epoch),
d_ff 256 -> 512 at step 2000. paper: a dense analogue of Table 3's active path (24 x 1024,
16 heads / 4 KV heads of 96, QK-norm, d_ff 4096 = 8 experts of 512) on the shared paper data.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("widening mid-training with RMS-preserving copies plus an asymmetric optimizer-state "
         "reset and lr re-warmup of the new parameters beats naive function-preserving "
         "expansion and nears the large model trained from scratch")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "sparkling")
  m, t = c.model, c.train
  m.head.tie_embeddings = False  # digest §6 (and the hidden expansion needs it)
  m.channel.d_ff = 256
  t.steps, t.schedule, t.min_lr_ratio = 4000, "cosine", 0.01  # Table 4: final lr 1% of peak
  t.b2 = 0.95  # Table 4's AdamW (0.9, 0.95)
  x = t.expand
  x.init, x.rescale, x.state, x.rewarm, x.rho, x.warmup = (
      "copy_copy", "rms", "reset_new", True, 1.3, 250)  # §3.2-3.5 defaults
  if scale == "smoke":
    m.channel.d_ff = 64
    # the smoke test trains 4 steps: the expansion after the first, re-warmed over one
    t.steps, x.warmup = 12, 1
    x.step = 1
  elif scale == "small":  # GPT-2 small shape on WikiText-2 BPE, inner 2x
    m.channel.d_ff = 2048
    t.steps = 5000
  elif scale == "paper":  # a dense analogue of Table 3's active path (the MoE is not built)
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 24, 1024, 16, 4, 96
    m.attention.norms = "qk"  # per-head QK-norm
    m.channel.d_ff = 4096  # top-8 experts of width 512
    t.lr, t.weight_decay = 1.9556e-3, 0.1  # Table 4
  if scale != "smoke":
    t.warmup_steps = round(0.03 * t.steps)
    x.step = t.steps // 2  # the paper expands at 100B of 200B tokens
  x.d_ff = 2 * m.channel.d_ff  # inner 2x
  return c
