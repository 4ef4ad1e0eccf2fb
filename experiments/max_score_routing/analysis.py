"""`research report max_score_routing` calls analyze(): (1) routing at inference: each arm's
trained models (last checkpoints) evaluated on the validation batches with the routing they
were trained with and with plain top-k routing without capacity (what one-token-at-a-time
decoding can do: it has no group to share capacity with), mean over the seeds; MaxScore's
assignment of a sequence's tokens depends on later tokens of the sequence (the Sinkhorn plan
of its second choice), so its validation loss under its own routing may use information a
causal decoder does not have, and the top-k column is the one a decoder gets; (2) the table of
every router arm of the MoE experiments sharing the tiny setting (research/router_table.py).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from research import data as data_lib
from research import report as report_lib
from research import router_table
from research.eval import lm_eval
from research.infer import load_run
from research.train.trainer import make_data

TOPK_DROPLESS = {"model.channel.moe.router": "topk", "model.channel.moe.dispatch": "dropless"}


def _valid_loss(workdir: Path, overrides: dict | None) -> float:
  run = load_run(workdir, overrides=overrides)
  c = run.config
  _, batches = make_data(c, data_lib.load_tokenized(c.data))
  graphdef, params, other = nnx.split(run.model, nnx.Param, ...)
  step = jax.jit(lm_eval.make_eval_step(graphdef))
  return float(lm_eval.evaluate(step, params, other, batches))


def _inference_table(runs_root, groups) -> str:
  lines = ["## Routing at inference", "",
           "Validation loss of each arm's trained models with their training routing and "
           "with top-k routing without capacity (a decoder's routing), mean over the seeds "
           "(last checkpoints).", "",
           "| group | arm | own routing | top-k, no capacity | difference |", "|---|---|---|---|---|"]
  rows, seen = 0, set()
  for group, arm, workdirs in report_lib.checkpointed_arms(runs_root, groups):
    if arm.name in seen:  # an arm shown in several groups is evaluated once
      continue
    seen.add(arm.name)
    own = np.mean([_valid_loss(w, None) for w in workdirs])
    topk = np.mean([_valid_loss(w, TOPK_DROPLESS) for w in workdirs])
    lines.append(f"| {group} | {arm.name} | {own:.4f} | {topk:.4f} | {topk - own:+.4f} |")
    rows += 1
  return "\n".join(lines) + "\n" if rows else ""


def analyze(experiment, runs_root, groups, out_dir) -> str:
  del out_dir
  return _inference_table(runs_root, groups) + "\n" + router_table.markdown(experiment, groups)
