"""SPARKLING's width expansion (research/train/expand.py; experiments/sparkling): copy-copy at 2x
rescaled is function preserving, the RMS rule of each init at the expansion, the optimizer
state treatments and the symmetry lock they cause or break, the new parameters' re-warmup, a
run that expands and resumes across the expansion exactly, and the config errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import config as config_lib
from research import experiments
from research import run_config
from research.checkpoint import Checkpointer
from research.errors import ConfigError
from research.model import abstract_model, create_model
from research.train import expand as expand_lib
from research.train import optim
from research.train.trainer import Trainer, make_train_step, train_seeds


def config(**overrides):
  """A resolved tiny config (2 x 16, SwiGLU width 32, untied head) with dotted overrides."""
  c = run_config.default_config()
  c.model.vocab_size, c.model.num_layers, c.model.d_model, c.model.num_heads = 32, 2, 16, 2
  c.model.channel.d_ff = 32
  c.model.head.tie_embeddings = False
  c.data.seq_len = 8
  c.train.steps, c.train.warmup_steps, c.train.batch_size = 20, 2, 4
  config_lib.apply_overrides(c, {k.replace("__", "."): v for k, v in overrides.items()})
  return run_config.resolve(c)


def expanding(widths: dict, **overrides):
  x = {"train.expand.step": 3, "train.expand.warmup": 2,
       **{f"train.expand.{k}": v for k, v in widths.items()}}
  return config(**x, **{k.replace("__", "."): v for k, v in overrides.items()})


def batch(c, seed=0):
  x = jax.random.randint(jax.random.key(seed), (c.train.batch_size, c.data.seq_len + 1), 0,
                         c.model.vocab_size)
  return {"inputs": x[:, :-1], "targets": x[:, 1:]}


_STEPS = {}  # jitted train steps by config (the configs of one test differ in train.expand only)


def train_step(c):
  """The jitted train step of the resolved config `c` (AdamW without re-warmup)."""
  d = c.to_dict()
  d["train"].pop("expand", None)
  key = json.dumps(d, sort_keys=True)
  if key not in _STEPS:
    graphdef = nnx.split(abstract_model(c.model), nnx.Param, ...)[0]
    tx, schedule = optim.make_optimizer(c.train)
    _STEPS[key] = jax.jit(make_train_step(graphdef, tx, schedule, c))
  return _STEPS[key]


def train_state(c, steps=0):
  """(state, tx) of `c`'s model after `steps` steps on fixed batches."""
  params, other = nnx.split(create_model(c.model, seed=c.seed), nnx.Param, ...)[1:]
  tx, _ = optim.make_optimizer(c.train)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "other": other,
           "opt_state": tx.init(params)}
  for i in range(steps):
    state, _ = train_step(c)(state, batch(c, i))
  return state, tx


def with_random_moments(state, count: int = 2):
  """`state` whose Adam moments are random (what some steps of training leave), count `count`."""
  key = iter(jax.random.split(jax.random.key(3), 1000))
  def fill(s):
    if not isinstance(s, optax.ScaleByAdamState):
      return s
    rand = lambda x: jnp.abs(jax.random.normal(next(key), x.shape))  # noqa: E731
    return s._replace(count=jnp.asarray(count, jnp.int32), mu=jax.tree.map(rand, s.mu),
                      nu=jax.tree.map(rand, s.nu))
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
  return dict(state, opt_state=jax.tree.map(fill, state["opt_state"], is_leaf=is_adam))


def expand(c, state, tx):
  """expand.expand of `state` by `c`'s expansion, jitted (one compile, not one per op)."""
  spec = expand_lib.spec_of(c)
  return jax.jit(lambda p, o: expand_lib.expand(p, o, spec, tx))(state["params"],
                                                                  state["opt_state"])


def grown_model(c, params, other):
  graphdef = nnx.split(abstract_model(config_lib.grown_config(c).model), nnx.Param, ...)[0]
  return nnx.merge(graphdef, params, other)


def loss(model, b):
  from research.eval import lm_eval  # pylint: disable=import-outside-toplevel
  return float(lm_eval.cross_entropy(model(b["inputs"]), b["targets"]).mean())


# ------------------------------------------------------------------ signal preservation (§3.1)

