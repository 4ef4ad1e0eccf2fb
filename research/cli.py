"""The `research` command.

  research list
  research run NAME[:ARG] [--config.key=value ...] [--workdir DIR] [--data_dir DIR] [--restart]
                          [--fork_from DIR --fork_step S]
  research sweep NAME [--group G] [--seeds N] [--arg ARG] [--arms A,B] [--runs_dir DIR]
                      [--skip_reported] [--no_stack_seeds] [--config.key=value ...]
  research report NAME [--group G] [--runs_dir DIR] [--out DIR]
  research scoreboard [--out DIR]
  research plan NAME[:ARG] [--cluster C ...] [--mfu F] [--no_lower] [--config.key=value ...]
  research merge WORKDIR --every V [--last N] [--method sma|ema|wma] [--alpha A] [--step S]
                         [--out DIR] [--eval] [--data_dir DIR]
  research fit TABLE --target Y --terms N,D,log2:G [--holdout N=max,D=max] [--where C=V]
                     [--bootstrap B]
  research data list | fetch CORPUS

Exit status:
  0    done (or already finished)
  1    a checkpoint could not be written or read
  2    an error the user can fix (unknown experiment or key, a value out of range, a missing
       corpus, a bad mesh, a work directory that holds another run or is in use): one line
  3    the run diverged (its loss is not finite); summary.json marks it
  130  stopped by Ctrl-C, 143 by SIGTERM, after saving a checkpoint where training had begun
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from research import config as config_lib
from research import run_config
from research.errors import ResearchError
from research.train.interrupt import STOP

EXIT_DIVERGED = 3


def _split_overrides(extra: list[str]) -> dict[str, str]:
  """Parses `--config.a.b=v` and `--config.a.b v` into {"a.b": "v"}; anything else is an error."""
  out: dict[str, str] = {}
  i = 0
  while i < len(extra):
    tok = extra[i]
    if not tok.startswith("--config."):
      raise config_lib.ConfigError(f"unrecognized argument '{tok}' (overrides look like --config.train.lr=3e-4)")
    key = tok[len("--config."):]
    if "=" in key:
      key, value = key.split("=", 1)
    elif i + 1 < len(extra):
      i += 1
      value = extra[i]
    else:
      raise config_lib.ConfigError(f"override '{tok}' has no value")
    out[key] = value
    i += 1
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="research", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="experiments, their scales and claims")
  r = sub.add_parser("run", help="train one experiment configuration")
  r.add_argument("spec", help="NAME or NAME:ARG, e.g. baseline:scale=smoke")
  r.add_argument("--workdir", help="run directory (default runs/NAME/ARG)")
  r.add_argument("--data_dir", help="directory holding the corpora (or $RESEARCH_DATA_DIR)")
  r.add_argument("--restart", action="store_true",
                 help="discard the run already in the work directory and start over")
  r.add_argument("--fork_from", help="a new run starts from this run directory's checkpoint "
                 "--fork_step (weights, optimizer state, data position) under its own config, "
                 "e.g. --config.train.schedule=wsd to anneal a branch")
  r.add_argument("--fork_step", type=int, help="the checkpoint step --fork_from starts from")
  s = sub.add_parser("sweep", help="run an experiment's ablation group, resumably")
  s.add_argument("name")
  s.add_argument("--group")
  s.add_argument("--seeds", type=int)
  s.add_argument("--arg", help="replace the sweep's experiment argument, e.g. scale=smoke")
  s.add_argument("--arms", help="comma-separated arm names to run (default: all)")
  s.add_argument("--runs_dir", default="runs")
  s.add_argument("--data_dir")
  s.add_argument("--skip_reported", action="store_true",
                 help="skip arms that experiments/NAME/results/results.json already reports "
                      "with every seed (the same overrides and argument)")
  s.add_argument("--no_stack_seeds", action="store_true",
                 help="train an arm's seeds one after another, not as one seed-stacked program")
  rep = sub.add_parser("report", help="tables and plots from a sweep's runs")
  rep.add_argument("name")
  rep.add_argument("--group", action="append", help="only this group (repeatable)")
  rep.add_argument("--runs_dir", default="runs")
  rep.add_argument("--out", help="output directory (default experiments/NAME/results)")
  sb = sub.add_parser(
      "scoreboard", help="every paper's headline arm against its baseline, from the committed "
      "results (experiments/SCOREBOARD.md, scoreboard.png)",
      description="Reads experiments/*/results/results.json (no runs directory) and writes "
      "SCOREBOARD.md and scoreboard.png: one row per headline arm an experiment's sweep.py "
      "declares (Sweep(headline=...)), with Δ valid loss and its 95% interval against the "
      "arm's own baseline, Δ parameters, Δ forward FLOPs per token, Δ step time, the verdict "
      "and whether the comparison is like-for-like with the common scoreboard setting. "
      "`research report` regenerates it.")
  sb.add_argument("--out", help="output directory (default: the experiments directory)")
  pl = sub.add_parser("plan", help="memory, fit and step time of a config on named clusters")
  pl.add_argument("spec", help="NAME or NAME:ARG, e.g. baseline:scale=paper")
  pl.add_argument("--cluster", action="append",
                  help="a cluster shape of research/plan.py CLUSTERS (repeatable; default: "
                       "h100x8, h100x64, v5p-256)")
  pl.add_argument("--mfu", type=float, default=0.4, help="the MFU the step time assumes")
  pl.add_argument("--vocab", type=int, default=50257,
                  help="vocabulary size when the config leaves it to the tokenizer")
  pl.add_argument("--no_lower", action="store_true",
                  help="skip lowering the train step on the abstract mesh")
  mg = sub.add_parser("merge", help="average a run's last checkpoints (SMA / EMA / WMA)")
  mg.add_argument("workdir", help="the run directory whose checkpoints are merged")
  mg.add_argument("--method", default="sma", help="sma | ema | wma")
  mg.add_argument("--last", type=int, default=10, help="N: how many checkpoints")
  mg.add_argument("--every", type=int, required=True, help="V: steps between them")
  mg.add_argument("--step", type=int, help="the newest checkpoint merged (default: the latest)")
  mg.add_argument("--alpha", type=float, default=0.2, help="ema's weight of the newer model")
  mg.add_argument("--out", help="output run directory (default WORKDIR/merged/<tag>)")
  mg.add_argument("--eval", action="store_true",
                  help="print the validation loss of the merge and of checkpoint S alone")
  mg.add_argument("--data_dir", help="directory holding the corpora (for --eval)")
  ft = sub.add_parser("fit", help="fit a power law to a table of runs (log-space least "
                      "squares, bootstrap intervals, a held-out corner)")
  ft.add_argument("table", help="CSV with a header, or a JSON list of objects")
  ft.add_argument("--target", required=True, help="the column the law predicts")
  ft.add_argument("--terms", required=True,
                  help="comma-separated factors: a column or log2:COLUMN (e.g. N,D,log2:G)")
  ft.add_argument("--holdout", default="",
                  help="rows to predict from a fit without them, e.g. N=max,D=max")
  ft.add_argument("--where", default="",
                  help="fit only the rows matching column=value[,column=value], e.g. "
                  "precision=W4A4")
  ft.add_argument("--bootstrap", type=int, default=2000)
  ft.add_argument("--seed", type=int, default=0)
  ft.add_argument("--out", help="also write the fit as JSON here")
  d = sub.add_parser("data", help="list or fetch corpora")
  d.add_argument("action", choices=("list", "fetch"))
  d.add_argument("corpus", nargs="?")
  d.add_argument("--data_dir")
  return p


def _default_workdir(spec: str, overrides: dict[str, str] | None = None) -> Path:
  """runs/NAME/TAG: TAG names the argument and the overrides (not where the data lives), so
  runs of different configs never share a directory; a long one is cut and given a hash."""
  name, _, arg = spec.partition(":")
  parts = [arg] if arg else []
  parts += [f"{k}={v}" for k, v in sorted((overrides or {}).items()) if k != "data.data_dir"]
  tag = ",".join(parts).replace(",", "_").replace("=", "-").replace("/", "-") or "default"
  if len(tag) > 120:
    tag = tag[:100] + "_" + hashlib.sha1(tag.encode()).hexdigest()[:10]
  return Path("runs") / name / tag


def cmd_list() -> None:
  from research import experiments
  names = experiments.list_experiments()
  if not names:
    print(f"no experiments found in {experiments.experiments_dir()}")
  for name in names:
    claim, scales = experiments.describe(name)
    print(f"{name:20s} scales: {', '.join(scales) or '-':28s} {claim}")


def cmd_run(args, overrides) -> int:
  from research import experiments
  from research.train.trainer import Trainer
  if args.data_dir:
    overrides["data.data_dir"] = args.data_dir
  config = experiments.get_config(args.spec, overrides)
  name, arg = experiments.split_name(args.spec)
  workdir = Path(args.workdir) if args.workdir else _default_workdir(args.spec, overrides)
  if (args.fork_from is None) != (args.fork_step is None):
    raise config_lib.ConfigError("--fork_from and --fork_step go together")
  fork = (args.fork_from, args.fork_step) if args.fork_from else None
  summary = Trainer(config, workdir, experiment=name, arg=arg, overrides=overrides,
                    restart=args.restart, fork=fork).run()
  if summary.get("diverged"):
    print(f"research: the run diverged at step {summary['step']} (train loss "
          f"{summary.get('train_loss')}, valid loss {summary.get('valid_loss')}); "
          f"{workdir / 'summary.json'} marks it", file=sys.stderr)
    return EXIT_DIVERGED
  return 0


def cmd_sweep(args, overrides) -> None:
  from research.sweep import run_sweep
  arms = [a for a in args.arms.split(",") if a] if args.arms else None
  path = run_sweep(args.name, group=args.group, seeds=args.seeds, arg=args.arg, arms=arms,
                   runs_dir=args.runs_dir, overrides=overrides, data_dir=args.data_dir,
                   skip_reported=args.skip_reported, stack_seeds=not args.no_stack_seeds)
  print(f"sweep finished: {path}")


def cmd_report(args) -> None:
  from research import experiments, report
  experiments.load_config_module(args.name)  # unknown experiment -> clear error
  out = Path(args.out) if args.out else experiments.experiments_dir() / args.name / "results"
  path = report.report(args.name, args.runs_dir, out, groups=args.group)
  print(f"wrote {path}")
  if out.resolve() == (experiments.experiments_dir() / args.name / "results").resolve():
    try:  # the committed results changed: so does the scoreboard, never at the report's cost
      cmd_scoreboard()
    except Exception as e:  # noqa: BLE001
      print(f"research: warning: the scoreboard was not regenerated ({type(e).__name__}: {e}); "
            "run `research scoreboard`", file=sys.stderr)


def cmd_scoreboard(out: str | None = None) -> None:
  from research import scoreboard
  board = scoreboard.build()
  md, png = scoreboard.write(board, out)
  print(f"wrote {md} ({sum(r.measured for r in board.rows)} rows measured, "
        f"{sum(not r.measured for r in board.rows)} declared, not yet measured) and {png}")
  for problem in board.problems:
    print(f"research: warning: scoreboard: left out {problem}", file=sys.stderr)


def cmd_plan(args, overrides) -> None:
  from research import experiments, plan
  config = run_config.resolve(experiments.get_config(args.spec, overrides))
  if config.model.vocab_size == 0:
    config.model.vocab_size = args.vocab
  if not 0 < args.mfu <= 1:
    raise config_lib.ConfigError(f"--mfu={args.mfu} must be in (0, 1]")
  clusters = [plan.cluster(n) for n in (args.cluster or ["h100x8", "h100x64", "v5p-256"])]
  print(f"{args.spec}: {config.model.num_layers} layers x {config.model.d_model}, "
        f"batch {config.train.batch_size} x {config.data.seq_len}, mesh.preset "
        f"{config.mesh.preset}, remat {config.model.remat}")
  plans = []
  for cl in clusters:
    plans.append(plan.plan(config, cl, mfu=args.mfu, lower=not args.no_lower))
  print(f"{plans[0].params / 1e9:.2f}B parameters")
  print(plan.table(plans))


def cmd_merge(args) -> None:
  from research.train import merge
  out = merge.merge_run(args.workdir, method=args.method, last=args.last, every=args.every,
                        step=args.step, alpha=args.alpha, out=args.out)
  steps = json.loads((out / "merge.json").read_text())["steps"]
  print(f"merged {args.method} of steps {steps} into {out}")
  if args.eval:
    overrides = {"data.data_dir": args.data_dir} if args.data_dir else None
    merged = merge.validation_loss(out, overrides=overrides)
    latest = merge.validation_loss(args.workdir, step=steps[-1], overrides=overrides)
    print(f"valid loss: merged {merged:.4f}, step {steps[-1]} alone {latest:.4f} "
          f"({merged - latest:+.4f})")


def cmd_fit(args) -> None:
  import dataclasses
  from research import fit
  rows = fit.select(fit.load_table(args.table), args.where)
  result = fit.fit(rows, args.target, args.terms.split(","),
                   holdout=args.holdout, bootstrap=args.bootstrap, seed=args.seed)
  print(result.describe())
  if args.out:
    Path(args.out).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")


def cmd_data(args) -> None:
  from research import data
  if args.action == "list":
    for info in data.list_corpora():
      where = "needs --data_dir" if info.needs_data_dir else "fetched on first use"
      print(f"{info.name:18s} {where:22s} {info.description}")
    return
  if not args.corpus:
    raise config_lib.ConfigError("research data fetch needs a corpus name (see `research data list`)")
  data.fetch_corpus(args.corpus, args.data_dir)


def main(argv: list[str] | None = None) -> int:
  args, extra = _parser().parse_known_args(argv)
  installed = False
  if args.command in ("run", "sweep"):
    # Before jax is imported: a Ctrl-C or SIGTERM from here on is acted on where it is safe
    # (research/train/interrupt.py), never inside native code.
    installed = STOP.install()
  try:
    return _dispatch(args, extra)
  finally:
    if installed:
      STOP.restore()


def _dispatch(args, extra) -> int:
  from research.checkpoint import CheckpointError
  code = 0
  try:
    overrides = _split_overrides(extra) if args.command in ("run", "sweep", "plan") else {}
    if extra and args.command not in ("run", "sweep", "plan"):
      raise config_lib.ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "list":
      cmd_list()
    elif args.command == "run":
      code = cmd_run(args, overrides)
    elif args.command == "sweep":
      cmd_sweep(args, overrides)
    elif args.command == "report":
      cmd_report(args)
    elif args.command == "scoreboard":
      cmd_scoreboard(args.out)
    elif args.command == "plan":
      cmd_plan(args, overrides)
    elif args.command == "merge":
      cmd_merge(args)
    elif args.command == "fit":
      cmd_fit(args)
    elif args.command == "data":
      cmd_data(args)
  except CheckpointError as e:
    print(f"research: checkpoint error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # A failed asynchronous save can leave the checkpointer's threads waiting forever;
    # nothing else is pending (metrics are flushed line by line), so leave at once.
    os._exit(1)
  except ResearchError as e:
    print(f"research: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    return getattr(e, "exit_code", 130)
  return code


if __name__ == "__main__":
  sys.exit(main())
