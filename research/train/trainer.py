"""The generic trainer: one jitted step, exact resume, metrics, checkpoints, progress.

A run lives in a work directory:

  config.json     resolved config, experiment and overrides, git revision, package versions
  metrics.jsonl   one JSON object per line: {"split": "train", "step", "loss", "lr",
                  "grad_norm", "tokens_per_s", "mfu", "time", "aux/<name>", "stat/<name>"...} and
                  {"split": "valid", "step", "loss", "bpb"} (+ "exact_match" on a synthetic task)
  checkpoints/    orbax: train state (params, optimizer state, step) and data-iterator state
  summary.json    written when the run finishes
  loss.png        the run's loss curves
  lock            held by the process training here (research/train/workdir.py)

Re-running the same command on the same work directory resumes from the last checkpoint; on CPU
the resumed run is bit-identical to an uninterrupted one, because everything that varies per
step (batch, dropout key) is a function of (seed, step) or of the restored iterator state, and
its metrics.jsonl is cut back to the restored step first, so it holds each step once. What a
changed config does to a run on disk (resume, extend, refuse, restart) is workdir.plan's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import optax

from research import config as config_lib
from research import data as data_lib
from research import eval as eval_lib  # the evaluators' loader: each is imported by its name
from research import run_config
from research import sharding
from research.eval import lm_eval
from research.model.context import positions_for
from research.model import ForwardContext, create_model, compute_dtype, model_summary
from research.model import abstract_model, lr_multipliers, param_shardings
from research.model import overhead as overhead_lib
from research.errors import RunError
from research.train import expand as expand_lib
from research.train import interrupt
from research.train import loop as loop_lib
from research.train import workdir as workdir_lib
from research.checkpoint import CheckpointError, Checkpointer
from research.train import optim
from research.train import lowbit
from research.train.optim import make_optimizer
from research.train.workdir import config_differences  # noqa: F401  (re-exported)

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "ml_collections", "tokenizers")


def git_revision() -> str:
  root = Path(__file__).resolve().parents[2]
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (rev or "unknown") + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def _abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
  """x's shape and dtype with `sharding` (default: x's own)."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding)


def make_train_step(graphdef, tx, schedule, cfg, stats=None):
  """Builds `step(state, batch) -> (state, metrics)`; state = {step, params, other, opt_state}.

  The batch [batch, seq] is split into `train.grad_accum` micro-batches whose gradients are
  averaged in a scan. The dropout key of each micro-batch is fold_in(fold_in(seed, step), i).
  `step.with_key(state, batch, seed_key)` is the same step with the seed's key an argument
  (what seed-stacked training vmaps over; research/train/loop.py). `stats(params, step)`: more
  statistics of the updated parameters, logged as `stat/<name>` (a width expansion's).
  """
  accum = cfg.train.grad_accum or 1  # 0 ("fit the memory") is decided by Trainer._resolve
  deterministic = cfg.model.dropout == 0.0
  base_key = jax.random.key(cfg.seed)

  def loss_fn(params, other, inputs, targets, key, progress=None):
    model = nnx.merge(graphdef, params, other)
    ctx = ForwardContext(positions=positions_for(inputs), deterministic=deterministic,
                         dropout_key=key, progress=progress)
    logits = model(inputs, ctx)
    loss = lm_eval.cross_entropy(logits, targets).mean()
    aux = dict(ctx.aux_losses)
    total = loss + sum(aux.values()) if aux else loss
    # statistics (ctx.add_stat) ride beside the aux losses to the log, outside the objective
    aux.update({f"stat/{k}": jax.lax.stop_gradient(v) for k, v in ctx.stats().items()})
    return total, (loss, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_with_key(state, batch, seed_key):
    params, other = state["params"], state["other"]
    key = jax.random.fold_in(seed_key, state["step"])
    progress = state["step"].astype(jnp.float32) / max(cfg.train.steps, 1)
    if accum == 1:
      (_, (loss, aux)), grads = grad_fn(params, other, batch["inputs"], batch["targets"], key,
                                        progress)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (_, (loss, aux)), grads = grad_fn(params, other, mb["inputs"], mb["targets"],
                                          jax.random.fold_in(key, i), progress)
        acc_g, acc_l, acc_a = carry
        return (jax.tree.map(jnp.add, acc_g, grads), acc_l + loss,
                jax.tree.map(jnp.add, acc_a, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      _, (_, (_, aux0)) = jax.eval_shape(
          lambda: (0, loss_fn(params, other, micro["inputs"][0], micro["targets"][0], key,
                              progress)))
      aux_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), aux_zero), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      aux = jax.tree.map(lambda a: a / accum, aux)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
    if cfg.train.log_layer_grad_norms:
      metrics.update(block_grad_norms(grads))
    metrics.update({k if k.startswith("stat/") else f"aux/{k}": v for k, v in aux.items()})
    # the optimizer's own diagnostics (low-bit states: swamping), beside the forward's statistics
    metrics.update({f"stat/opt_{k}": v for k, v in lowbit.state_stats(opt_state).items()})
    if stats is not None:
      metrics.update({f"stat/{k}": v for k, v in stats(params, state["step"]).items()})
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def step(state, batch):
    return step_with_key(state, batch, base_key)

  step.with_key = step_with_key
  return step


def block_grad_norms(grads) -> dict[str, jax.Array]:
  """{"grad_norm/block_<i>": norm} from the gradient State of a DecoderLM's parameters: the
  profile over depth that shows growth (pre-norm) or vanishing (post-norm) toward the input."""
  blocks = grads["blocks"]
  if not all(isinstance(k, int) for k in blocks.keys()):  # stacked blocks (model.scan_blocks)
    squares = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                  for g in jax.tree.leaves(blocks))
    return {f"grad_norm/block_{i:02d}": jnp.sqrt(squares[i]) for i in range(squares.shape[0])}
  return {f"grad_norm/block_{i:02d}": optax.tree.norm(blocks[i]) for i in sorted(blocks.keys())}


