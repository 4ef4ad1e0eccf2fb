"""The MoE routers (research/model/routers.py): GatePro's competition and MaxScore's
capacity-respecting assignment on hand-checkable cases, and the router diagnostics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import experiments, run_config
from research.errors import ConfigError
from research.model import moe, routers

# three router rows: w0 and w1 nearly parallel, w2 nearest w1 (kernel [d, E])
ROWS = np.array([[1.0, 0.0], [0.9, 0.3], [0.3, 1.0]], np.float32)


def test_nearest_competitor_and_mean_abs_cos():
  cos = routers.row_cosines(jnp.asarray(ROWS.T))
  unit = ROWS / np.linalg.norm(ROWS, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(cos), unit @ unit.T, atol=1e-6)
  assert routers.nearest_competitor(cos).tolist() == [1, 0, 1]  # not symmetric: j*(2) = 1
  expected = np.mean([abs(unit[0] @ unit[1]), abs(unit[0] @ unit[2]), abs(unit[1] @ unit[2])])
  assert float(routers.mean_abs_cos(cos)) == pytest.approx(expected, rel=1e-6)


def test_gatepro_penalises_the_loser_of_each_own_comparison():
  nearest = jnp.array([1, 0, 1])
  lam = 0.5
  # l = (0, 1, 2): 0 loses to j*(0) = 1; 1 beats j*(1) = 0; 2 beats j*(2) = 1
  got = routers.gatepro_logits(jnp.array([0.0, 1.0, 2.0]), nearest, lam)
  np.testing.assert_allclose(np.asarray(got), [-0.5, 1.0, 2.0])
  # one-directional (the paper): 1 lost to 2, but 2 is not 1's nearest, so 1 keeps its logit;
  # the mutual reading penalises it too
  got = routers.gatepro_logits(jnp.array([0.0, 1.0, 2.0]), nearest, lam, "mutual")
  np.testing.assert_allclose(np.asarray(got), [-0.5, 0.5, 2.0])
  # ties: i wins
  got = routers.gatepro_logits(jnp.array([1.0, 1.0, 1.0]), nearest, lam)
  np.testing.assert_allclose(np.asarray(got), [1.0, 1.0, 1.0])
  # a mutual nearest pair (0, 1): exactly the lower one is penalised (2 loses to 1 as well)
  got = routers.gatepro_logits(jnp.array([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0]]), nearest, lam)
  np.testing.assert_allclose(np.asarray(got), [[3.0, 1.5, -0.5], [1.5, 3.0, -0.5]])


def test_gatepro_hot_swap_schedule():
  assert routers.gatepro_on(1.0, None) is True
  assert routers.gatepro_on(1.0, jnp.float32(0.9)) is True
  assert bool(routers.gatepro_on(0.5, jnp.float32(0.3)))
  assert not bool(routers.gatepro_on(0.5, jnp.float32(0.5)))
  assert routers.gatepro_on(0.5, None) is False  # the trained model: the schedule has ended


def _router(kind, lam=0.5, e=8, d=6, norm_topk=True):
  g = dict(routers.GATEPRO_DEFAULTS, lam=lam)
  return moe.Router(d, e, 2, std=1.0, norm_topk=norm_topk, rngs=nnx.Rngs(0), kind=kind,
                    gatepro=g)


def test_gatepro_at_lambda_zero_is_topk_and_gates_are_softmax_within_the_topk():
  x = jax.random.normal(jax.random.key(1), (2, 16, 6))
  base, gp0 = _router("topk"), _router("gatepro", lam=0.0)
  gp0.kernel = base.kernel
  a, b = base(x), gp0(x)
  assert (np.asarray(a.experts) == np.asarray(b.experts)).all()
  np.testing.assert_allclose(np.asarray(a.gates), np.asarray(b.gates), atol=1e-6)
  gp = _router("gatepro", lam=0.7)
  gp.kernel = base.kernel
  r = gp(x)
  nearest = routers.nearest_competitor(routers.row_cosines(gp.kernel[...]))
  pen = routers.gatepro_logits(r.logits, nearest, 0.7)
  sel = jnp.take_along_axis(pen, r.experts, -1)
  np.testing.assert_allclose(np.asarray(r.gates), np.asarray(jax.nn.softmax(sel, -1)), atol=1e-6)
  # the experts are the top-k of the penalised logits
  assert (np.asarray(r.experts) == np.asarray(jax.lax.top_k(pen, 2)[1])).all()


def test_gatepro_hard_ban_selects_no_loser_and_mutual_no_nearest_pair():
  x = jax.random.normal(jax.random.key(2), (4, 64, 6))
  one_way = _router("gatepro", lam=1e9)
  r = one_way(x)
  nearest = np.asarray(routers.nearest_competitor(routers.row_cosines(one_way.kernel[...])))
  logits = np.asarray(r.logits).reshape(-1, 8)
  experts = np.asarray(r.experts).reshape(-1, 2)
  losers = logits < logits[:, nearest]
  for t in range(len(experts)):
    if (~losers[t]).sum() >= 2:  # enough unpenalised experts: no loser is picked
      assert not losers[t, experts[t]].any()
  # one-way: a nearest pair can still be co-selected (i beat j*(i), and j*(i) beat its own
  # nearest); the mutual reading bans every nearest pair
  mutual = _router("gatepro", lam=1e9)
  mutual.gatepro["competition"] = "mutual"
  for a, b in np.asarray(mutual(x).experts).reshape(-1, 2):
    assert not (nearest[a] == b or nearest[b] == a), (a, b)


def test_gatepro_gradient_flows_through_the_penalised_logits_only():
  x = jax.random.normal(jax.random.key(3), (1, 8, 6))
  gp = _router("gatepro", lam=0.3)
  kernel = gp.kernel[...]
  nearest = routers.nearest_competitor(routers.row_cosines(kernel))
  w = jax.random.normal(jax.random.key(4), (1, 8, 2))

  graphdef, state = nnx.split(gp)

  def via_router(k):
    return jnp.sum(nnx.merge(graphdef, jax.tree.map(lambda _: k, state))(x).gates * w)

  def by_hand(k):  # the competition fixed at this kernel's j* and win/lose pattern
    logits = x @ k
    pen = routers.gatepro_logits(logits, nearest, 0.3)
    pen = logits + jax.lax.stop_gradient(pen - logits)
    idx = jax.lax.top_k(pen, 2)[1]
    return jnp.sum(jax.nn.softmax(jnp.take_along_axis(pen, idx, -1), -1) * w)

  np.testing.assert_allclose(np.asarray(jax.grad(via_router)(kernel)),
                             np.asarray(jax.grad(by_hand)(kernel)), atol=1e-6)


def test_maxscore_first_choice_is_greedy_in_token_order():
  # 4 tokens, 2 experts, 1 choice, room 2 each: all prefer expert 0, the first two get it
  probs = jnp.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.95, 0.05]]])
  got = routers.maxscore_assign(probs, 1, 2, 20, 0.05)
  assert np.asarray(got)[0, :, 0].tolist() == [0, 0, 1, 1]


def _score(p, experts):
  return float(np.sum(np.where(experts >= 0, np.take_along_axis(p, np.maximum(experts, 0), -1),
                               0.0)))


@pytest.mark.parametrize("seed", range(4))
def test_maxscore_assignment_is_feasible_and_routes_more_score_than_dropping(seed):
  g, s, e, k, c = 3, 32, 8, 2, 8  # capacity factor 1: every slot is needed
  p = np.asarray(jax.nn.softmax(3 * jax.random.normal(jax.random.key(seed), (g, s, e)), -1))
  experts = np.asarray(routers.maxscore_assign(jnp.asarray(p), k, c, 20, 0.05))
  assert (experts >= 0).all()  # nothing dropped
  for grp in range(g):
    assert np.bincount(experts[grp].ravel(), minlength=e).max() <= c
    assert (experts[grp, :, 0] != experts[grp, :, 1]).all()
  top = np.asarray(jax.lax.top_k(jnp.asarray(p), k)[1])
  plan = moe.plan_dispatch(jnp.asarray(top), e, c)
  dropped_topk = np.where(np.asarray(plan.kept), top, -1)
  assert _score(p, experts) > _score(p, dropped_topk)


def test_maxscore_is_near_the_exact_optimum_on_a_brute_forced_case():
  s, e, k, c = 4, 4, 2, 2
  p = np.asarray(jax.nn.softmax(2 * jax.random.normal(jax.random.key(7), (1, s, e)), -1))
  pairs = list(itertools.combinations(range(e), k))
  best = 0.0
  for choice in itertools.product(pairs, repeat=s):
    if np.bincount(np.ravel(choice), minlength=e).max() <= c:
      best = max(best, sum(p[0, t, list(ch)].sum() for t, ch in enumerate(choice)))
  got = _score(p, np.asarray(routers.maxscore_assign(jnp.asarray(p), k, c, 50, 0.02)))
  assert got <= best + 1e-6
  assert got >= 0.9 * best


def test_maxscore_loose_capacity_mostly_picks_the_topk():
  p = jax.nn.softmax(3 * jax.random.normal(jax.random.key(5), (4, 64, 16)), -1)
  got = np.sort(np.asarray(routers.maxscore_assign(p, 2, 64, 20, 0.05)), -1)
  top = np.sort(np.asarray(jax.lax.top_k(p, 2)[1]), -1)
  assert (got == top).all(-1).mean() > 0.9


def test_maxscore_boost_schedule():
  assert routers.maxscore_boost(4.0, 0.3, None) == 1.0
  assert float(routers.maxscore_boost(4.0, 0.3, jnp.float32(0.0))) == pytest.approx(4.0)
  assert float(routers.maxscore_boost(4.0, 0.3, jnp.float32(0.15))) == pytest.approx(2.5)
  assert float(routers.maxscore_boost(4.0, 0.3, jnp.float32(0.6))) == pytest.approx(1.0)


def test_diagnostics_on_a_hand_case():
  # 4 tokens, top-2 of 4 experts; expert 3 never chosen; one assignment dropped
  experts = jnp.array([[0, 1], [0, 1], [1, 2], [0, 2]])
  kept = jnp.array([[True, True], [True, True], [True, True], [True, False]])
  probs = jnp.full((4, 4), 0.25)
  cos = jnp.eye(4) + jnp.array([[0, .9, 0, 0], [.9, 0, 0, 0], [0, 0, 0, .5], [0, 0, .5, 0]])
  d = routers.diagnostics(probs, experts, kept, cos)
  share = np.array([3, 3, 1, 0]) / 7
  ent = -np.sum(share[share > 0] * np.log(share[share > 0])) / np.log(4)
  assert float(d["moe_load_entropy"]) == pytest.approx(ent, rel=1e-6)
  assert float(d["moe_zero_experts"]) == 1.0
  # nearest pairs 0<->1, 2<->3: tokens 0 and 1 hold both 0 and 1 -> (2 + 2 + 0 + 0) / 16
  assert float(d["moe_pair_coactive"]) == pytest.approx(4 / 16)
  assert float(d["moe_router_cos"]) == pytest.approx((0.9 + 0.5) / 6)
  assert float(d["moe_routed_score"]) == pytest.approx((0.5 * 3 + 0.25) / 4)


def test_router_settings_are_checked_and_selected():
  c = experiments.get_config("gatepro:scale=smoke", {})
  c.model.channel.moe.router = "nope"
  with pytest.raises(ConfigError, match="router='nope'"):
    run_config.resolve(c)
  c = experiments.get_config("max_score_routing:scale=smoke", {})
  c.model.channel.moe.capacity_factor = 0.5
  with pytest.raises(ConfigError, match="capacity_factor"):
    run_config.resolve(c)
  # a run's config holds only its router's settings
  moe_cfg = run_config.resolve(experiments.get_config("gatepro:scale=smoke", {})).to_dict()
  moe_cfg = moe_cfg["model"]["channel"]["moe"]
  assert "gatepro" in moe_cfg and "maxscore" not in moe_cfg
  base = run_config.resolve(experiments.get_config("baseline:scale=smoke", {})).to_dict()
  assert "moe" not in base["model"]["channel"]
