"""MoDA (Zhu et al. 2026): each attention head also attends, under the same softmax, to the
K/V that earlier sublayers wrote at its own token (research/model/moda.py).

  research run moda                                    # default MoDA, tiny, char Shakespeare
  research run moda:scale=smoke                        # seconds; used by the tests
  research run moda --config.model.attention.kind=dense         # the baseline of the same shape
  research run moda --config.model.attention.moda.ffn_kv=false  # depth K/V reuse only
  research sweep moda --group table3 && research report moda

Argument keys: scale (smoke | tiny | small | paper), corpus, tokenizer, seed.

At `tiny` the shared setting (width 128, context 64, batch 12, 2000 steps, character-level)
is made deep and grouped: 12 blocks, 4 query heads over 2 KV heads (G = 2), the shape the
paper's tiny reproduction plan suggests, since MoDA is about deep stacks. The `paper` scale is
the 700M model of Table 3 as the parameter counts reconstruct it (36 blocks, width 1024,
G = 2, SwiGLU 4096, context 4096; head_dim 64 is our guess).
"""

from research.scales import SCALES, scaled_config  # noqa: F401  (SCALES: listed by `research list`)

CLAIM = ("attending jointly to sequence K/V and same-token depth K/V of earlier sublayers "
         "lowers loss for +3.7% FLOPs, more so with post-norm and deeper stacks")


def get_config(arg: str = ""):
  c, scale = scaled_config(arg, "moda")
  m, t = c.model, c.train
  m.attention.kind = "moda"
  if scale == "smoke":
    m.num_layers, m.num_kv_heads = 3, 1
  elif scale == "tiny":
    m.num_layers, m.num_kv_heads = 12, 2
  elif scale == "small":
    m.num_kv_heads = 6
  elif scale == "paper":
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 36, 1024, 16, 8
    m.channel.d_ff = 4096
    t.lr, t.warmup_steps, t.min_lr_ratio = 3e-4, 2000, 0.1
    c.data.seq_len = 4096
  return c
