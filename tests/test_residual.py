"""The residual-stream family (hyper-, frac-connections, virtual width) against its papers:
identity initializations, the bounds of the dynamic weights, counts, composition with every
norm placement and channel mixer, the stream axis on the 8-device mesh, the MTP head and the
connection heat maps."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import config as config_lib
from research import experiments, sharding
from research import report as report_lib
from research.eval import connections
from research.model import (DecoderLM, ForwardContext, abstract_model, ffn, model_summary,
                            norms, residual)
from research.model import param_shardings
from research.train.optim import decay_mask

from test_model import small_config, tokens

VWN = {"residual.kind": "vwn", "embed.kind": "over_width", "head.tie_embeddings": False}


def build(seed: int = 0, **overrides):
  """The model of small_config(**overrides), initialized eagerly (no compile: cheap in tests)."""
  return DecoderLM(small_config(**overrides), rngs=nnx.Rngs(seed))


def ctx_for(x):
  return ForwardContext(positions=jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))


def streams_per_block(model, x):
  """The uncollapsed stream entering each block and leaving the last one, run eagerly (op by
  op, so that two models doing the same arithmetic give the same bits)."""
  ctx = ctx_for(x)
  stream = model.stream.expand(model.embed(x))
  out = [stream]
  for block in model.blocks:
    stream = block(stream, ctx)
    out.append(stream)
  return out


# ------------------------------------------------------------------ identity at init

@pytest.mark.parametrize("dynamic", [False, True])
def test_hyper_n1_equals_the_baseline_exactly(dynamic):
  """HC x1 at init is the pre-norm residual (its HC matrix is [[0, 1], [1, 1]]): same bits."""
  x = tokens()
  base = build(3)
  hc = build(3, **{"residual.kind": "hyper", "residual.streams": 1,
                                    "residual.dynamic": dynamic})
  np.testing.assert_array_equal(np.asarray(hc(x)), np.asarray(base(x)))  # eager


@pytest.mark.parametrize("n,dynamic", [(2, True), (4, False), (4, True), (8, True)])
def test_hyper_at_init_equals_pre_norm(n, dynamic):
  """The paper's init: every stream equals the pre-norm residual stream at step 0 (exactly); the
  output sums the n streams, n h, and the final norm removes the factor n -- exactly so with
  eps = 0 (with eps > 0 the norm of n h and of h differ by eps / (n^2 mean h^2))."""
  x = tokens()
  base = build(4, norm_eps=0.0)
  hc = build(4, norm_eps=0.0, **{"residual.kind": "hyper",
                                                  "residual.streams": n,
                                                  "residual.dynamic": dynamic})
  for b, h in zip(streams_per_block(base, x), streams_per_block(hc, x)):
    assert h.shape == b.shape[:2] + (n,) + b.shape[2:]
    for i in range(n):
      np.testing.assert_array_equal(np.asarray(h[:, :, i]), np.asarray(b))
  np.testing.assert_allclose(np.asarray(hc(x)), np.asarray(base(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_frac_at_init_equals_the_baseline_exactly(m):
  """FC's init (Y = A = I, B = 1; App. A Alg. 2): the sublayer reads h and writes h + T(h);
  m = 1 is the baseline by construction, and every m is at init."""
  x = tokens()
  base = build(5)
  fc = build(5, **{"residual.kind": "frac", "residual.fracs": m})
  np.testing.assert_array_equal(np.asarray(fc(x)), np.asarray(base(x)))


@pytest.mark.parametrize("shape", [(3, 5, 8), (16, 18, 32)])  # broadcast / dot by the rule
def test_both_contraction_forms_give_the_same_values_and_gradients(shape, monkeypatch):
  """_contract picks a broadcast-sum or a batched dot by size; both are out[k, d] =
  sum_i a[i, k] x[i, d] per token, checked against a per-token loop, gradients included."""
  i, k, d = shape
  ka, kx, kg = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (2, 3, i, k))
  x = jax.random.normal(kx, (2, 3, i, d))
  g = jax.random.normal(kg, (2, 3, k, d))
  want = np.stack([np.stack([np.asarray(a[b, t]).T @ np.asarray(x[b, t]) for t in range(3)])
                   for b in range(2)])
  results = []
  for limit in (0, 1 << 40):  # always the dot, always the broadcast
    monkeypatch.setattr(residual, "BROADCAST_MAX", limit)
    out, vjp = jax.vjp(residual._contract, a, x)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    results.append(vjp(g))
  for dot_grad, broadcast_grad in zip(*results):
    np.testing.assert_allclose(np.asarray(dot_grad), np.asarray(broadcast_grad),
                               rtol=1e-5, atol=1e-5)


def test_vwn_at_init_runs_pre_norm_on_the_first_d_features():
  """VWN's init: the backbone reads slots 0..m-1 (the first D features) and writes its
  outputs cyclically, so with W_reduce selecting the first D features the model is the
  pre-norm model whose embedding is the over-width table's first D columns."""
  x = tokens()
  cfg = small_config(**VWN, **{"residual.expansion": 2.0, "residual.fracs": 2,
                               "residual.reduce_init": "select", "residual.reduce_norm": "off"})
  vwn = DecoderLM(cfg, rngs=nnx.Rngs(6))
  base = build(6, **{"head.tie_embeddings": False})
  base.embed.table[...] = vwn.embed.table[...][:, :cfg.d_model]
  np.testing.assert_array_equal(np.asarray(vwn(x)), np.asarray(base(x)))


