"""`research report gatepro` calls analyze(): the table of every router arm of the MoE
experiments that share the tiny setting (research/router_table.py)."""

from __future__ import annotations

from research import router_table


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del runs_root, out_dir
  return router_table.markdown(experiment, groups)