@pytest.mark.parametrize("widths", [{"d_ff": 64}, {"d_model": 32}, {"d_ff": 64, "d_model": 32}])
def test_copy_copy_at_2x_with_rescale_is_function_preserving(widths):
  c = expanding(widths)
  state, tx = train_state(c)
  state = with_random_moments(state)
  params, _, mask = expand(c, state, tx)
  small = nnx.merge(nnx.split(abstract_model(c.model), nnx.Param, ...)[0], state["params"],
                    state["other"])
  big = grown_model(c, params, state["other"])
  b = batch(c, 7)
  np.testing.assert_allclose(np.asarray(big(b["inputs"])), np.asarray(small(b["inputs"])),
                             rtol=1e-5, atol=1e-5)
  assert loss(big, b) == pytest.approx(loss(small, b), rel=1e-6)  # fp32 rounding only
  sizes = jax.tree.map(lambda x: x.size, params)
  assert sum(jax.tree.leaves(sizes)) > sum(x.size for x in jax.tree.leaves(state["params"]))
  assert any(bool(m.any()) for m in jax.tree.leaves(mask))


# (init, rescale) -> RMS(FFN output after) / RMS(FFN output before) at 2x, on the same input:
# copy-copy rescaled preserves it exactly (y' = y), unscaled doubles it (both copies add up),
# a zero side leaves the old outputs scaled by sqrt(d/d') = sqrt(1/2) (Appendix B: the rule is
# exact once the new units carry signal); random-random preserves it in expectation
EXACT_RMS_RATIO = {("copy_copy", "rms"): 1.0, ("copy_copy", "none"): 2.0,
                   ("random_zero", "rms"): math.sqrt(0.5), ("zero_copy", "rms"): math.sqrt(0.5)}
# random-random: new units drawn at the matrices' std; measured 0.987-1.006 over seeds 0-2
RANDOM_RMS_TOLERANCE = 0.05


def ffn_rms_ratio(init: str, rescale: str, seed: int = 0) -> float:
  c = expanding({"d_ff": 256}, model__d_model=64, model__channel__d_ff=128,
                train__expand__init=init, train__expand__rescale=rescale, seed=seed)
  state, tx = train_state(c)
  params, _, _ = expand(c, state, tx)
  small = nnx.merge(nnx.split(abstract_model(c.model), nnx.Param, ...)[0], state["params"],
                    state["other"])
  big = grown_model(c, params, state["other"])
  x = jax.random.normal(jax.random.key(1), (8, 64, 64))  # an RMS-normalized input
  rms = lambda y: float(jnp.sqrt(jnp.mean(jnp.square(y))))  # noqa: E731
  return rms(big.blocks[0].channel(x, None)) / rms(small.blocks[0].channel(x, None))


@pytest.mark.parametrize("init,rescale", sorted(EXACT_RMS_RATIO))
def test_fan_in_rescale_sets_the_mlp_output_rms(init, rescale):
  assert ffn_rms_ratio(init, rescale) == pytest.approx(EXACT_RMS_RATIO[init, rescale], rel=1e-5)


def test_random_random_rescaled_preserves_the_mlp_output_rms():
  for seed in range(3):
    assert abs(ffn_rms_ratio("random_random", "rms", seed) - 1) < RANDOM_RMS_TOLERANCE


def test_fan_in_factor_follows_the_table():
  g = lambda old, new: expand_lib.Growth("d_ff", "mlp", old, new)  # noqa: E731
  copy = expand_lib.Spec((), init="copy_copy")
  assert copy.fan_in_factor(g(4, 8)) == pytest.approx(0.5)  # c = 1: 1/sqrt(1 + 3)
  assert copy.fan_in_factor(g(4, 6)) == pytest.approx(1 / math.sqrt(2.5))  # c = 1/2
  assert copy.fan_in_factor(g(4, 6)) == pytest.approx(math.sqrt(4 / (3 * 6 - 2 * 4)))
  assert copy.fan_in_factor(g(4, 16)) == pytest.approx(0.25)  # c = 3 > 1: 1/(1 + c)
  for init in ("random_random", "random_zero", "zero_copy"):
    assert expand_lib.Spec((), init=init).fan_in_factor(g(4, 16)) == pytest.approx(0.5)
  assert expand_lib.Spec((), rescale="none").fan_in_factor(g(4, 8)) == 1.0