# ------------------------------------------------------------------ the paper's matrices

def test_static_matrices_are_the_papers_inits():
  hc = build(**{"residual.kind": "hyper", "residual.streams": 4})
  for k, conn in enumerate(c for b in hc.blocks for c in (b.attn_residual, b.channel_residual)):
    expected = np.zeros((5, 5))
    expected[0, 1:] = 1.0  # B = 1
    expected[1 + k % 4, 0] = 1.0  # A_m = e_{k mod n}
    expected[1:, 1:] = np.eye(4)  # A_r = I
    np.testing.assert_array_equal(conn.matrix(), expected)
  fc = build(**{"residual.kind": "frac", "residual.fracs": 2})
  np.testing.assert_array_equal(fc.blocks[0].attn_residual.matrix(),
                                [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
  vwn = build(**VWN, **{"residual.expansion": 1.5, "residual.fracs": 2})
  mat = vwn.blocks[0].attn_residual.matrix()  # m = 2, n = 3
  np.testing.assert_array_equal(mat[:2, 2:], [[1, 0, 1], [0, 1, 0]])  # B[i, j] = [j mod m = i]
  np.testing.assert_array_equal(mat[2:, :2], [[1, 0], [0, 1], [0, 0]])  # read the first m slots
  np.testing.assert_array_equal(mat[2:, 2:], np.eye(3))


def _conn(kind, dynamic=True, tanh=True, **extra):
  """The connection of sublayer 0, built alone."""
  over = {"residual.kind": kind, "residual.dynamic": dynamic, "residual.tanh": tanh, **extra}
  if kind == "vwn":
    over.update(VWN)
  cfg = small_config(**over)
  cls = residual.RESIDUALS.get(kind)
  return cls(cfg.d_model, cfg=cfg, layer=0, dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["hyper", "frac", "vwn"])
def test_dynamic_weights_are_bounded(kind):
  """theta = s * tanh(.) + theta0 (DHC, DFC, DGHC): the dynamic part is
  bounded by |s| with tanh, and is not without it."""
  for tanh in (True, False):
    conn = _conn(kind, tanh=tanh)
    conn.w_dynamic[...] = 10.0 * jax.random.normal(jax.random.key(1), conn.w_dynamic.shape)
    slots = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, conn.slots, conn.width))
    alpha, beta = conn.weights(slots)
    alpha0, beta0 = conn.static_weights()
    da = np.abs(np.asarray(alpha) - np.asarray(alpha0))
    db = np.abs(np.asarray(beta) - np.asarray(beta0))
    sa = np.asarray(conn.scale_alpha[...]).reshape(conn.static_weights()[0].shape
                                                   if conn.scale_alpha.ndim else ())
    sb = np.asarray(conn.scale_beta[...]).reshape(beta0.shape if conn.scale_beta.ndim else ())
    if tanh:
      assert np.all(da <= np.abs(sa) + 1e-7) and np.all(db <= np.abs(sb) + 1e-7)
      assert da.max() > 0.5 * np.abs(sa).max()  # the bound is reached, not trivially zero
    else:
      assert da.max() > np.abs(sa).max()
  assert float(np.max(sa)) == pytest.approx(1.0 if kind == "vwn" else 0.01)