@dataclasses.dataclass
class BuiltRun:
  """Everything a training run holds once built; `Trainer.build` makes it, and
  `Trainer.build_expanded` the run after a width expansion (train.expand) from it."""
  config: Any
  mesh: jax.sharding.Mesh
  corpus: Any
  graphdef: Any
  state: dict  # the fresh state (a grown run built to restore into: ShapeDtypeStructs)
  step_fn: Any
  eval_step: Any
  train_iter: Any
  valid_batches: list
  batch_sharding: Any
  summary: dict
  # the every_eval evaluators that apply: name -> (step (params, other, batch), score)
  every_eval: dict = dataclasses.field(default_factory=dict)
  at_end: list = dataclasses.field(default_factory=list)  # the at_end evaluators' modules
  step_with_key: Any = None  # the unjitted step with the seed key an argument (stacking)


def make_data(c, corpus):
  """(train iterator, fixed validation batches) of the resolved config `c` over `corpus`, this
  process's share of them; a data setting that cannot work (a passkey prompt that does not fit
  a window, a validation split too small) fails here, before training."""
  pi, pc = jax.process_index(), jax.process_count()
  mix = None
  if c.data.passkey_mix > 0:
    mix = data_lib.PasskeyMix(c.data.passkey_mix, corpus.tokenizer, c.data.passkey_keys,
                              c.data.passkey_key_len)
  train_iter = data_lib.make_train_iterator(
      corpus.train, seq_len=c.data.seq_len, batch_size=c.train.batch_size // pc, seed=c.seed,
      process_index=pi, process_count=pc, aligned=getattr(corpus, "task", None) is not None,
      mix=mix, split=corpus.split)
  e = c.eval
  valid_batches = data_lib.make_valid_batches(
      corpus.valid, seq_len=c.data.seq_len, batch_size=e.batch_size // pc,
      num_batches=e.batches, process_index=pi, process_count=pc, split=corpus.split)
  return train_iter, valid_batches