# ------------------------------------------------------------------ optimizer state (§3.4)

def _leaf(tree, *names):
  """The array at `names` of a State (or of a checkpoint's raw dicts, keyed by strings)."""
  for n in names:
    tree = tree[n] if n in tree else tree[str(n)]
  if isinstance(tree, dict):  # a checkpoint's Variable
    tree = tree["value"]
  return np.asarray(tree.get_value() if isinstance(tree, nnx.Variable) else tree)


def _adam(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  return adam


@pytest.mark.parametrize("state_mode", expand_lib.STATES)
def test_optimizer_state_treatments(state_mode):
  c = expanding({"d_ff": 64}, train__expand__state=state_mode)
  state, tx = train_state(c)
  state = with_random_moments(state)
  params, opt_state, mask = expand(c, state, tx)
  new, old = _adam(opt_state), _adam(state["opt_state"])
  up = ("blocks", 0, "channel", "up", "kernel")
  down = ("blocks", 0, "channel", "down", "kernel")
  mu_up, mu_up0 = _leaf(new.mu, *up), _leaf(old.mu, *up)
  mu_down, mu_down0 = _leaf(new.mu, *down), _leaf(old.mu, *down)
  assert mu_up.shape == (16, 64) and mu_down.shape == (64, 16)
  if state_mode == "reset_all":
    assert not mu_up.any() and not _leaf(new.nu, *up).any() and int(new.count) == 0
    assert not _leaf(new.mu, "blocks", 0, "attn", "q", "kernel").any()
  else:
    assert int(new.count) == int(old.count) == 2
    np.testing.assert_array_equal(mu_up[:, :32], mu_up0)  # the old slices keep their moments
    np.testing.assert_array_equal(mu_down[:32], mu_down0)
    np.testing.assert_array_equal(_leaf(new.mu, "blocks", 0, "attn", "q", "kernel"),
                                  _leaf(old.mu, "blocks", 0, "attn", "q", "kernel"))
    if state_mode == "reset_new":
      assert not mu_up[:, 32:].any() and not mu_down[32:].any()
    else:  # copy: the parameters' index map, unscaled
      np.testing.assert_array_equal(mu_up[:, 32:], mu_up0)
      np.testing.assert_array_equal(mu_down[32:], mu_down0)
  mask_up, mask_down = _leaf(mask, *up), _leaf(mask, *down)
  assert mask_up[:, 32:].all() and not mask_up[:, :32].any()
  assert mask_down[32:].all() and not mask_down[:32].any()
  assert not _leaf(mask, "blocks", 0, "attn", "q", "kernel").any()
  # the down projection is fan-in: rescaled as a whole (copy-copy at 2x: 1/2)
  np.testing.assert_allclose(_leaf(params, *down)[:32],
                             0.5 * _leaf(state["params"], *down), rtol=1e-6)


# ------------------------------------------------------------------ symmetry lock (§3.3, §4)

def divergence_after_training(state_mode: str, steps: int = 6) -> float:
  """Copy-copy at 2x after 3 steps, then `steps` deterministic steps without re-warmup."""
  c = expanding({"d_ff": 64}, train__expand__state=state_mode, train__expand__rewarm=False,
                train__lr=1e-2, train__warmup_steps=0)
  state, tx = train_state(c, steps=3)
  spec = expand_lib.spec_of(c)
  params, opt_state, _ = expand(c, state, tx)
  g = config_lib.grown_config(c)
  step = train_step(g)
  state = dict(state, params=params, opt_state=opt_state)
  widths = expand_lib.plan(params, spec)
  assert float(expand_lib.divergence(params, widths)) == 0.0
  for i in range(steps):
    state, _ = step(state, batch(g, 3 + i))
  return float(expand_lib.divergence(state["params"], widths))


# measured (fp32, CPU): exactly 0 for both symmetric treatments (the copies' gradients and
# moments are computed bit for bit alike); 0.45 after 6 steps with the asymmetric reset
FLOAT_NOISE = 1e-6


@pytest.mark.parametrize("state_mode", ["copy", "reset_all"])
def test_symmetric_state_locks_the_copies(state_mode):
  assert divergence_after_training(state_mode) < FLOAT_NOISE


def test_asymmetric_reset_breaks_the_lock():
  assert divergence_after_training("reset_new") > 1e-2


# ------------------------------------------------------------------ re-warmup (§3.5)

def test_rewarm_multiplier_at_hand_checked_points():
  # base: lr 1, 10 warmup steps, cosine to 0.1 at T = 100; expansion at 40, tau_w 20, rho 1.5
  t = config(train__lr=1.0, train__steps=100, train__warmup_steps=10,
             train__min_lr_ratio=0.1).train
  schedule = optim.make_schedule(t)
  base = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / 90))  # noqa: E731
  eta_e = base(40)  # 0.775
  assert eta_e == pytest.approx(0.775)
  eta_new = {40: eta_e,  # starts from the current lr
             50: eta_e + 0.5 * (1.5 * eta_e - eta_e),  # half way up the warmup
             60: 1.5 * eta_e,  # the peak rho eta_e
             80: 0.1 + 0.5 * (1.5 * eta_e - 0.1),  # half way down the cosine
             100: 0.1}  # the shared eta_min
  m = expand_lib.rewarm_multiplier(schedule, start=40, total=100, rho=1.5, warmup=20)
  for step, want in eta_new.items():
    assert float(m(step)) == pytest.approx(want / base(step), rel=1e-5), step
  assert float(m(40)) == pytest.approx(1.0, rel=1e-5)


