"""The PyTorch peer of the tiny training step: the same decoder, the same batches, on the CPU.

  python bench/peer_torch.py --steps 200 --repeats 2        # prints a JSON line of step times
  python bench/train_throughput.py --vs-torch               # both, interleaved, and their ratio

The model is ours at the baseline tiny shape, written in PyTorch: 4 pre-norm blocks of width 128
with 4 heads, RMSNorm (eps 1e-5, gains), RoPE (theta 10000) on q and k, causal attention by
`F.scaled_dot_product_attention`, a SwiGLU FFN of width 352, no biases, the embedding tied to
the head, weights N(0, 0.02^2) with output projections scaled by 1/sqrt(2 L); AdamW (0.9, 0.99,
eps 1e-8) with weight decay 0.1 on matrices only, global-norm clipping at 1.0, the cosine
schedule with linear warmup. fp32, eager (no torch.compile). The batches are the ones our
pipeline gives for the config (research.data), so both sides do the same work.
torch is a benchmark dependency only (`pip install torch`), not one of the package's.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):

  def __init__(self, d: int, eps: float):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, cos, sin):
  """x [batch, heads, seq, head_dim], rotating pairs (x1, x2) of the two halves."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):

  def __init__(self, d, heads, d_ff, eps):
    super().__init__()
    self.heads = heads
    self.attn_norm, self.ffn_norm = RMSNorm(d, eps), RMSNorm(d, eps)
    self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
    self.gate, self.up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
    self.down = nn.Linear(d_ff, d, bias=False)

  def forward(self, x, cos, sin):
    b, t, d = x.shape
    h = self.attn_norm(x)
    q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
               for p in (self.q, self.k, self.v))
    y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
    x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
    h = self.ffn_norm(x)
    return x + self.down(F.silu(self.gate(h)) * self.up(h))


class GPT(nn.Module):

  def __init__(self, vocab, d, layers, heads, d_ff, seq_len, eps=1e-5, theta=10000.0):
    super().__init__()
    self.embed = nn.Embedding(vocab, d)
    self.blocks = nn.ModuleList(Block(d, heads, d_ff, eps) for _ in range(layers))
    self.norm = RMSNorm(d, eps)
    half = d // heads // 2
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None, :]
    self.register_buffer("cos", angles.cos(), persistent=False)
    self.register_buffer("sin", angles.sin(), persistent=False)
    for name, p in self.named_parameters():
      if p.ndim == 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o.weight", "down.weight")) else 0.02
        nn.init.normal_(p, std=std)

  def forward(self, tokens):
    x = self.embed(tokens)
    t = tokens.shape[1]
    for block in self.blocks:
      x = block(x, self.cos[:t], self.sin[:t])
    return self.norm(x) @ self.embed.weight.T  # tied head


def cosine(step, lr, warmup, steps, floor):
  if step < warmup:
    return lr * step / max(warmup, 1)
  progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
  return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make(c, seed: int = 0):
  torch.manual_seed(seed)
  m = c["model"]
  model = GPT(m["vocab_size"], m["d_model"], m["num_layers"], m["num_heads"],
              m["channel"]["d_ff"], c["data"]["seq_len"], eps=m["norm_eps"],
              theta=m["attention"]["rope_theta"])
  t = c["train"]
  decay = [p for p in model.parameters() if p.ndim >= 2]
  rest = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=t["lr"], betas=(t["b1"], t["b2"]), eps=t["eps"], foreach=True)
  return model, opt


def train_steps(model, opt, c, batches, start: int = 0) -> float:
  """Trains on `batches` (numpy int32 {inputs, targets}); returns the last loss."""
  t = c["train"]
  loss = None
  for i, b in enumerate(batches):
    for group in opt.param_groups:
      group["lr"] = cosine(start + i, t["lr"], t["warmup_steps"], t["steps"], t["min_lr_ratio"])
    inputs, targets = torch.from_numpy(b["inputs"]), torch.from_numpy(b["targets"]).long()
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_norm"])
    opt.step()
  return float(loss.detach())


def measure(c, batches, *, warmup: int, steps: int, repeats: int) -> list[float]:
  """Seconds per step of `repeats` timed windows of `steps` steps, after `warmup` steps."""
  model, opt = make(c)
  train_steps(model, opt, c, batches[:warmup])
  times = []
  for r in range(repeats):
    window = batches[warmup + r * steps: warmup + (r + 1) * steps]
    t0 = time.perf_counter()
    train_steps(model, opt, c, window, start=warmup + r * steps)
    times.append((time.perf_counter() - t0) / steps)
  return times


def config_and_batches(spec: str, n: int):
  """The resolved config of `spec` (as a dict) and its first `n` training batches."""
  from research import run_config  # pylint: disable=import-outside-toplevel
  from research import data, experiments  # pylint: disable=import-outside-toplevel
  from research.train.trainer import make_data  # pylint: disable=import-outside-toplevel
  c = run_config.resolve(experiments.get_config(spec))
  corpus = data.load_tokenized(c.data)
  c.model.vocab_size = c.model.vocab_size or corpus.tokenizer.vocab_size
  train_iter, _ = make_data(c, corpus)
  return c.to_dict(), [next(train_iter) for _ in range(n)]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--spec", default="baseline:scale=tiny,corpus=tinyshakespeare")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  args = p.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  c, batches = config_and_batches(args.spec, args.warmup + args.steps * args.repeats)
  times = measure(c, batches, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
  tokens = c["train"]["batch_size"] * c["data"]["seq_len"]
  print(json.dumps({"peer": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                    "step_s": times, "tokens_per_s": tokens / min(times)}))


if __name__ == "__main__":
  main()
