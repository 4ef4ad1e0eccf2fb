"""Start-up time against depth: building the model (parameters created and placed) and compiling
the training step, on the current device.

  python bench/startup.py                                  # baseline small (width 768), L = 4, 12, 32
  python bench/startup.py --spec moda:scale=small --layers 4,12
  python bench/startup.py --jit_init                       # also the former one-program init
  python bench/startup.py --set model.scan_blocks=on       # blocks as one scan

`--jit_init` times the initializer as one jitted program with the parameters' shardings as its
outputs (what research.model.create_model did before 2026-12-04), for comparison.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from research import run_config
from research import experiments
from research import sharding
from research.model import DecoderLM, abstract_model, create_model, param_shardings
from research.train.optim import make_optimizer
from research.train.trainer import make_train_step


def jit_init(cfg, mesh):
  """The former form: the whole initializer as one jitted program."""
  graphdef, abstract_state = nnx.split(abstract_model(cfg, jnp.float32))
  shardings = param_shardings(abstract_state, mesh)

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(DecoderLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))

  with sharding.use_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, jax.block_until_ready(state))


def measure(spec: str, layers: int, vocab: int, with_jit_init: bool, overrides: dict) -> dict:
  c = run_config.resolve(experiments.get_config(spec, {**overrides, "model.num_layers": layers}))
  c.model.vocab_size = c.model.vocab_size or vocab
  mesh = sharding.make_mesh("dp", devices=jax.devices()[:1])
  out = {}
  if with_jit_init:
    t = time.perf_counter()
    jit_init(c.model, mesh)
    out["jit_init_s"] = time.perf_counter() - t
  t = time.perf_counter()
  model = create_model(c.model, mesh=mesh)
  jax.block_until_ready(nnx.state(model))
  out["build_s"] = time.perf_counter() - t
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(c.train)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
           "opt_state": jax.eval_shape(tx.init, params)}
  batch = {k: jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len), jnp.int32)
           for k in ("inputs", "targets")}
  t = time.perf_counter()
  with sharding.use_mesh(mesh):
    jax.jit(make_train_step(graphdef, tx, schedule, c)).lower(state, batch).compile()
  out["step_compile_s"] = time.perf_counter() - t
  out["params_m"] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--spec", default="baseline:scale=small")
  p.add_argument("--layers", default="4,12,32")
  p.add_argument("--vocab", type=int, default=50257, help="when the config leaves it to the data")
  p.add_argument("--jit_init", action="store_true")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a dotted config override (repeatable)")
  args = p.parse_args()
  overrides = dict(item.split("=", 1) for item in args.set)
  print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
        f"{args.spec} {' '.join(args.set)}")
  print("| layers | params | build (s) | " + ("one-program init (s) | " if args.jit_init else "")
        + "train-step compile (s) |")
  print("|---|---|---|" + ("---|" if args.jit_init else "") + "---|")
  for n in (int(x) for x in args.layers.split(",")):
    r = measure(args.spec, n, args.vocab, args.jit_init, overrides)
    jit = f" {r['jit_init_s']:.1f} |" if args.jit_init else ""
    print(f"| {n} | {r['params_m']:.0f}M | {r['build_s']:.1f} |{jit} {r['step_compile_s']:.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
