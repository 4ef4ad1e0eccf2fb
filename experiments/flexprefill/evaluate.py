"""The FlexPrefill evaluation sweep on trained checkpoints, in one command.

  python experiments/flexprefill/evaluate.py --workdir runs/flexprefill/train/dense/seed0 \
      [--workdir ...seed1 ...] [--groups dense,grid,fixed_budget,vertical_slash,min_budget] \
      [--arms NAME,...] [--lengths 256,512] [--examples 8] [--keys 4] [--ppl_windows 8] \
      [--continuation 128] [--batch_size 4] [--out DIR] [--data_dir DIR]

For every run directory (one per seed) and every arm of sweep.eval_arms() (prefill overrides
on the run's own parameters; "dense" always runs first, as the reference):
  * passkey and multi-key retrieval accuracy (research/eval/retrieval.py) per prompt length
    (default: the training context and its half), greedy, exact match, and the fraction
    of key characters right (a graded score; its chance level is in the table's caption);
  * perplexity of the last `continuation` tokens of validation windows of the training context
    after prefilling the rest (research/eval/long_ppl.py), and its change against dense;
  * density: the fraction of causal blocks the sparse prefill computed, on the perplexity
    windows (real text) and on the retrieval prompts.
Writes results.json and results.md (mean ± std over the runs) to --out (default
<first workdir>/flexprefill_eval).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from research import data as data_lib
from research.eval import long_ppl, retrieval
from research.infer import Engine, load_run, with_overrides


def _sweep_module():
  path = Path(__file__).with_name("sweep.py")
  spec = importlib.util.spec_from_file_location("flexprefill_eval_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def select_arms(groups: list[str] | None, names: list[str] | None):
  """[(group, Arm)] in sweep order, the dense reference first."""
  table = _sweep_module().eval_arms()
  unknown = sorted(set(groups or []) - set(table))
  if unknown:
    raise SystemExit(f"evaluate: unknown groups {', '.join(unknown)} (known: {', '.join(table)})")
  chosen = [(g, a) for g in table for a in table[g]
            if g == "dense" or ((not groups or g in groups) and (not names or a.name in names))]
  missing = sorted(set(names or []) - {a.name for _, a in chosen})
  if missing:
    raise SystemExit(f"evaluate: unknown arms {', '.join(missing)}")
  return chosen


def evaluate_run(workdir: str, arms, args, log=print) -> dict:
  overrides = {"data.data_dir": args.data_dir} if args.data_dir else None
  run = load_run(workdir, overrides=overrides)
  context = run.config.data.seq_len
  lengths = args.lengths or [context // 2, context]
  corpus = data_lib.load_tokenized(run.config.data)
  continuation = args.continuation or max(context // 8, 2)
  windows = long_ppl.long_windows(corpus.valid, context, args.ppl_windows)
  max_new = 16  # > any answer's tokens (retrieval adds its own margin)
  out = {"workdir": str(workdir), "step": run.step, "context": context, "lengths": lengths,
         "arms": {}}
  for group, arm in arms:
    start = time.perf_counter()
    model = with_overrides(run.model, arm.overrides)
    engine = Engine(model, max_len=max(max(lengths), context) + max_new)
    common = dict(lengths=lengths, num_examples=args.examples, batch_size=args.batch_size,
                  engine=engine, seed=args.seed)
    res = {"group": group, "overrides": arm.overrides,
           "passkey": retrieval.retrieval_eval(model, corpus.tokenizer, corpus.valid, **common),
           "multikey": retrieval.retrieval_eval(model, corpus.tokenizer, corpus.valid,
                                                num_keys=args.keys, **common),
           "ppl": long_ppl.continuation_nll(model, windows, prefix_len=context - continuation,
                                            batch_size=args.batch_size, engine=engine)}
    if arm.name != "dense":
      res["ppl"].update(long_ppl.ppl_delta(res["ppl"], out["arms"]["dense"]["ppl"]))
    out["arms"][arm.name] = res
    log(f"{workdir} {arm.name}: ppl {res['ppl']['ppl']:.3f}, passkey "
        f"{res['passkey']['accuracy']:.2f}, density {res['ppl']['density']} "
        f"({time.perf_counter() - start:.0f}s)")
  return out


def _mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def markdown(results: list[dict]) -> str:
  """One row per arm: mean ± std over the runs."""
  first = results[0]
  lengths = first["lengths"]
  head = (["arm", "group", "density (ppl)", "density (passkey)"]
          + [f"passkey@{n}" for n in lengths] + [f"multikey@{n}" for n in lengths]
          + ["passkey chars", "multikey chars", "ppl", "Δppl vs dense", "rel Δppl"])
  lines = [f"FlexPrefill evaluation: {len(results)} run(s), context {first['context']}, "
           f"continuation {first['arms']['dense']['ppl']['continuation_len']} tokens; density "
           "= fraction of causal blocks computed (mean over layers, heads, prompts); chars = "
           "fraction of key characters right, mean over lengths (chance "
           f"{first['arms']['dense']['passkey'].get('chance', float('nan')):.3f}).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, arm in first["arms"].items():
    per = [r["arms"][name] for r in results]
    longest = [p["passkey"]["lengths"][lengths[-1]]["density"] for p in per]
    row = [name, arm["group"], _mean_std([p["ppl"]["density"] for p in per]), _mean_std(longest)]
    row += [_mean_std([p["passkey"]["lengths"][n]["accuracy"] for p in per]) for n in lengths]
    row += [_mean_std([p["multikey"]["lengths"][n]["accuracy"] for p in per]) for n in lengths]
    row += [_mean_std([p[task].get("char_accuracy") for p in per])
            for task in ("passkey", "multikey")]
    row += [_mean_std([p["ppl"]["ppl"] for p in per]),
            _mean_std([p["ppl"].get("delta_ppl") for p in per]),
            _mean_std([p["ppl"].get("rel_ppl") for p in per])]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", action="append", required=True, help="a trained run (repeatable)")
  p.add_argument("--groups", type=lambda s: [x for x in s.split(",") if x])
  p.add_argument("--arms", type=lambda s: [x for x in s.split(",") if x])
  p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x])
  p.add_argument("--examples", type=int, default=8, help="retrieval prompts per length")
  p.add_argument("--keys", type=int, default=4, help="needles of the multi-key task")
  p.add_argument("--ppl_windows", type=int, default=8)
  p.add_argument("--continuation", type=int, default=0, help="scored tokens (0: context / 8)")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out")
  p.add_argument("--data_dir")
  return p.parse_args(argv)


def main(argv=None) -> Path:
  args = parse_args(argv)
  arms = select_arms(args.groups, args.arms)
  results = [evaluate_run(w, arms, args) for w in args.workdir]
  out = Path(args.out) if args.out else Path(args.workdir[0]) / "flexprefill_eval"
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
  (out / "results.md").write_text(markdown(results))
  print(f"wrote {out / 'results.md'}")
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
