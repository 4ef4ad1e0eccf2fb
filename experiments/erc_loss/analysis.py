"""`research report erc_loss` calls analyze(): for every arm of the swept groups, the ERC loss
of its trained experts and routers measured after training with the clean router rows (the
paper's Appendix A: L_ERC at alpha = 1, layer by layer, and the smallest alpha at which it is
zero), from each finished seed's last checkpoint, as a mean over the seeds; then the table of
every router arm of the MoE experiments sharing the tiny setting (research/router_table.py).

The smallest alpha that zeros L_ERC is max over i != j of max(M[i, j], M[j, i]) / M[i, i]:
every constraint of the loss holds once alpha M[i, i] reaches both off-diagonal entries.
The paper's vanilla 3B MoE needs alpha = 5 in every layer; its ERC model ends at L_ERC = 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from research import report as report_lib
from research import router_table
from research.infer import load_run
from research.model import moe


def _coupling(workdir: Path) -> tuple[list[float], list[float]]:
  """Per MoE layer: (L_ERC at alpha = 1 with the clean rows, the smallest alpha zeroing it)."""
  model = load_run(workdir).model
  losses, alphas = [], []
  for block in model.blocks:
    mixer = block.channel
    if not isinstance(mixer, moe.MoE):
      continue
    rows = mixer.router.kernel[...].T
    gate = mixer.experts.gate if mixer.experts.gated else mixer.experts.up
    m = np.asarray(moe.erc_matrix(rows, gate[...]), np.float64)
    own = np.diag(m)
    ratio = np.maximum(m / own[:, None], m.T / own[:, None])
    np.fill_diagonal(ratio, -np.inf)
    losses.append(float(moe.erc_loss(rows, gate[...], 1.0)))
    alphas.append(float(ratio.max()))
  return losses, alphas


def _last_stat(workdir: Path, key: str) -> float | None:
  value = None
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row.get("split") == "train" and key in row:
      value = row[key]
  return value


def _fmt(values) -> str:
  return " ".join(f"{v:.4f}" if v < 1 else f"{v:.2f}" for v in values)


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del out_dir
  return _coupling_table(runs_root, groups) + "\n" + router_table.markdown(experiment, groups)


def _coupling_table(runs_root, groups) -> str:
  lines = ["## Coupling after training (Appendix A)", "",
           "L_ERC at alpha = 1 with the clean router rows, per layer, and the smallest alpha "
           "that zeros it (mean over finished seeds, from their last checkpoints); the mean "
           "noise bound eps and the dropped fraction of the last logged training step.", "",
           "| group | arm | L_ERC (alpha 1) per layer | zeroing alpha per layer | eps | dropped |",
           "|---|---|---|---|---|---|"]
  rows = 0
  for group, arm, workdirs in report_lib.checkpointed_arms(runs_root, groups):
    found = [(w, _coupling(w)) for w in workdirs]
    loss = np.mean([c[0] for _, c in found], axis=0)
    alpha = np.mean([c[1] for _, c in found], axis=0)
    eps = [v for w, _ in found if (v := _last_stat(w, "stat/erc_eps")) is not None]
    dropped = [v for w, _ in found if (v := _last_stat(w, "stat/moe_dropped")) is not None]
    eps_text = f"{np.mean(eps):.3f}" if eps else "-"  # arms without noise log none
    dropped_text = f"{np.mean(dropped):.3f}" if dropped else "-"
    lines.append(f"| {group} | {arm.name} | {_fmt(loss)} | {_fmt(alpha)} | "
                 f"{eps_text} | {dropped_text} |")
    rows += 1
  return "\n".join(lines) + "\n" if rows else ""