def test_rewarm_scales_new_slices_after_weight_decay():
  """With zero gradients AdamW's update is the decoupled decay alone: the new slices' update is
  the old slices' times eta_new / eta (the multiplier comes after the decay)."""
  c = config(train__lr=1.0, train__steps=100, train__warmup_steps=10, train__weight_decay=0.1,
             train__clip_norm=0.0)
  growth = expand_lib.Growth("d_ff", "mlp", 2, 4)
  widths = {"w": (expand_lib.Widen(growth, -1, "out"),)}
  schedule = optim.make_schedule(c.train)
  m = expand_lib.rewarm_multiplier(schedule, start=40, total=100, rho=1.5, warmup=20)
  tx, _ = optim.make_optimizer(c.train, extra=[expand_lib.scale_new_by(m, widths, 40)])
  params = {"w": jnp.ones((3, 4))}
  state = tx.init(params)
  state = jax.tree.map(lambda x: jnp.full_like(x, 50) if x.dtype == jnp.int32 else x, state)
  updates, _ = tx.update({"w": jnp.zeros((3, 4))}, state, params)
  u = np.asarray(updates["w"])
  assert u[0, 0] == pytest.approx(-0.1 * float(schedule(50)), rel=1e-5)
  np.testing.assert_allclose(u[:, 2:], u[:, :2] * float(m(50)), rtol=1e-5)
  assert float(m(50)) > 1.1


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("overrides,message", [
    ({"train.expand.d_ff": 16}, r"d_ff=16 must exceed the model's d_ff=32.*cannot shrink"),
    ({"train.expand.d_ff": 32}, r"must exceed"),
    ({"train.expand.d_ff": 0}, r"expands nothing"),
    ({"train.expand.step": 20}, r"train.expand.step=20 must be below train.steps=20"),
    ({"train.expand.d_model": 32, "model.head.tie_embeddings": True},
     r"train.expand.d_model does not support model.head.tie_embeddings=True"),
    ({"model.channel.kind": "moe"}, r"model.channel.kind='moe' \(needs 'ffn'\)"),
    ({"train.optimizer": "lowbit_adamw"}, r"train.optimizer='lowbit_adamw'"),
    ({"train.expand.warmup": 17}, r"warmup=17 must be shorter than the 17 steps"),
    ({"train.expand.init": "copy_random"}, r"train.expand.init='copy_random' is not one of"),
    ({"train.expand.state": "keep"}, r"train.expand.state='keep' is not one of"),
])
def test_config_errors(overrides, message):
  base = {"train.expand.step": 3, "train.expand.d_ff": 64}
  with pytest.raises(ConfigError, match=message):
    config(**{k.replace(".", "__"): v for k, v in {**base, **overrides}.items()})


