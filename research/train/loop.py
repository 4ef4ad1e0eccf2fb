"""The training loop, over one run or over the seeds of one config stacked into one program.

A *seat* is one run in the loop: its Trainer (work directory, log, files), its BuiltRun, its
checkpointer and what it restored. `train_seats` trains one seat with the jitted step, or
several seats whose configs differ only in their seed as one `jax.vmap` of that step over a
leading seed axis of the state and the batch (seed-stacked training): each seed keeps its own
parameters, optimizer state, data order (its own iterator) and dropout key (its seed), logs to
its own metrics.jsonl, saves its own checkpoints (the seed's slice of the stack, in the format
of a single run, so any seed resumes alone or in a stack) and ends with its own summary. A
stacked seed's numbers equal its single run's up to the rounding of batched matmuls
(tests/test_stacked.py states the tolerance); a single seat runs exactly the program it always
did.

Per step: the step runs; every `log_every` steps each seat's pending metrics are fetched and
logged; every `eval.every` steps each seat is evaluated; every `checkpoint_every` steps each
seat is saved (in the background: research/checkpoint.py). The progress bar's rate and
the logged tokens/s are the training step's: evaluation, whose time its line states, and the
checkpoint hand-off are left out of both (the bar's elapsed time is the wall clock's). A stop
request (Ctrl-C, SIGTERM) is acted on between steps: every seat is saved where it stands. A
seat whose loss stops being finite ends there with a diverged summary
(`train.stop_on_divergence`); the others go on.

A width expansion (`train.expand`, research/train/expand.py) happens between steps: after step
t_e (logged, as is t_e + 1: the loss jump) every seat's run and state are replaced by the grown
ones (Trainer.build_expanded) and the program is rebuilt and compiled, stacked or not. A
checkpoint at a step <= t_e holds the model before the expansion, one after it the grown model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from research import sharding
from research.eval import lm_eval
from research.train import expand as expand_lib
from research.train import interrupt
from research.train import mfu as mfu_lib
from research.checkpoint import CheckpointError

LOGGED_PREFIXES = ("aux/", "stat/", "grad_norm/")
STEPS_AHEAD = 2  # steps the host may dispatch beyond the last one the device has finished


def fetch(tree):
  """Device values to host numpy (replicated values of a multi-process run included)."""
  return jax.tree.map(sharding.to_host, tree)


def pending_log_state(fetched: list) -> dict:
  """The metrics of steps trained since the last log line (on the host), as JSON for a
  checkpoint."""
  if not fetched:
    return {}
  keys = list(fetched[0])
  return {"metrics": {k: [float(m[k]) for m in fetched] for k in keys},
          "dtypes": {k: np.asarray(fetched[0][k]).dtype.name for k in keys}}


def pending_from_log_state(log_state: dict) -> list:
  """The inverse of pending_log_state: per-step dicts of numpy scalars of the logged dtypes."""
  metrics, dtypes = log_state.get("metrics", {}), log_state.get("dtypes", {})
  n = len(next(iter(metrics.values()))) if metrics else 0
  return [{k: np.asarray(v[i], dtypes.get(k, "float32")) for k, v in metrics.items()}
          for i in range(n)]


@dataclasses.dataclass
class Restored:
  """What a resumed run takes over from its work directory."""
  step: int = 0
  pending: list = dataclasses.field(default_factory=list)  # metrics of steps not yet logged
  rows: list = dataclasses.field(default_factory=list)  # metrics.jsonl rows up to `step`


@dataclasses.dataclass
class Seat:
  """One run in the loop (see the module docstring)."""
  trainer: Any  # research.train.trainer.Trainer
  run: Any  # research.train.trainer.BuiltRun
  ckpt: Any  # research.checkpoint.Checkpointer
  state: dict  # the state to start from
  restored: Restored
  metrics_file: Any = None
  scores: dict = dataclasses.field(default_factory=dict)
  last_valid: tuple = (float("nan"), float("nan"))
  last_valid_step: int = -1
  train_loss: float = float("nan")
  data_state: dict | None = None
  summary: dict | None = None  # set when the seat has finished (or diverged)

  def __post_init__(self):
    for row in self.restored.rows:  # the last evaluation and train loss so far
      if row.get("split") == "valid":
        self.last_valid = (row["loss"], row.get("bpb", float("nan")))
        self.last_valid_step = row["step"]
        for name in self.run.every_eval:  # the evaluators' last values
          if name in row:
            self.scores[f"valid_{name}"] = row[name]
      elif row.get("split") == "train":
        self.train_loss = row["loss"]

  def write(self, record: dict) -> None:
    if self.metrics_file is not None:  # process 0 writes for all
      self.metrics_file.write(json.dumps(record) + "\n")
      self.metrics_file.flush()

  def log(self, message: str) -> None:
    self.trainer.log(message)


class _Precompiled:
  """A jitted (params, other, batch) function compiled ahead of time for each batch shape of
  `batches`; other shapes go through the jitted function."""

  def __init__(self, fn, state, batches):
    self.fn, self.compiled = fn, {}
    for b in batches:
      key = self.key(b)
      if key not in self.compiled:
        self.compiled[key] = fn.lower(state["params"], state["other"], b).compile()

  @staticmethod
  def key(batch) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(batch.items()))

  def __call__(self, params, other, batch):
    return self.compiled.get(self.key(batch), self.fn)(params, other, batch)


class _Program:
  """The step, evaluation and slicing of one seat (plain) or of stacked seats (vmapped)."""

  def __init__(self, seats: list[Seat]):
    self.seats = seats
    self.stacked = len(seats) > 1
    r = seats[0].run
    # metrics of the steps since the last log line: per step a dict of scalars (one seat) or of
    # [seeds] arrays; a resumed run's first ones were saved with its checkpoint, so its log
    # lines are the uninterrupted run's
    restored = [s.restored.pending for s in seats]
    self.pending = list(restored[0]) if not self.stacked else [
        {k: np.stack([p[j][k] for p in restored]) for k in restored[0][j]}
        for j in range(len(restored[0]))]
    if not self.stacked:
      self.state = seats[0].state
      self.step_fn = r.step_fn
      self.eval_step = r.eval_step
      self.every_eval = dict(r.every_eval)  # name -> (step, score)
      return
    self.state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.state for s in seats])
    self.keys = jnp.stack([jax.random.key(s.run.config.seed) for s in seats])
    self.step_fn = jax.jit(jax.vmap(r.step_with_key), donate_argnums=0)
    self.eval_step = jax.jit(jax.vmap(r.eval_step, in_axes=(0, 0, None)))
    self.every_eval = {name: (jax.jit(jax.vmap(step, in_axes=(0, 0, None))), score)
                       for name, (step, score) in r.every_eval.items()}

  def compile_eval(self, state, valid_batches) -> None:
    """Compiles the evaluation steps for the shapes of `valid_batches` now, at start-up: a
    first evaluation that compiles pauses training for the compile, and the steps right after
    a compile ran ~30% slower (tiny baseline on 2 CPU cores)."""
    self.eval_step = _Precompiled(self.eval_step, state, valid_batches)
    self.every_eval = {name: (_Precompiled(step, state, valid_batches), score)
                       for name, (step, score) in self.every_eval.items()}

  def batch(self, host_batches: list[dict]) -> dict:
    """The device batch of this step from each seat's host batch."""
    if not self.stacked:
      seat = self.seats[0]
      return seat.trainer.put_batch(seat.run, host_batches[0])
    return {k: jnp.asarray(np.stack([np.asarray(b[k]) for b in host_batches]))
            for k in host_batches[0]}

  def compile(self, batch):
    if not self.stacked:
      return self.step_fn.lower(self.state, batch).compile()
    compiled = self.step_fn.lower(self.state, batch, self.keys).compile()
    return lambda state, b: compiled(state, b, self.keys)

  def slice(self, state, i: int):
    return state if not self.stacked else jax.tree.map(lambda x: x[i], state)

  def pending_per_seat(self) -> list[list[dict]]:
    """Every seat's pending metrics, on the host, from one fetch."""
    fetched = fetch(self.pending)
    if not self.stacked:
      return [fetched]
    return [[{k: v[i] for k, v in m.items()} for m in fetched] for i in range(len(self.seats))]

  def evaluate(self, state, valid_batches) -> list[float]:
    if not self.stacked:
      return [lm_eval.evaluate(self.eval_step, state["params"], state["other"], valid_batches)]
    return lm_eval.evaluate(self.eval_step, state["params"], state["other"], valid_batches)

  def scores(self, state, valid_batches) -> dict[str, list[float]]:
    """Every every_eval evaluator's value per seat."""
    out = {}
    for name, (step, score) in self.every_eval.items():
      value = score(step, state["params"], state["other"], valid_batches)
      out[name] = [value] if not self.stacked else value
    return out


