"""`research report phd_transformer` calls analyze(): every arm's training FLOPs, decode-time KV
entries and step time, and its validation loss against the FLOP-matched vanilla controls
(vanilla with 2x the layers, trained 2x or 3x the steps): the comparison at equal compute that
the paper does not make. Token counts are original tokens; FLOPs are research's analytic
count (3 x the forward, per original token: K copies through the blocks, attention over the
mask's keys), so an arm's training FLOPs are 3 x flops_per_token_fwd x steps x batch x seq_len.
"""

from __future__ import annotations

import functools

from research import experiments, run_config, verdict
from research.model import abstract_model, phd

EXPERIMENT = "phd_transformer"
CONTROLS = ("vanilla", "vanilla_2x_layers", "vanilla_2x_steps", "vanilla_3x_steps")
MATCH = 0.15  # a control matches an arm whose training FLOPs are within 15% of its own


@functools.lru_cache(maxsize=None)
def _config(arg: str, overrides: tuple):
  c = run_config.resolve(experiments.get_config(f"{EXPERIMENT}:{arg}", dict(overrides)))
  c.model.vocab_size = c.model.vocab_size or 65  # char-level Tiny Shakespeare
  return c


def costs(arg: str, overrides: dict) -> dict:
  """Analytic costs of an arm: training FLOPs, forward FLOPs per original token, and the KV
  entries per layer at decode after seq_len tokens (k and v each: the persistent cache, plus
  swa / cswa's hidden buffer; naive keeps every copy)."""
  c = _config(arg, tuple(sorted(overrides.items())))
  t = c.data.seq_len
  fwd = abstract_model(c.model).flops_per_token(t)
  s = phd.settings(c.model)
  kv = s.copies * t if s.kind == "naive" else t + s.buffer
  return dict(flops_fwd=fwd, train_flops=3 * fwd * c.train.steps * c.train.batch_size * t,
              kv_entries=kv, copies=s.copies, seq_len=t)


def _rows(groups: list[dict]) -> dict[str, dict]:
  """Every arm's row over the groups, the one with the most finished seeds per name."""
  out: dict[str, dict] = {}
  for group in groups:
    for row in group["arms"]:
      row = {**row, "arg": group.get("arg", "")}
      if row["seeds_finished"] >= out.get(row["arm"], {}).get("seeds_finished", -1):
        out[row["arm"]] = row
  return out


def _loss(row: dict) -> str:
  s = row.get("valid_loss") or {}
  if s.get("mean") is None:
    return "-"
  return f"{s['mean']:.4f} ± {'n/a' if s.get('std') is None else format(s['std'], '.4f')}"


def equal_flops_table(groups: list[dict]) -> str:
  rows = _rows(groups)
  if not rows:
    return ""
  cost = {name: costs(row["arg"], row.get("overrides") or {}) for name, row in rows.items()}
  arg = next(iter(rows.values()))["arg"]
  base = costs(arg, {"model.phd.kind": "none"})["train_flops"]  # the vanilla arm's
  lines = ["### Loss at equal training FLOPs\n",
           "Each arm against every vanilla control whose training FLOPs are within "
           f"{MATCH:.0%} of its own (Δ = arm - control; t and seeds by the verdict rule's "
           "comparison; no claim: the paper makes none at equal compute).\n",
           "| arm | train FLOPs (x vanilla) | valid loss | control (FLOPs x vanilla) "
           "| Δ vs control (t, seeds) | step time (ms) | KV entries / layer |",
           "|---|---|---|---|---|---|---|"]
  for name, row in rows.items():
    ratio = cost[name]["train_flops"] / base
    step = row.get("step_time_s")
    matched = [c for c in CONTROLS if c in rows and c != name
               and abs(cost[c]["train_flops"] / cost[name]["train_flops"] - 1) <= MATCH]
    cells = []
    for c in matched or [None]:
      if c is None:
        cells.append(("-", "-"))
        continue
      a, b = ((r.get("valid_loss") or {}).get("values") for r in (row, rows[c]))
      delta = verdict.compare(a, b).describe() if a and b else "-"
      cells.append((f"{c} ({cost[c]['train_flops'] / base:.2f})", delta))
    for control, delta in cells:
      lines.append(f"| {name} | {ratio:.2f} | {_loss(row)} | {control} | {delta} "
                   f"| {'-' if step is None else f'{1e3 * step:.0f}'} "
                   f"| {cost[name]['kv_entries']} |")
  return "\n".join(lines) + "\n"


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del experiment, runs_root, out_dir
  return equal_flops_table(groups)
