"""One table of every sequence-mixer arm of the recurrent-mixer experiments (retnet, gla,
deltaproduct, matmul_free), which share the tiny setting with the softmax baseline, so a reader
sees which mixer wins here and what each costs: `research report` of each of them ends with it
(their analysis.py calls `markdown`).

Rows come from each experiment's committed results (experiments/<name>/results/results.json),
the experiment being reported from its fresh groups: valid loss, the extrapolation evaluator's
loss on the last 64 tokens of 128-, 256- and 512-token windows (`tail`; exact match for the
state-tracking task), and the training step time. The decoding columns come from
`bench/decode_latency.py --json` (bench/results/decode_latency.json: per mixer kind, latency per
token and the bytes the cache holds after a 4K-token context), stated with its device and date.
"""

from __future__ import annotations

import json
from pathlib import Path

from research import experiments, report, run_config

EXPERIMENTS = ("retnet", "gla", "deltaproduct", "matmul_free")
DECODE_JSON = Path(__file__).resolve().parents[1] / "bench" / "results" / "decode_latency.json"
DECODE_CONTEXT = "4096"
LENGTHS = ("128", "256", "512")


def _setting(experiment: str, arg: str, overrides: dict) -> dict:
  c = run_config.resolve(experiments.get_config(f"{experiment}:{arg}", overrides))
  m = c.model
  kind = m.attention.kind
  detail = ""
  if kind == "retention":
    r = m.attention.retention
    detail = (f"{r.decay}" + (f" γ={r.gamma:g}" if r.decay == "fixed" else "")
              + ("" if r.gate else ", no gate") + ("" if r.head_norm else ", no head norm"))
  elif kind == "gla":
    g = m.attention.gla
    detail = f"gate {g.gate}, τ={g.tau:g}" + ("" if g.output_gate else ", no output gate")
  elif kind == "deltaproduct":
    p = m.attention.deltaproduct
    detail = (f"n_h={p.householder}, β∈(0,{2 if p.neg_eigval else 1})"
              + (", gated" if p.gate else ""))
  elif kind == "mlgru":
    g = m.attention.mlgru
    detail = ("lower bound" if g.lower_bound else "no lower bound") + f", {g.output} gate"
  if m.linear.kind != "plain":
    detail += (", " if detail else "") + m.linear.kind
  return {"kind": kind, "detail": detail, "heads": m.num_heads, "d_ff": m.channel.d_ff,
          "corpus": c.data.corpus + (f" {c.data.synthetic.group}"
                                     if c.data.corpus == "group" else ""),
          "lr": c.train.lr}


def _decode(path: Path) -> dict:
  if not path.is_file():
    return {}
  return json.loads(path.read_text())


def markdown(experiment: str, groups: list[dict], results_root: str | Path | None = None,
             decode_json: str | Path | None = None) -> str:
  """The cross-experiment mixer table (Markdown), with `groups` the reported experiment's."""
  root = Path(results_root) if results_root else experiments.experiments_dir()
  decode = _decode(Path(decode_json) if decode_json else DECODE_JSON)
  rows, seen = [], set()
  for name in EXPERIMENTS:
    for group in report.experiment_groups(name, root, {experiment: groups}):
      for row in group.get("arms", []):
        loss = row.get("valid_loss") or {}
        if loss.get("mean") is None or (name, row["arm"]) in seen:
          continue
        seen.add((name, row["arm"]))
        try:
          setting = _setting(name, group.get("arg", ""), row.get("overrides") or {})
        except Exception as err:  # noqa: BLE001  (a config today's code no longer builds)
          setting = {"kind": f"? ({type(err).__name__})", "detail": "", "heads": "?",
                     "d_ff": "?", "corpus": "?", "lr": "?"}
        rows.append((setting["corpus"], loss["mean"], name, row, setting))
  if not rows:
    return ""
  kinds = decode.get("kinds", {})
  lines = ["## Every sequence-mixer arm of the shared tiny setting\n",
           "Per corpus, sorted by valid loss (mean ± std over seeds). Extrapolation: the loss on "
           "the last 64 tokens of windows of 128 / 256 / 512 tokens (trained at 64; on the "
           "state-tracking task, the fraction of running products right on held-out "
           "instances of that length). Step: seconds per stacked 3-seed step during the sweep "
           "(another sweep on the other core)."
           + (f" Decoding (`{decode.get('command', 'bench/decode_latency.py')}`, "
              f"{decode.get('device', '?')}, jax {decode.get('jax', '?')}, "
              f"{decode.get('date', '?')}): ms per token and cache KB after a {DECODE_CONTEXT}"
              f"-token context, per mixer kind at the tiny shape." if kinds else "") + "\n",
           "| corpus | experiment | arm | mixer | heads | d_ff | valid loss | "
           + " | ".join(f"@{n}" for n in LENGTHS) + " | step (s) | decode ms @4K | cache KB @4K |",
           "|---" * (10 + len(LENGTHS)) + "|"]
  for corpus, _, name, row, st in sorted(rows, key=lambda r: (r[0], r[1])):
    loss = row["valid_loss"]
    spread = f" ± {loss['std']:.4f}" if loss.get("std") is not None else ""
    ext = row.get("extrapolation") or {}
    metric = "exact_match" if corpus.startswith("group") else "tail"
    cells = [report.number_or_dash((ext.get(n) or {}).get(metric)) for n in LENGTHS]
    dec = (kinds.get(st["kind"]) or {}).get(DECODE_CONTEXT) or {}
    mixer = st["kind"] + (f" ({st['detail']})" if st["detail"] else "")
    kb = dec.get("cache_bytes")
    lines.append(
        f"| {corpus} | {name} | {row['arm']} | {mixer} | {st['heads']} | {st['d_ff']} | "
        f"{loss['mean']:.4f}{spread} (n={len(loss['values'])}) | " + " | ".join(cells)
        + f" | {report.number_or_dash(row.get('step_time_s'))} | {report.number_or_dash(dec.get('ms'), 2)} | "
        + (f"{kb / 1024:,.0f}" if kb is not None else "—") + " |")
  return "\n".join(lines) + "\n"
