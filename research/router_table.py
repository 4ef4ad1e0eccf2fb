"""One table of every router arm of the MoE experiments that share the tiny MoE setting
(4 blocks of width 128, 16 SwiGLU experts of width 128, top-2, the Switch balance loss), so a
reader sees which router wins here: `research report` of each of them ends with it (their
analysis.py calls `markdown`).

Rows come from each experiment's committed results (experiments/<name>/results/results.json),
the experiment being reported from its fresh groups. Each row states the setting that differs
between the experiments (router, capacity factor, gate normalisation, balance and ERC weights),
read from the arm's resolved config, and the router statistics of the end of training (the
last 5 logs, mean over seeds).
"""

from __future__ import annotations

from pathlib import Path

from research import experiments, report, run_config

EXPERIMENTS = ("erc_loss", "gatepro", "max_score_routing")


def _setting(experiment: str, arg: str, overrides: dict) -> dict:
  m = run_config.resolve(experiments.get_config(f"{experiment}:{arg}", overrides)).model
  e = m.channel.moe
  router = e.router
  if router == "gatepro":
    g = e.gatepro
    router += f" λ={g.lam:g}" + (f" until {g.until:g}" if g.until < 1 else "") + (
        " mutual" if g.competition == "mutual" else "")
  elif router == "maxscore":
    router += f" τ0={e.maxscore.boost:g}"
  cf = "dropless" if e.dispatch == "dropless" else f"{e.capacity_factor:g}"
  return {"router": router, "cf": cf, "norm": "yes" if e.norm_topk else "no",
          "lbl": f"{e.aux_coef:g}", "erc": f"{e.erc_coef:g}"}


def markdown(experiment: str, groups: list[dict], results_root: str | Path | None = None) -> str:
  """The cross-experiment router table (Markdown), with `groups` the reported experiment's."""
  root = Path(results_root) if results_root else experiments.experiments_dir()
  rows, seen = [], set()
  for name in EXPERIMENTS:
    for group in report.experiment_groups(name, root, {experiment: groups}):
      for row in group.get("arms", []):
        loss = row.get("valid_loss") or {}
        key = (name, row["arm"])
        if key in seen or loss.get("mean") is None:
          continue
        seen.add(key)
        try:
          setting = _setting(name, group.get("arg", ""), row.get("overrides") or {})
        except Exception as err:  # noqa: BLE001  (a config today's code no longer builds)
          setting = {"router": f"? ({type(err).__name__})", "cf": "?", "norm": "?", "lbl": "?",
                     "erc": "?"}
        stats = row.get("stats") or {}
        rows.append((loss["mean"], name, row["arm"], setting, loss, stats,
                     row.get("step_time_s")))
  if not rows:
    return ""
  lines = ["## Every router arm of the shared tiny MoE setting\n",
           "Sorted by valid loss (mean ± std over seeds). Statistics at the end of training "
           "(mean of the last 5 logs and the seeds): dropped = share of token-expert "
           "assignments past capacity; load H = entropy of the expert load / log E; co-act = "
           "nearest-pair co-activation rate; |cos| = mean router-row |cos|; score = routed "
           "router probability per token. Step time: the 3 seeds stacked on one core while "
           "another sweep ran on the other (compare within a column, roughly).\n",
           "| experiment | arm | router | CF | norm top-k | LBL | ERC | valid loss | dropped "
           "| load H | co-act | \\|cos\\| | score | step (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for _, name, arm, st, loss, stats, step in sorted(rows, key=lambda r: r[0]):
    spread = f" ± {loss['std']:.4f}" if loss.get("std") is not None else ""
    lines.append(
        f"| {name} | {arm} | {st['router']} | {st['cf']} | {st['norm']} | {st['lbl']} | "
        f"{st['erc']} | {loss['mean']:.4f}{spread} (n={len(loss['values'])}) | "
        f"{report.number_or_dash(stats.get('moe_dropped'), 4)} | {report.number_or_dash(stats.get('moe_load_entropy'))} | "
        f"{report.number_or_dash(stats.get('moe_pair_coactive'))} | {report.number_or_dash(stats.get('moe_router_cos'))} | "
        f"{report.number_or_dash(stats.get('moe_routed_score'))} | {report.number_or_dash(step)} |")
  return "\n".join(lines) + "\n"