def test_connection_parameter_counts_match_the_papers():
  d = 32
  for n in (1, 2, 4):  # HC's cost: SHC n(n+2); DHC D(n+2) + n(n+2) + 2 (param-free norm)
    assert _count(_conn("hyper", False, **{"residual.streams": n})) == n * (n + 2)
    assert _count(_conn("hyper", True, **{"residual.streams": n})) == d * (n + 2) + n * (n + 2) + 2
  for m in (2, 4):  # FC's cost: SFC m(2m+1); DFC (D/m)(2m+1) + m(2m+1) + 2
    assert _count(_conn("frac", False, **{"residual.fracs": m})) == m * (2 * m + 1)
    assert _count(_conn("frac", True, **{"residual.fracs": m})) == (
        d // m * (2 * m + 1) + m * (2 * m + 1) + 2)


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_overheads_are_counted_in_params_and_flops():
  base = model_summary(build(), 16)
  hc = build(**{"residual.kind": "hyper", "residual.streams": 4})
  s = model_summary(hc, 16)
  conns = [c for b in hc.blocks for c in (b.attn_residual, b.channel_residual)]
  assert s["params"] - base["params"] == sum(_count(c) for c in conns)
  extra = sum(c.flops_per_token() for c in conns) + hc.stream.flops_per_token()
  assert s["flops_per_token_fwd"] - base["flops_per_token_fwd"] == pytest.approx(extra)
  assert extra > 0


def test_static_weights_get_no_weight_decay():
  """The papers decay the dynamic projections W, not the static weights or the scales."""
  model = build(**{"residual.kind": "hyper", "residual.streams": 2})
  mask = decay_mask(nnx.state(model, nnx.Param))
  conn = mask["blocks"][0]["attn_residual"]
  assert not any(jax.tree.leaves(conn[k])[0] for k in
                 ("static_alpha", "static_beta", "scale_alpha", "scale_beta"))
  assert jax.tree.leaves(conn["w_dynamic"])[0]


def test_every_new_parameter_has_logical_axes():
  for over in ({"residual.kind": "hyper"}, {"residual.kind": "frac", "residual.dynamic": False},
               {**VWN, "head.kind": "mtp"}, {**VWN, "embed.factorized": True}):
    for path, var in jax.tree.leaves_with_path(nnx.state(build(**over), nnx.Param),
                                               is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == var.get_value().ndim, jax.tree_util.keystr(path)


# ------------------------------------------------------------------ composition

@pytest.mark.parametrize("kind", ["hyper", "frac", "vwn"])
def test_composes_with_every_placement_and_channel_mixer(kind):
  """Shapes only (abstract trace): every placement (with the FFN) and every channel mixer (with
  pre-norm). The stream keeps its layout through post and normskip placements, whose norm acts
  per copy (hyper) or per group of d_model (vwn)."""
  x = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  extra = VWN if kind == "vwn" else {}
  pairs = ([(p, "ffn") for p in norms.NORM_PLACEMENTS.names()]
           + [("pre", c) for c in ffn.CHANNEL_MIXERS.names() if c != "ffn"])
  for placement, mixer in pairs:
    small = ({f"channel.{mixer}.num_keys": 8, f"channel.{mixer}.top_k": 4}
             if mixer.startswith("ultramem") else {})  # memories that fit a 32-wide FFN budget
    cfg = small_config(**{"residual.kind": kind, "norm.kind": placement, "channel.kind": mixer,
                          **extra, **small})
    out = nnx.eval_shape(lambda m, x: m(x), abstract_model(cfg), x)
    assert out.shape == (2, 16, cfg.vocab_size), (placement, mixer)


def test_hyper_with_a_post_placement_learns_its_dynamic_weights():
  x = tokens()
  model = build(2, num_layers=1, **{"residual.kind": "hyper", "norm.kind": "post"})
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  w = grads["blocks"][0]["channel_residual"]["w_dynamic"]
  assert float(jnp.abs(jax.tree.leaves(w)[0]).sum()) > 0  # zero-initialised, yet it learns


@pytest.mark.parametrize("overrides,match", [
    ({"residual.kind": "hyper", "residual.streams": 0}, "streams=0 must be at least 1"),
    ({"residual.kind": "frac", "residual.fracs": 3}, "not divisible by model.residual.fracs=3"),
    ({**VWN, "residual.expansion": 1.3}, "not an integer"),
    ({**VWN, "residual.expansion": 0.5}, "must be at least 1"),
    ({**VWN, "residual.expansion": 1.5, "residual.reduce_norm": "on"}, "multiple of"),
    ({**VWN, "residual.reduce_norm": "maybe"}, "reduce_norm='maybe' is not one of"),
    ({**VWN, "residual.temperature": "hot"}, "temperature='hot' is not one of"),
    ({**VWN, "residual.expansion": 1.5, "norm.kind": "post"}, "not a multiple of 32"),
    ({**VWN, "head.tie_embeddings": True}, "cannot be tied"),
    ({"residual.kind": "vwn"}, "needs an embedding of width"),
    ({"embed.kind": "over_width", "head.tie_embeddings": False}, "goes with model.residual"),
    ({"residual.kind": "hyper", "head.kind": "mtp", "head.mtp_weight": -1.0}, "must be >= 0"),
])
def test_config_errors_name_the_problem(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    model = build(**overrides)
    model(tokens())


@pytest.mark.parametrize("variant, expected", [
    ("pre", {"residual.kind": "plain"}),
    ("shc1", {"residual.kind": "hyper", "residual.streams": 1, "residual.dynamic": False,
              "residual.tanh": True}),
    ("dhc8_notanh", {"residual.kind": "hyper", "residual.streams": 8, "residual.dynamic": True,
                     "residual.tanh": False}),
    ("dfc4", {"residual.kind": "frac", "residual.fracs": 4, "residual.dynamic": True,
              "residual.tanh": True}),
])
def test_variant_names_set_the_paper_rows(variant, expected):
  """The papers' row names map to the config they mean, in every residual experiment."""
  for name in ("hyper_connections", "frac_connections"):
    c = experiments.get_config(f"{name}:scale=smoke,variant={variant}")
    for key, value in expected.items():
      assert c.model[key.split(".")[0]][key.split(".")[1]] == value, (name, key)


@pytest.mark.parametrize("spec", ["hyper_connections:variant=dhc", "frac_connections:variant=fc4",
                                  "virtual_width:variant=vwn"])
def test_unknown_variant_is_a_config_error(spec):
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    experiments.get_config(spec)


# ------------------------------------------------------------------ sharding

def test_stream_axis_rule_and_sharded_equals_unsharded():
  """The stream axis is replicated; hyper-connections and VWN (with its MTP head) give the same
  logits and loss (aux included) on the 8-device mesh (fsdp x tensor) as on one device."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh("fsdp_tp", tensor=2)
  spec = sharding.logical_to_spec(residual.STREAM_AXES, (8, 16, 4, 32), mesh)
  assert spec == jax.sharding.PartitionSpec("fsdp", None, None, None)
  one = sharding.make_mesh("dp", devices=jax.devices()[:1])
  x = jax.random.randint(jax.random.key(0), (8, 17), 0, 61)
  for over in ({"residual.kind": "hyper", "residual.streams": 4},
               {**VWN, "residual.expansion": 2.0, "head.kind": "mtp"}):
    model = build(1, num_layers=1, **over)
    graphdef, state = nnx.split(model)
    results = [_forward(graphdef, state, x, m) for m in (one, mesh)]
    (ref_logits, ref_loss, _), (logits, loss, stream) = results
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert stream.ndim == 4  # [batch, seq, stream, embed]: batch over fsdp, the rest whole
    assert stream.sharding.spec[0] == "fsdp" and all(a is None for a in stream.sharding.spec[1:])


def _forward(graphdef, state, x, mesh):
  """(logits, loss + aux, the expanded stream) with the parameters placed by their rules."""
  state = jax.device_put(state, param_shardings(state, mesh))

  def run(state, t):
    model = nnx.merge(graphdef, state)
    inputs, targets = t[:, :-1], t[:, 1:]
    ctx = ctx_for(inputs)
    logits = model(inputs, ctx)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return logits, loss + sum(ctx.aux_losses.values()), model.stream.expand(model.embed(inputs))

  with sharding.use_mesh(mesh):
    t = jax.device_put(x, sharding.named_sharding(("batch", "seq"), x.shape, mesh))
    logits, loss, stream = jax.jit(run)(state, t)
  return np.asarray(logits), float(loss), stream


# ------------------------------------------------------------------ multi-token head

def test_mtp_head_keeps_the_logits_and_adds_its_loss():
  x = tokens(seq=16)
  plain = build(7, num_layers=1, **{"residual.kind": "hyper"})
  mtp = build(7, num_layers=1, **{"residual.kind": "hyper", "head.kind": "mtp"})

  def mtp_loss(model, t):
    c = ctx_for(t)
    logits = model(t, c)
    return c.aux_losses["mtp"], logits
  value_and_grad = nnx.jit(nnx.value_and_grad(mtp_loss, has_aux=True))
  (value, logits), grads = value_and_grad(mtp, x)
  # the main path is the plain head's (up to how XLA fuses two different graphs)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain(x)), rtol=1e-6, atol=1e-7)
  # at init the next-2 prediction is near uniform: 0.3 x about log(vocab)
  assert 0.3 * 0.8 * math.log(61) < float(value) < 0.3 * 1.2 * math.log(61)
  assert float(jnp.abs(grads["head"]["fuse"]["kernel"][...]).sum()) > 0
  assert float(jnp.abs(grads["blocks"][0]["attn"]["q"]["kernel"][...]).sum()) > 0
  # position t fuses token t+1 and predicts token t+2: the last token is only a target, the
  # first only an input; both reach the loss
  y = x.at[:, -1].set((x[:, -1] + 1) % 61)
  z = x.at[:, 0].set((x[:, 0] + 1) % 61)
  assert float(value_and_grad(mtp, y)[0][0]) != float(value)
  assert float(value_and_grad(mtp, z)[0][0]) != float(value)


# ------------------------------------------------------------------ heat maps and analysis

def test_unfolded_connections_at_init():
  """At init hyper-connections are pre-norm: each sublayer input is the embedding plus every
  earlier output (coefficient 1); the output sums n identical streams (coefficient n)."""
  model = build(**{"residual.kind": "hyper", "residual.streams": 4})
  data = connections.extract(model)
  u = np.asarray(data["unfolded"])
  k = len(data["labels"])
  np.testing.assert_array_equal(u[:k], np.tril(np.ones((k, k + 1))))
  np.testing.assert_array_equal(u[k], np.full(k + 1, 4.0))
  vwn = build(**VWN, **{"residual.expansion": 2.0, "residual.fracs": 2})
  u = np.asarray(connections.extract(vwn)["unfolded"])  # identity blocks of m = 2 segments
  np.testing.assert_allclose(u[:k], np.tril(np.ones((k, k + 1))) * math.sqrt(2), rtol=1e-6)
  assert connections.extract(build()) is None


def test_heat_maps_in_the_run_directory_and_the_report(tmp_path):
  """The trainer's end-of-run files and `research report` for the three experiments: one heat
  map per arm, and for virtual_width the log-linear fit of loss against log2(r)."""
  model = build(**VWN)
  png = connections.write(model, tmp_path)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads((tmp_path / "connections.json").read_text())
  runs = tmp_path / "runs" / "virtual_width" / "width"
  entries = []
  for arm, r, loss in (("pre", None, 1.80), ("vwn2", 2.0, 1.78), ("vwn4", 4.0, 1.77),
                       ("vwn8", 8.0, 1.76)):
    over = ({"model.residual.kind": "plain"} if r is None else
            {"model.residual.kind": "vwn", "model.residual.expansion": r})
    for seed in range(2):
      work = runs / arm / f"seed{seed}"
      work.mkdir(parents=True)
      value = loss + 0.002 * seed
      (work / "metrics.jsonl").write_text(
          json.dumps({"split": "train", "step": 10, "loss": value + 0.1}) + "\n"
          + json.dumps({"split": "valid", "step": 10, "loss": value, "bpb": 2.0}) + "\n")
      (work / "summary.json").write_text(json.dumps(
          {"step": 10, "valid_loss": value, "valid_bpb": 2.0, "diverged": False}))
      if r is not None:
        (work / "connections.json").write_text(json.dumps(data))
      entries.append({"arm": arm, "seed": seed, "workdir": f"{arm}/seed{seed}",
                      "overrides": over, "paper": None, "status": "done"})
  (runs / "manifest.json").write_text(json.dumps(
      {"experiment": "virtual_width", "group": "width", "arg": "scale=tiny", "arms": entries}))
  out = tmp_path / "results"
  md = report_lib.report("virtual_width", tmp_path / "runs", out).read_text()
  assert "Log-linear fit" in md and "(width_vwn8_connections.png)" in md
  assert (out / "width_loglinear.png").is_file() and (out / "width_vwn2_connections.png").is_file()
  assert not (out / "width_pre_connections.png").exists()


def test_log_linear_fit_recovers_a_slope():
  analysis = experiments._load_module(  # pylint: disable=protected-access
      "virtual_width", "analysis.py")
  widths = [1.5, 2, 4, 8] * 3
  losses = [1.7 - 0.01 * math.log2(r) + 0.001 * (i // 4) for i, r in enumerate(widths)]
  fit = analysis.fit_log_linear(widths, losses)
  assert fit["slope"] == pytest.approx(-0.01, abs=1e-9) and fit["points"] == 12
  assert analysis.fit_log_linear([4, 4], [1.0, 1.1]) is None
