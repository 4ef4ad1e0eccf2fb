"""`research report frac_connections` calls analyze(): one heat map of the learned static
connection matrices per arm (mean over seeds; research/eval/connections.py)."""

from research.eval import connections


def analyze(experiment, runs_root, groups, out_dir) -> str:
  return connections.report_section(experiment, runs_root, [g["group"] for g in groups], out_dir)