def _sync_processes(name: str) -> None:
  """A barrier of all processes of a multi-process run (nothing to do in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


class Trainer:
  """Trains `config` in `workdir`; `run()` returns the summary dict.

  `restart`: discard a run already in `workdir` and start over (otherwise a different config
  there is refused; workdir.plan). Errors are typed (research.errors) with one-line messages.
  """

  def __init__(self, config, workdir: str | Path, *, experiment: str = "", arg: str = "",
               overrides: dict | None = None, log=print, restart: bool = False,
               fork: tuple[str | Path, int] | None = None):
    self.raw_config = config
    self.workdir = Path(workdir)
    self.experiment, self.arg, self.overrides = experiment, arg, dict(overrides or {})
    self.log = log
    self.restart = restart
    # (work directory, step): a new run starts from that run's checkpoint (its parameters,
    # optimizer state and data position) under this config, e.g. an annealed branch
    self.fork = fork
    self.primary = True  # process 0 of a multi-process run (set in run())

  # ---------------------------------------------------------------- set-up
  def _resolve(self):
    c = run_config.resolve(self.raw_config)
    corpus = data_lib.load_tokenized(c.data)
    vocab = corpus.tokenizer.vocab_size
    if c.model.vocab_size == 0:
      c.model.vocab_size = vocab
    elif c.model.vocab_size < vocab:
      raise config_lib.ConfigError(
          f"model.vocab_size={c.model.vocab_size} is smaller than the tokenizer's {vocab}")
    self._check_memory(c)
    return c, corpus

  def _check_memory(self, c) -> None:
    """Sizes gradient accumulation when the config leaves it open (train.grad_accum = 0): the
    fewest micro-batches whose memory, as research.plan estimates it, fits the devices. With an
    explicit value, says so when the estimate does not fit."""
    from research import plan as plan_lib  # pylint: disable=import-outside-toplevel
    devices = jax.devices()[:c.mesh.num_devices or None]
    try:
      cluster = plan_lib.local_cluster(devices)
      dtype_bytes = jnp.dtype(compute_dtype(c.train.precision)).itemsize
      if c.train.grad_accum == 0:
        c.train.grad_accum, p = plan_lib.fit_grad_accum(c, cluster, dtype_bytes)
        self.log(f"train.grad_accum=0: {c.train.grad_accum} micro-batch(es) per step, "
                 f"~{p.bytes_total / plan_lib.GIB:.1f} GiB per device of "
                 f"{cluster.memory_gib:.0f} (research plan's estimate)")
      else:
        p = plan_lib.estimate(c, cluster, dtype_bytes=dtype_bytes)
      if not p.fits:
        self.log(f"warning: research plan estimates ~{p.bytes_total / plan_lib.GIB:.1f} GiB per "
                 f"device, more than {plan_lib.FIT_FRACTION:.0%} of its "
                 f"{cluster.memory_gib:.0f} GiB: the step may run out of memory (raise "
                 "train.grad_accum, or lower train.batch_size or data.seq_len)")
    except config_lib.ConfigError:
      raise
    except Exception as e:  # an estimate must never stop a run the devices could hold
      if c.train.grad_accum == 0:
        c.train.grad_accum = 1
      self.log(f"note: no memory estimate ({type(e).__name__}: {e}); train.grad_accum="
               f"{c.train.grad_accum}")

  def _write_config(self, c, note: str = "", *, forked: bool = False) -> None:
    record = {"experiment": self.experiment, "arg": self.arg, "overrides": self.overrides,
              "config": c.to_dict(), "git_revision": git_revision(),
              "packages": package_versions()}
    previous = workdir_lib.read_record(self.workdir)
    if forked:  # a new run's history starts with where it was forked from
      previous = {}
    workdir_lib.write_record(self.workdir, record, previous, note)

  def build(self, c=None, corpus=None) -> BuiltRun:
    if c is None:
      c, corpus = self._resolve()
    mesh = sharding.mesh_from_config(c.mesh)
    t = c.train
    if t.batch_size % jax.process_count():
      raise config_lib.ConfigError(
          f"train.batch_size={t.batch_size} does not divide over {jax.process_count()} processes")
    # Each micro-batch (the whole batch when grad_accum = 1) is split over the data axes.
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    micro = t.batch_size // t.grad_accum
    if micro % data_parallel:
      raise config_lib.ConfigError(
          f"train.batch_size={t.batch_size} (micro-batch {micro} with train.grad_accum="
          f"{t.grad_accum}) does not divide over the {data_parallel}-way data-parallel mesh "
          f"({sharding.describe(mesh)}); change the batch or mesh.num_devices")
    dtype = compute_dtype(t.precision)
    model = create_model(c.model, mesh=mesh, seed=c.seed, dtype=dtype)
    summary = model_summary(model, c.data.seq_len)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(t, lr_multipliers(c.model, t.steps), seed=c.seed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with sharding.use_mesh(mesh):
      opt_state = optim.init_state(tx, params, replicated)  # moments sharded like parameters
    # optimizer-state bytes, and what fp32 AdamW's two moments would hold (low-bit states)
    summary["opt_state_bytes"] = lowbit.state_bytes(opt_state)
    summary["opt_state_bytes_fp32_adam"] = 8 * summary["params"]
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params,
             "other": other, "opt_state": opt_state}
    batch_sharding = sharding.named_sharding(("batch", "seq"), (t.batch_size, c.data.seq_len), mesh)
    train_iter, valid_batches = make_data(c, corpus)
    return self._steps(BuiltRun(
        config=c, mesh=mesh, corpus=corpus, graphdef=graphdef, state=state, step_fn=None,
        eval_step=lm_eval.make_eval_step(graphdef), train_iter=train_iter,
        valid_batches=valid_batches, batch_sharding=batch_sharding, summary=summary), tx, schedule)

  def _steps(self, r: BuiltRun, tx, schedule, stats=None) -> BuiltRun:
    """`r` with its jitted training step (of `tx`) and its evaluators' steps."""
    train_step = make_train_step(r.graphdef, tx, schedule, r.config, stats)
    r.step_fn = jax.jit(train_step, donate_argnums=0,
                        out_shardings=(jax.tree.map(lambda x: x.sharding, r.state), None))
    r.step_with_key = train_step.with_key
    r.every_eval, r.at_end = {}, []
    for name, evaluator in eval_lib.load(r.config.eval.evaluators):
      if evaluator.WHEN == "at_end":
        r.at_end.append(evaluator)
      elif (eval_step := evaluator.make_step(r.graphdef, r.corpus)) is not None:
        r.every_eval[name] = (eval_step, evaluator.score)
    return r

  def build_expanded(self, r: BuiltRun, state: dict | None = None) -> tuple[BuiltRun, dict]:
    """The run after train.expand's width expansion (research/train/expand.py), from the run
    `r` before it: the grown model's training step (AdamW plus the new slices' re-warmup),
    evaluation and summary, over r's data iterator and validation batches; and `state` (r's,
    at train.expand.step) expanded into it, or with `state` None the grown state's shapes and
    shardings (what a checkpoint after the expansion restores into)."""
    c, t = config_lib.grown_config(r.config), r.config.train
    spec = expand_lib.spec_of(r.config)
    dtype = compute_dtype(t.precision)
    # shapes only, outside the training loop's mesh (nnx would read the logical axis names as
    # mesh axes); the parameters get their shardings below
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      model = abstract_model(c.model, dtype)
    summary = model_summary(model, c.data.seq_len)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(other):
      raise RunError("train.expand: the model holds non-parameter variables, which the width "
                     "expansion does not grow")
    widths = expand_lib.plan(params, spec)
    schedule = optim.make_schedule(t)
    extra = []
    if t.expand.rewarm:  # §3.5: the new parameters' own schedule, after weight decay
      multiplier = expand_lib.rewarm_multiplier(schedule, start=spec.step, total=t.steps,
                                                rho=t.expand.rho, warmup=t.expand.warmup)
      extra.append(expand_lib.scale_new_by(multiplier, widths, spec.step))
    tx, schedule = make_optimizer(t, lr_multipliers(c.model, t.steps), seed=c.seed,
                                  extra=extra)
    replicated = jax.sharding.NamedSharding(r.mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda s, v: v.replace(_abstract(v.get_value(), s)),
                          param_shardings(params, r.mesh), params)
    opt_state = jax.tree.map(_abstract, jax.eval_shape(tx.init, params),
                             optim.state_shardings(tx, params, replicated))
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                "params": params, "other": jax.tree.map(_abstract, r.state["other"]),
                "opt_state": opt_state}
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    if state is not None:
      small_tx, _ = make_optimizer(t, lr_multipliers(r.config.model, t.steps), seed=c.seed)

      def grow(state):
        new_params, opt_state, _ = expand_lib.expand(state["params"], state["opt_state"], spec,
                                                     small_tx)
        opt_state = tuple(opt_state) + tuple(e.init(new_params) for e in extra)
        return dict(state, params=new_params, opt_state=opt_state)

      with sharding.use_mesh(r.mesh):
        state = jax.jit(grow, out_shardings=shardings)(state)
    tokens = t.batch_size * c.data.seq_len
    summary.update(
        opt_state_bytes=lowbit.state_bytes(abstract["opt_state"]),
        opt_state_bytes_fp32_adam=8 * summary["params"], expand_step=spec.step,
        params_before_expand=r.summary["params"],
        # 6 N D in both phases (the paper's Table 2 accounting, with attention's FLOPs)
        train_flops=tokens * (spec.step * r.summary["flops_per_token_train"]
                              + (t.steps - spec.step) * summary["flops_per_token_train"]))
    grown = dataclasses.replace(r, config=c, graphdef=graphdef, state=abstract, summary=summary,
                                eval_step=lm_eval.make_eval_step(graphdef))

    def stats(params, step):  # the copies' divergence: 0 while they stay locked (§3.3)
      del step
      return {"expand_divergence": expand_lib.divergence(params, widths)}

    return self._steps(grown, tx, schedule, stats), state

  def _describe(self, r: BuiltRun) -> None:
    c, s = r.config, r.summary
    tokens_per_step = c.train.batch_size * c.data.seq_len
    params = jax.tree.leaves(r.state["params"])
    largest = sorted(jax.tree.leaves_with_path(r.state["params"]), key=lambda kv: -kv[1].size)[:3]
    self.log(f"model: {s['params'] / 1e6:.3f}M parameters ({s['params_non_embedding'] / 1e6:.3f}M "
             f"non-embedding), {s['flops_per_token_train'] / 1e6:.2f} MFLOPs/token (train)")
    if s.get("params_activated", s["params"]) < s["params"]:
      self.log(f"  activated per token: {s['params_activated'] / 1e6:.3f}M parameters, "
               f"{s['param_bytes_per_token'] / 1e6:.3f} MB of parameters read")
    for o in overhead_lib.overheads(c.model, c.data.seq_len):
      self.log(f"  overhead: {overhead_lib.describe(o)}")
    self.log(f"optimizer: {c.train.get('optimizer', 'adamw')}, state "
             f"{s['opt_state_bytes'] / 1e6:.2f} MB (fp32 AdamW's moments: "
             f"{s['opt_state_bytes_fp32_adam'] / 1e6:.2f} MB)")
    self.log(f"data: {c.data.corpus}/{c.data.tokenizer} vocab {c.model.vocab_size}, "
             f"{len(r.corpus.train):,} train tokens; global batch {c.train.batch_size} x "
             f"{c.data.seq_len} = {tokens_per_step:,} tokens/step, {c.train.steps} steps")
    self.log(f"mesh: {sharding.describe(r.mesh)} on {jax.device_count()} {jax.default_backend()} "
             f"device(s); compute dtype {jnp.dtype(compute_dtype(c.train.precision)).name}; "
             f"{len(params)} parameter arrays")
    for path, x in largest:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      name = name.replace("/.value", "").removesuffix("/value")
      self.log(f"  {name} {tuple(x.shape)} sharded {x.sharding.spec}")

  # ---------------------------------------------------------------- running
  def put_batch(self, r: BuiltRun, batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(r.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def run(self) -> dict:
    """Trains (or resumes, extends, or reports finished) the run; returns its summary. Holds
    the work directory's lock throughout; Ctrl-C / SIGTERM stop it at the next safe point.

    Multi-process (mesh.distributed): every process trains, reads its own data shard and takes
    part in checkpoints (orbax writes one checkpoint from all); process 0 alone holds the lock
    and writes config.json, metrics.jsonl, summary.json and the plots, so the work directory
    must be on a file system every process sees.
    """
    sharding.initialize_distributed(self.raw_config.mesh)  # which process this is, first
    self.primary = jax.process_index() == 0
    if not self.primary:
      self.log = lambda *_: None
    lock = (workdir_lib.WorkdirLock(self.workdir, log=self.log) if self.primary
            else contextlib.nullcontext())
    with interrupt.handling_stops() as stop, lock:
      seat = self.prepare(stop)
      if isinstance(seat, dict):
        return seat
      return loop_lib.train_seats([seat], stop)[0]

  def prepare(self, stop: interrupt.StopRequests) -> "loop_lib.Seat | dict":
    """Everything before the first step, under the caller's lock: resolves the config, decides
    what the work directory means for it (workdir.plan), writes config.json, builds the run and
    restores its last checkpoint. Returns the seat to train, or the summary of a finished run."""
    stop.check("stopped before the run started")
    c, corpus = self._resolve()
    if self.restart and self.primary:
      workdir_lib.clear_run(self.workdir, self.log)
    _sync_processes("research: work directory ready")
    action, note = workdir_lib.plan(self.workdir, c.to_dict())
    if note:
      self.log(note)
    if action == "finished":
      done = workdir_lib.read_summary(self.workdir)
      self.log(f"run in {self.workdir} already finished at step {done['step']} (valid loss "
               f"{done['valid_loss']:.4f}{', diverged' if done.get('diverged') else ''}); "
               "nothing to do")
      return done
    if action == "extend" and self.primary:
      (self.workdir / "summary.json").unlink(missing_ok=True)
    forked = action == "new" and self.fork is not None
    if self.fork is not None and not forked:
      self.log(f"{self.workdir} already holds a run: --fork_from is not applied again")
    if forked and self.primary:
      note = workdir_lib.copy_fork(self.fork[0], int(self.fork[1]), self.workdir, c.to_dict())
      self.log(note)
    if forked:
      _sync_processes("research: fork copied")
    if self.primary:
      self._write_config(c, note, forked=forked)
    r = self.build(c, corpus)
    self._describe(r)
    stop.check("stopped before training: nothing was trained or saved")
    ckpt = Checkpointer(self.workdir / "checkpoints", keep=c.train.keep_checkpoints)
    try:
      r, state, restored = self._restore(r, ckpt)
    except BaseException:
      ckpt.close()
      raise
    return loop_lib.Seat(trainer=self, run=r, ckpt=ckpt, state=state, restored=restored)

  def _restore(self, r: BuiltRun, ckpt: Checkpointer
               ) -> tuple[BuiltRun, dict, "loop_lib.Restored"]:
    """The run and state to start from: the newest readable checkpoint's, with the iterator
    position and unlogged metrics it saved, and metrics.jsonl cut back to its step; else r's
    fresh state. A checkpoint after train.expand.step holds the grown model: the run is then
    the grown one (build_expanded)."""
    at = expand_lib.expand_step(r.config)
    grown = []

    def abstract(step: int):
      if at and step > at:
        if not grown:
          grown.append(self.build_expanded(r)[0])
        return grown[0].state
      return jax.tree.map(_abstract, r.state)

    latest = ckpt.restore_latest(abstract, log=self.log)
    metrics = self.workdir / "metrics.jsonl"
    step = 0 if latest is None else latest[0]
    if self.primary:  # a run killed before its first checkpoint starts its metrics over
      rows = workdir_lib.cut_metrics(metrics, step)
    else:  # the same rows, read only
      rows = [row for row in workdir_lib.read_metrics(metrics) if row["step"] <= step]
    if latest is None:
      return r, r.state, loop_lib.Restored()
    step, state, data_state, log_state = latest
    r.train_iter.set_state(data_state)
    if at and step > at:
      r = grown[0]
      self.log(f"step {step} is past the width expansion at step {at}: the grown model "
               f"({r.summary['params'] / 1e6:.3f}M parameters) resumes")
    self.log(f"resumed from step {step} ({self.workdir / 'checkpoints'})")
    return r, state, loop_lib.Restored(step, loop_lib.pending_from_log_state(log_state), rows)

  def _finish(self, r: BuiltRun, step: int, last_valid, train_loss: float, trained_steps: int,
              train_time: float, *, diverged: bool = False, state=None, valid_batch=None,
              extra: dict | None = None) -> dict:
    """Writes summary.json (and loss.png): the run is finished, or ended as diverged (a train
    or valid loss that is not finite)."""
    diverged = diverged or not math.isfinite(last_valid[0])
    tokens_per_step = r.config.train.batch_size * r.config.data.seq_len
    summary = {"step": step, "valid_loss": last_valid[0], "valid_bpb": last_valid[1],
               "train_loss": train_loss,
               "tokens_per_s": trained_steps * tokens_per_step / max(train_time, 1e-9),
               "params": r.summary["params"], "diverged": diverged}
    summary["step_time_s"] = train_time / max(trained_steps, 1)
    for k in ("params_activated", "flops_per_token_fwd", "param_bytes_per_token", "opt_state_bytes",
              "opt_state_bytes_fp32_adam", "expand_step", "params_before_expand", "train_flops"):
      if k in r.summary:
        summary[k] = r.summary[k]
    summary.update(extra or {})
    if state is not None and valid_batch is not None:
      model = nnx.merge(r.graphdef, state["params"], state["other"])
      for evaluator in r.at_end:
        try:
          summary.update(evaluator.at_end(
              model, tokens=valid_batch["inputs"], workdir=self.workdir,
              title=f"{self.experiment}: {self.arg}", primary=self.primary))
        except Exception as e:  # an end-of-run measurement must never cost a finished run
          self.log(f"evaluator {evaluator.__name__.rsplit('.', 1)[-1]} failed on "
                   f"{self.workdir}: {e}")
    if not self.primary:  # process 0 writes the run's files
      return summary
    (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
      from research import report
      report.plot_run(self.workdir)
    except Exception as e:  # a plot must never cost a finished run
      self.log(f"could not plot {self.workdir}: {e}")
    if diverged:
      self.log(f"diverged: step {step}, train loss {train_loss:.4g}, valid loss "
               f"{last_valid[0]:.4g}; {self.workdir} (summary.json marks it diverged)")
    else:
      self.log(f"done: step {step}, valid loss {last_valid[0]:.4f}, {last_valid[1]:.4f} "
               f"bits/byte, {summary['tokens_per_s']:,.0f} tokens/s; {self.workdir}")
    return summary


def train(config, workdir, **kwargs) -> dict:
  """Convenience wrapper: `Trainer(config, workdir, ...).run()`."""
  return Trainer(config, workdir, **kwargs).run()


def _unstackable(seats: list) -> str | None:
  """Why these seats cannot train as one seed-stacked program, or None."""
  first = seats[0].run
  if first.mesh.size > 1 or jax.process_count() > 1:
    return f"seed stacking runs on one device, this mesh has {first.mesh.size}"
  steps = {int(sharding.to_host(s.state["step"])) for s in seats}
  if len(steps) > 1:
    return f"the runs are at different steps ({sorted(steps)})"
  base = first.config.to_dict()
  for s in seats[1:]:
    diffs = [k for k in config_differences(base, s.run.config.to_dict()) if k != "seed"]
    if diffs:
      return f"their configs differ in {', '.join(diffs)}, not only in the seed"
  return None


def train_seeds(trainers: list[Trainer]) -> list[dict]:
  """Trains runs whose configs differ only in the seed (one arm's seeds, each in its own work
  directory) as one seed-stacked program (research/train/loop.py); returns their summaries in
  order. Finished runs are reported as they are; runs that cannot stack (a multi-device mesh,
  runs resumed at different steps) train one after another."""
  if len(trainers) == 1:
    return [trainers[0].run()]
  out: list[dict | None] = [None] * len(trainers)
  with interrupt.handling_stops() as stop, contextlib.ExitStack() as held:
    for t in trainers:
      held.enter_context(workdir_lib.WorkdirLock(t.workdir, log=t.log))
    seats = []
    # the seats not yet handed to train_seats (which closes the checkpointers of those it
    # trains): closed here if something stops the rest
    groups = [seats]
    try:
      for i, t in enumerate(trainers):
        seat = t.prepare(stop)
        if isinstance(seat, dict):
          out[i] = seat
        else:
          seats.append((i, seat))
      reason = _unstackable([s for _, s in seats]) if len(seats) > 1 else None
      if reason:
        trainers[0].log(f"seeds train one after another: {reason}")
      groups = [seats] if reason is None else [[x] for x in seats]
      while groups:
        group = groups.pop(0)
        for (i, _), summary in zip(group, loop_lib.train_seats([s for _, s in group], stop)):
          out[i] = summary
    except BaseException:
      for group in groups:
        for _, seat in group:
          try:
            seat.ckpt.close()
          except CheckpointError:
            pass
      raise
  return out
