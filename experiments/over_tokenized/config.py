"""Over-Tokenized Transformer (Huang et al. 2025, arXiv:2501.16975): scale the input vocabulary
with hashed n-gram embeddings (over-encoding, OE) and, separately, the output side with
per-offset vocabularies (over-decoding, OD) or DeepSeek-style MTP.

  research run over_tokenized                          # OE at the tiny scale (char level)
  research run over_tokenized:scale=smoke              # seconds; used by the tests
  research run over_tokenized --config.model.embed.kind=plain   # the baseline
  research sweep over_tokenized --group scaling        # the table-size sweep (log-linear fit)
  research sweep over_tokenized --group ablation       # Table 3's hierarchy, slicing, exact tables
  research sweep over_tokenized --group hash_conflicts # Table 4: m a multiple of V or coprime
  research sweep over_tokenized --group output         # OD, MTP and OE + MTP (OT)
  research report over_tokenized

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

OE (model.embed.kind = over_encoding, research/model/embedding.py): the token's row plus
hashed 2- and 3-gram rows, k slices per order, each table m + 2 idx rows and d_model / (2k)
wide with its own projection, the sum divided by 1 + 2k (Alg. 1). The tiny scale is the shared
character-level setting (4 x 128, context 64), where V = 65 makes exact n-gram tables possible
(65^2 = 4,225 bigrams, 65^3 = 274,625 trigrams): k = 2 slices of width 32, m = 16,381 rows
(prime, so coprime with 65). `small` is GPT-2 BPE on WikiText-2 at m = 1,000,003 (768M table
parameters); `paper` is the OLMo2-1B shape with OE-12.8M and slices of width 256 (k = 4), as
the paper's main dense run.
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("hashed n-gram input embeddings (over-encoding) lower the LM loss at fixed compute, "
         "log-linearly in the table size; over-decoding / MTP does not help small models")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "over_tokenized")
  m = c.model
  m.embed.kind = "over_encoding"
  oe = m.embed.over_encoding
  oe.grams, oe.slices = "2,3", 2
  oe.rows = {"smoke": 1021, "tiny": 16381, "small": 1_000_003}.get(scale, 12_800_009)
  if scale == "paper":  # OLMo2-1B: 16 x 2048, 16 heads, FFN 8192; OE-12.8M, slice width 256
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 16, 2048, 16, 16
    m.channel.d_ff = 8192
    oe.slices = 4
    c.data.seq_len = 4096
    c.train.lr = 4e-4
  return c