def test_settings_are_in_the_config_only_when_expanding():
  assert "expand" not in config().train
  on = config(train__expand__step=3, train__expand__d_ff=64, train__expand__warmup=2)
  assert on.train.expand.d_ff == 64


# ------------------------------------------------------------------ a run across the expansion

SPEC = "baseline:scale=smoke,corpus=tinyshakespeare"
RUN = {"train.progress": False, "mesh.num_devices": 1, "model.channel.d_ff": 64,
       "model.head.tie_embeddings": False, "train.expand.step": 6, "train.expand.d_ff": 128,
       "train.expand.warmup": 2, "train.checkpoint_every": 3, "train.keep_checkpoints": 10,
       "train.log_every": 2}
RTOL = 1e-5  # seed-stacked against single runs (tests/test_stacked.py)


def _trainer(workdir: Path, seed: int = 0, log=None) -> Trainer:
  c = experiments.get_config(SPEC, {**RUN, "seed": seed})
  return Trainer(c, workdir, experiment="baseline", arg="scale=smoke",
                 log=(log.append if log is not None else lambda *_: None))


def _rows(workdir: Path) -> list[dict]:
  keep = ("split", "step", "loss", "lr", "grad_norm", "bpb")
  return [{k: v for k, v in r.items() if k in keep or k.startswith("stat/")}
          for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def _checkpoint(workdir: Path, step: int):
  ckpt = Checkpointer(workdir / "checkpoints", keep=10, async_save=False)
  state, data_state, _ = ckpt.restore(step, None)
  ckpt.close()
  return state, data_state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("expanding")
  log = []
  summary = _trainer(workdir, log=log).run()
  assert any("width expansion (d_ff 64 -> 128" in line for line in log)
  return workdir, summary


@pytest.mark.needs_data
def test_a_run_expands_and_checkpoints_the_grown_model(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["step"] == 12 and summary["expand_step"] == 6
  assert summary["params"] > summary["params_before_expand"]
  up = ("params", "blocks", 0, "channel", "up", "kernel")
  for step, width in ((6, 64), (9, 128), (12, 128)):  # the step's checkpoint: before at t_e
    assert _leaf(_checkpoint(workdir, step)[0], *up).shape == (32, width)
  rows = [r for r in _rows(workdir) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [1, 2, 4, 6, 7, 8, 10, 12]  # t_e and t_e + 1 logged
  assert all("stat/expand_divergence" in r for r in rows if r["step"] > 6)
  from research.infer import load_run  # pylint: disable=import-outside-toplevel
  assert load_run(workdir).model.blocks[0].channel.up.kernel.shape == (32, 128)


@pytest.mark.needs_data
@pytest.mark.parametrize("crash_after", [3, 9])
def test_resume_across_the_expansion_equals_an_uninterrupted_run(uninterrupted, tmp_path,
                                                                 crash_after):
  """A run killed after its checkpoint `crash_after` (3: before the expansion, which the
  resumed run then makes at step 6; 9: after it, restored in the grown shape) and run again
  ends bit for bit where the uninterrupted one does, logging the same rows."""
  workdir, _ = uninterrupted
  crashed = tmp_path / "run"
  shutil.copytree(workdir, crashed)
  (crashed / "summary.json").unlink()
  for step in (3, 6, 9, 12):
    if step > crash_after:
      shutil.rmtree(crashed / "checkpoints" / str(step))
  log = []
  _trainer(crashed, log=log).run()
  assert any(f"resumed from step {crash_after}" in line for line in log)
  assert any("width expansion (" in line for line in log) == (crash_after < 6)
  (a, data_a), (b, data_b) = _checkpoint(workdir, 12), _checkpoint(crashed, 12)
  assert data_a == data_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _rows(crashed) == _rows(workdir)


@pytest.mark.needs_data
def test_stacked_seeds_expand_like_single_runs(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  log = []
  summaries = train_seeds([_trainer(tmp_path / f"seed{s}", s, log if s == 0 else None)
                           for s in range(2)])
  assert not any("one after another" in line for line in log)
  assert [s["params"] for s in summaries] == [uninterrupted[1]["params"]] * 2
  ra, rb = _rows(workdir), _rows(tmp_path / "seed0")
  assert [(r["split"], r["step"]) for r in ra] == [(r["split"], r["step"]) for r in rb]
  np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=RTOL)