def train_seats(seats: list[Seat], stop: interrupt.StopRequests) -> list[dict]:
  """Trains the seats (one run, or the stacked seeds of one config) to the end; returns their
  summaries. Checkpointers are closed on the way out."""
  try:
    summaries = _loop(seats, stop)
  except BaseException:
    for seat in seats:
      try:
        seat.ckpt.close()
      except CheckpointError:
        pass  # the error being raised already says what stopped the run
    raise
  for seat in seats:
    seat.ckpt.close()
  return summaries


def _expand(seats: list[Seat], program: _Program, state) -> tuple[_Program, Any]:
  """Every seat's run and state grown by its width expansion (research/train/expand.py), and
  the program of the grown seats, carrying the metrics not yet logged."""
  for i, seat in enumerate(seats):
    spec, before = expand_lib.spec_of(seat.run.config), seat.run.summary["params"]
    seat.run, seat.state = seat.trainer.build_expanded(seat.run, program.slice(state, i))
    if seat.summary is None:
      seat.log(f"step {spec.step}: width expansion ({spec.describe()}): "
               f"{before / 1e6:.3f}M -> {seat.run.summary['params'] / 1e6:.3f}M parameters")
  grown = _Program(seats)
  grown.pending = program.pending
  return grown, grown.state


def _loop(seats: list[Seat], stop: interrupt.StopRequests) -> list[dict]:
  first = seats[0]
  r, c = first.run, first.run.config
  t = c.train
  program = _Program(seats)
  state = program.state
  start = int(sharding.to_host(program.slice(state, 0)["step"]))
  tokens_per_step = t.batch_size * c.data.seq_len
  flops_per_step = r.summary["flops_per_token_train"] * tokens_per_step
  # a width expansion (train.expand) after this many steps: the seats' runs are replaced by the
  # grown ones there; the steps on either side of it are logged (the loss jump)
  expand_at = expand_lib.expand_step(c) if start <= expand_lib.expand_step(c) else 0
  forced_logs = {1, t.steps} | ({expand_at, expand_at + 1} if expand_at else set())
  peak = mfu_lib.peak_flops_per_device() * jax.device_count()
  bytes_per_token = r.corpus.valid_bytes_per_token
  primary = first.trainer.primary
  valid_batches = [first.trainer.put_batch(r, b) for b in r.valid_batches]
  live = [s for s in seats if s.summary is None]

  def run_eval(step):
    losses = program.evaluate(state, valid_batches)
    scores = program.scores(state, valid_batches)
    for i, seat in enumerate(seats):
      if seat.summary is not None:
        continue
      loss = losses[i]
      bpb = lm_eval.bits_per_byte(loss, bytes_per_token)
      record = {"split": "valid", "step": step, "loss": loss, "bpb": bpb}
      for name, values in scores.items():  # e.g. exact_match: MQAR accuracy / fact recall
        record[name] = seat.scores[f"valid_{name}"] = values[i]
      seat.write(record)
      seat.last_valid, seat.last_valid_step = (loss, bpb), step
    return losses

  def next_batch():
    for seat in seats:
      seat.data_state = seat.run.train_iter.get_state()
    return program.batch([next(seat.run.train_iter) for seat in seats])

  with contextlib.ExitStack() as files, sharding.use_mesh(r.mesh):
    for seat in seats:
      if seat.trainer.primary:
        seat.metrics_file = files.enter_context(open(seat.trainer.workdir / "metrics.jsonl", "a"))
    # The next batch is taken while the device runs the current step; the iterator state saved
    # in a checkpoint is the one from *before* that prefetch, so resume is exact.
    batch = next_batch() if start < t.steps else None
    if batch is None:
      for seat in seats:
        seat.data_state = seat.run.train_iter.get_state()
    compiled = program.compile(batch) if batch is not None else None
    if compiled is not None and valid_batches:
      program.compile_eval(state, valid_batches)
    label = "" if len(seats) == 1 else f"{len(seats)} seeds "
    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and primary),
               dynamic_ncols=True, unit="step", desc=label or None, file=sys.stderr)
    interval_start, interval_steps = time.perf_counter(), 0
    train_time, trained_steps = 0.0, 0  # this session's, without evaluation and checkpoints
    step = saved_step = start
    while step < t.steps and live:
      if stop.requested:
        # A stop is only acted on here, between steps, where (step, state, data_state) agree;
        # an interrupt raised mid-step could pair a state with the wrong iterator position.
        bar.close()
        pending = program.pending_per_seat()
        for i, seat in enumerate(seats):
          if seat.summary is None and saved_step != step:
            seat.ckpt.save(step, program.slice(state, i), seat.data_state,
                           pending_log_state(pending[i]), force=True)
        for seat in live:
          seat.ckpt.wait()
          where = (f"checkpoint saved in {seat.trainer.workdir / 'checkpoints'}" if step > 0
                   else "nothing trained yet")
          seat.log(f"interrupted at step {step}: {where}; run the same command again to resume")
        stop.check()
      if expand_at and step == expand_at:  # the expansion and its compile are not timed
        paused = time.perf_counter()
        program, state = _expand(seats, program, state)
        compiled = program.compile(batch)
        if valid_batches:
          program.compile_eval(state, valid_batches)
        flops_per_step = seats[0].run.summary["flops_per_token_train"] * tokens_per_step
        interval_start += time.perf_counter() - paused
      state, metrics = compiled(state, batch)
      step += 1
      program.pending.append(metrics)
      interval_steps += 1
      if step < t.steps:
        batch = next_batch()
      if len(program.pending) > STEPS_AHEAD:
        # Dispatch is asynchronous: unchecked, the host runs tens of steps ahead of the device,
        # the bar counts steps dispatched rather than trained, and every log line, evaluation
        # or checkpoint (which need the device's results) first drains that queue: the bar
        # then shows the rate collapsing at each of them and racing after. Holding the host
        # STEPS_AHEAD steps ahead keeps the device fed (the next step is always queued) and
        # the bar true.
        jax.block_until_ready(program.pending[-1 - STEPS_AHEAD]["loss"])
      bar.update(1)
      if step % t.log_every == 0 or step in forced_logs:
        # wait for the step just dispatched, so the interval's time is its steps' (not what was
        # dispatched by then; the first interval would otherwise time a dispatch alone)
        jax.block_until_ready(program.pending[-1])
        now = time.perf_counter()
        elapsed = now - interval_start
        tokens_per_s = interval_steps * tokens_per_step / elapsed  # per seat
        pending = program.pending_per_seat()
        for i, seat in enumerate(seats):
          if seat.summary is not None:
            continue
          fetched = pending[i]
          seat.train_loss = float(np.mean([m["loss"] for m in fetched]))
          record = {"split": "train", "step": step, "loss": seat.train_loss,
                    "lr": float(fetched[-1]["lr"]),
                    "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_per_step * interval_steps * len(seats) / elapsed / peak,
                    "time": time.time()}
          for k in fetched[-1]:
            if k.startswith(LOGGED_PREFIXES):
              record[k] = float(np.mean([m[k] for m in fetched]))
          seat.write(record)
        program.pending = []
        bar.set_postfix(loss=f"{live[0].train_loss:.4f}",
                        tok_s=f"{tokens_per_s * len(seats):,.0f}")
        train_time += elapsed
        trained_steps += interval_steps
        interval_steps, interval_start = 0, now
        for i, seat in enumerate(seats):
          if seat.summary is None and not math.isfinite(seat.train_loss):
            seat.log(f"training diverged at step {step} (loss {seat.train_loss})")
            if t.stop_on_divergence:
              seat.summary = seat.trainer._finish(  # pylint: disable=protected-access
                  seat.run, step, (math.inf, math.inf), seat.train_loss, trained_steps,
                  train_time, diverged=True)
        live = [s for s in seats if s.summary is None]
        if not live:
          break
      paused = time.perf_counter()
      if step % c.eval.every == 0 or step == t.steps:
        losses = run_eval(step)
        if primary:
          bar.write(f"step {step}: valid loss "
                    + ", ".join(f"{losses[i]:.4f}" for i, s in enumerate(seats)
                                if s.summary is None)
                    + (f", {live[0].last_valid[1]:.4f} bits/byte" if len(seats) == 1 else "")
                    + f" ({time.perf_counter() - paused:.1f} s)")
      if step % t.checkpoint_every == 0 or step == t.steps:
        pending = program.pending_per_seat()
        for i, seat in enumerate(seats):
          if seat.summary is None:
            seat.ckpt.save(step, program.slice(state, i), seat.data_state,
                           pending_log_state(pending[i]))
        saved_step = step
      pause = time.perf_counter() - paused
      interval_start += pause
      if not bar.disable:  # the bar's rate (not its elapsed time) leaves the pause out
        bar.last_print_t += pause
    if live and any(seat.last_valid_step != step for seat in live):
      run_eval(step)  # resumed at the end (killed before its summary): evaluate
  bar.close()
  summaries = []
  for i, seat in enumerate(seats):
    if seat.summary is None:
      seat.ckpt.wait()
      seat.summary = seat.trainer._finish(  # pylint: disable=protected-access
          seat.run, step, seat.last_valid, seat.train_loss, trained_steps, train_time,
          state=program.slice(state, i),
          valid_batch=valid_batches[0] if valid_batches else None, extra=seat.scores)
    summaries.append(seat.summary)
  return summaries
