"""`research report` of this experiment calls analyze(): the table of every sequence-mixer arm
of the recurrent-mixer experiments that share the tiny setting (research/mixer_table.py)."""

from __future__ import annotations

from research import mixer_table


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del runs_root, out_dir
  return mixer_table.markdown(experiment, groups)
