"""The MoE router family (`model.channel.moe.router`): how each token picks its k experts.

  topk      the top-k of softmax(x W_r) (Switch / GShard); overflow past an expert's capacity is
            dropped by the dispatch (research/model/moe.py)
  gatepro   GatePro (Zheng et al. 2025, digest §3): each expert i competes with the expert
            j*(i) whose router row is nearest to its own (cosine, eq. of step 2-3); per token,
            the member with the lower logit has its logit lowered by lambda before the top-k,
            and the gates are the softmax of the penalised logits (within the top-k when
            norm_topk, the paper's normalisation). No parameter, no loss, no gradient through
            the competition. `until` < 1 turns it off after that fraction of training (the
            hot-swap schedules); `competition` one_way is the paper's (only i's comparison with
            its own j*(i) can penalise i), mutual also penalises j*(i) when it loses to i.
  maxscore  Maximum Score Routing (Dong et al. 2025): the assignment of tokens to experts that
            respects each expert's capacity C per group (a sequence) without dropping. The
            first choice is greedy (each round, every unassigned token proposes its next-best
            expert, accepted in token order while the expert has room: a token's first choice
            depends on earlier tokens only); each further choice is a Sinkhorn transport plan
            of the scores over the remaining capacities (each token sends 1, each expert takes
            at most its room; fixed iterations, jnp, jits and shards), rounded to a feasible
            assignment by the same proposal rounds over the plan's ranking, and a few swaps
            for a token whose only room left is in an expert it already holds. Gates are the
            router probabilities of the chosen experts, the later choices' multiplied by
            tau = max(boost - (boost - 1) progress / boost_until, 1) (the released code's
            annealed x4 -> x1 boost of the second weight; the paper's SoftTopk is not public,
            see experiments/max_score_routing/README.md).

The diagnostics every MoE layer records (ctx.add_stat, logged as `stat/moe_*`, mean over layers):
load entropy of the kept assignments over the batch (1 = uniform), experts with no token in
the batch, the nearest-pair co-activation rate (GatePro's mechanism metric: the share of tokens
whose top-k holds both i and j*(i), mean over i), the mean |cos| between router rows, and the
mean routed score per token (sum of the kept experts' router probabilities).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.model.registry import Switch

ROUTERS = ("topk", "gatepro", "maxscore")
GATEPRO_COMPETITIONS = ("one_way", "mutual")
GATEPRO_DEFAULTS = dict(
    lam=1e-4,  # the penalty; the paper's "typically 1e-4" (ambiguous: see the README)
    until=1.0,  # on for this fraction of the training steps, then off (1: always on)
    competition="one_way")  # one_way (the paper's) | mutual
MAXSCORE_DEFAULTS = dict(
    sinkhorn_iters=20, sinkhorn_eps=0.05,  # the plan for the choices after the first
    boost=4.0, boost_until=0.3)  # later choices' gates x tau, tau: boost -> 1 over this fraction
# model.channel.moe.router selects the router; only gatepro reads moe.gatepro.*, only maxscore
# moe.maxscore.* (research/model/options.py drops the others from a run's config)
SWITCH = Switch("model.channel.moe.router", "topk",
                {"topk": {}, "gatepro": {"gatepro": GATEPRO_DEFAULTS},
                 "maxscore": {"maxscore": MAXSCORE_DEFAULTS}})


def check(moe_cfg) -> None:
  """ConfigError for a bad router setting of `model.channel.moe` (a ConfigDict)."""
  router = moe_cfg.get("router", "topk")
  if router not in ROUTERS:
    raise ConfigError(f"model.channel.moe.router='{router}' is not one of {', '.join(ROUTERS)}")
  if router == "gatepro":
    g = moe_cfg.gatepro
    if g.lam < 0 or not 0 <= g.until <= 1:
      raise ConfigError(f"model.channel.moe.gatepro: lam={g.lam} must be >= 0 and until="
                        f"{g.until} in [0, 1]")
    if g.competition not in GATEPRO_COMPETITIONS:
      raise ConfigError(f"model.channel.moe.gatepro.competition='{g.competition}' is not one "
                        f"of {', '.join(GATEPRO_COMPETITIONS)}")
  if router == "maxscore":
    s = moe_cfg.maxscore
    if s.sinkhorn_iters < 1 or s.sinkhorn_eps <= 0 or s.boost < 1 or s.boost_until <= 0:
      raise ConfigError(f"model.channel.moe.maxscore: sinkhorn_iters={s.sinkhorn_iters} >= 1, "
                        f"sinkhorn_eps={s.sinkhorn_eps} > 0, boost={s.boost} >= 1 and "
                        f"boost_until={s.boost_until} > 0 are required")


# ---------------------------------------------------------------------------- router rows

def row_cosines(kernel: jax.Array) -> jax.Array:
  """S [E, E], S_ij = cos(w_i, w_j) of the router rows w_i (columns of kernel [d, E]); no
  gradient (GatePro's similarity is a selection, §3 step 6)."""
  w = jax.lax.stop_gradient(kernel.astype(jnp.float32)).T
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
  return jnp.dot(w, w.T, precision=jax.lax.Precision.HIGHEST)


def nearest_competitor(cos: jax.Array) -> jax.Array:
  """j*(i) = argmax_{j != i} S_ij [E] int32 (GatePro step 3; not symmetric in general)."""
  e = cos.shape[0]
  return jnp.argmax(jnp.where(jnp.eye(e, dtype=bool), -jnp.inf, cos), axis=-1).astype(jnp.int32)


def mean_abs_cos(cos: jax.Array) -> jax.Array:
  """Mean |S_ij| over i < j (GatePro App. C's average |cos|; lower = more diverse)."""
  e = cos.shape[0]
  upper = jnp.triu(jnp.ones((e, e), bool), k=1)
  return jnp.sum(jnp.where(upper, jnp.abs(cos), 0.0)) / max(e * (e - 1) // 2, 1)


# -------------------------------------------------------------------------------- GatePro

def gatepro_logits(logits: jax.Array, nearest: jax.Array, lam: float,
                   competition: str = "one_way") -> jax.Array:
  """The penalised logits (GatePro step 4): l~_i = l_i - lam where expert i loses to its
  competitor (l_i < l_{j*(i)}; i wins ties). logits [..., E]; nearest [E] = j*."""
  rival = jnp.take(logits, nearest, axis=-1)                                  # l_{j*(i)}
  lose = logits < rival
  if competition == "mutual":
    # j = j*(i) also loses when l_j < l_i: scatter i's comparison onto its competitor
    e = logits.shape[-1]
    pairs = jax.nn.one_hot(nearest, e, dtype=bool)                          # [i, j*(i)]
    pairs = pairs.reshape((1,) * (logits.ndim - 1) + (e, e))
    beaten = (logits[..., :, None] > logits[..., None, :]) & pairs          # i beats j*(i)
    lose = lose | jnp.any(beaten, axis=-2)
  return logits - lam * lose.astype(logits.dtype)


def gatepro_on(until: float, progress) -> jax.Array | bool:
  """Whether GatePro acts at training `progress` (fraction of steps done; None = the trained
  model, i.e. evaluation after training): always when until >= 1, else while progress < until."""
  if until >= 1:
    return True
  if progress is None:
    return False
  return progress < until


# ------------------------------------------------------------------------------- MaxScore

def propose_rounds(order: jax.Array, capacity: jax.Array, allowed: jax.Array,
                   rounds: int) -> jax.Array:
  """Capacity-respecting assignment by proposal rounds: in round r every token still without
  an expert proposes order[..., r], and proposals are accepted in token order while the
  expert has room. order [G, S, R] int32 (each token's candidates, best first), capacity
  [G, E] int32 (room per expert), allowed [G, S, E] bool (a token never proposes an expert it
  may not take). Returns the chosen expert [G, S] int32, -1 where none had room."""
  g, s, _ = order.shape
  e = capacity.shape[-1]

  def body(r, carry):
    chosen, room = carry
    cand = jax.lax.dynamic_index_in_dim(order, r, axis=-1, keepdims=False)    # [G, S]
    proposing = (chosen < 0) & jnp.take_along_axis(allowed, cand[..., None], -1)[..., 0]
    onehot = jax.nn.one_hot(cand, e, dtype=jnp.int32) * proposing[..., None]  # [G, S, E]
    before = jnp.cumsum(onehot, axis=1) - onehot                             # earlier proposers
    ahead = jnp.sum(before * onehot, axis=-1)                                # of the same expert
    accept = proposing & (ahead < jnp.take_along_axis(room, cand, axis=-1))
    chosen = jnp.where(accept, cand, chosen)
    room = room - jnp.sum(onehot * accept[..., None], axis=1)
    return chosen, room

  chosen = jnp.full((g, s), -1, jnp.int32)
  chosen, _ = jax.lax.fori_loop(0, rounds, body, (chosen, capacity.astype(jnp.int32)))
  return chosen


def sinkhorn_plan(scores: jax.Array, allowed: jax.Array, room: jax.Array, iters: int,
                  eps: float) -> jax.Array:
  """Entropic transport plan P [G, S, E] of the scores [G, S, E] (log-domain Sinkhorn, fixed
  iterations, kernel exp(score / eps), zero where not `allowed`): every token sends 1 (one more
  expert), expert e receives at most room_e. The inequality is an equality with a slack row
  (score 0, any expert) that takes the room the tokens leave, sum(room) - S of it."""
  neg = jnp.float32(-1e30)
  g, s, e = scores.shape
  room = room.astype(jnp.float32)
  slack = jnp.sum(room, axis=-1) - s                                          # [G]
  f = jnp.concatenate([jnp.where(allowed, scores / eps, neg),
                       jnp.where(room > 0, 0.0, neg)[:, None, :]], axis=1)    # [G, S + 1, E]
  log_row = jnp.concatenate(
      [jnp.zeros((g, s), jnp.float32),
       jnp.where(slack > 0, jnp.log(jnp.maximum(slack, 1e-30)), neg)[:, None]], axis=1)
  log_col = jnp.where(room > 0, jnp.log(jnp.maximum(room, 1e-30)), neg)

  def rows(v):
    return log_row - jax.nn.logsumexp(f + v[:, None, :], axis=-1)

  def body(_, v):
    return log_col - jax.nn.logsumexp(f + rows(v)[:, :, None], axis=1)

  v = jax.lax.fori_loop(0, iters, body, jnp.zeros((g, e), jnp.float32))
  plan = jnp.exp(jnp.clip(f + rows(v)[:, :, None] + v[:, None, :], -80.0, 0.0))[:, :s]
  return jnp.where(allowed, plan, 0.0)


def maxscore_assign(probs: jax.Array, top_k: int, capacity: int, iters: int,
                    eps: float) -> jax.Array:
  """experts [G, S, k] int32 for the router probabilities probs [G, S, E] under a capacity of
  `capacity` assignments per expert and group (see the module docstring); -1 marks a choice
  that found no room (only possible when the room left sits in experts the token already
  holds). No gradient: the gates carry it."""
  p = jax.lax.stop_gradient(probs.astype(jnp.float32))
  g, s, e = p.shape
  room = jnp.full((g, e), capacity, jnp.int32)
  first_order = jnp.argsort(-p, axis=-1).astype(jnp.int32)
  first = propose_rounds(first_order, room, jnp.ones((g, s, e), bool), e)
  chosen = [first]
  taken = jax.nn.one_hot(first, e, dtype=bool)                                # [G, S, E]
  room = room - jnp.sum(taken, axis=1)
  for _ in range(1, top_k):
    plan = sinkhorn_plan(p, ~taken, room, iters, eps)
    rank_key = jnp.where(taken, -1.0, plan + 1e-6 * p)  # ties in the plan: by score
    order = jnp.argsort(-rank_key, axis=-1).astype(jnp.int32)
    pick = propose_rounds(order, room, ~taken, e)
    pick, room = jax.vmap(_repair)(pick, room, taken, p)
    chosen.append(pick)
    new = jax.nn.one_hot(pick, e, dtype=bool)                                # -1: no row
    taken, room = taken | new, room - jnp.sum(new, axis=1)
  return jnp.stack(chosen, axis=-1)


def _repair(pick: jax.Array, room: jax.Array, taken: jax.Array, p: jax.Array,
            swaps: int = 4) -> tuple[jax.Array, jax.Array]:
  """Gives tokens of one group left without this choice (pick -1: the room left is in experts
  they already hold) an expert by swaps: such a token t takes the expert of a token t' that can
  move into the room t cannot use, the swap that loses the least score first; at most `swaps`
  per choice. pick [S], room [E], taken [S, E] (held before this choice), p [S, E]."""

  def body(_, carry):
    pick, room = carry
    missing = pick < 0
    t = jnp.argmax(missing)
    free = jnp.argmax((room > 0) & taken[t])                  # room only t's own expert has
    theirs = jnp.maximum(pick, 0)
    movable = (~missing & ~jnp.take(taken[t], theirs)          # t may take t''s expert
               & ~taken[:, free] & (theirs != free))            # t' may move into `free`
    gain = p[:, free] + jnp.take(p[t], theirs) - jnp.take_along_axis(p, theirs[:, None], -1)[:, 0]
    other = jnp.argmax(jnp.where(movable, gain, -jnp.inf))
    ok = missing[t] & jnp.any(movable) & (room[free] > 0)
    pick = jnp.where(ok, pick.at[t].set(theirs[other]).at[other].set(free), pick)
    room = jnp.where(ok, room.at[free].add(-1), room)
    return pick, room

  return jax.lax.fori_loop(0, swaps, body, (pick, room))


def maxscore_boost(boost: float, boost_until: float, progress) -> jax.Array | float:
  """tau(progress) = max(boost - (boost - 1) progress / boost_until, 1); the trained model
  (progress None) reads 1."""
  if progress is None or boost == 1:
    return 1.0
  return jnp.maximum(boost - (boost - 1.0) * progress / boost_until, 1.0)


# ---------------------------------------------------------------------------- diagnostics

def diagnostics(probs: jax.Array, experts: jax.Array, kept: jax.Array,
                cos: jax.Array) -> dict[str, jax.Array]:
  """The router's statistics of one layer and batch (module docstring). probs [..., E],
  experts/kept [..., k], cos [E, E] the router rows' cosines."""
  e = probs.shape[-1]
  onehot = jax.nn.one_hot(experts, e, dtype=jnp.float32)                    # [..., k, E]
  chosen = jnp.sum(onehot, axis=-2).reshape(-1, e)                          # [T, E] 0/1
  load = jnp.sum(onehot * kept[..., None], axis=tuple(range(onehot.ndim - 1)))
  share = load / jnp.maximum(jnp.sum(load), 1.0)
  entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.maximum(share, 1e-30)), 0.0))
  nearest = nearest_competitor(cos)
  both = chosen * jnp.take(chosen, nearest, axis=-1)                        # i and j*(i)
  routed = jnp.sum(jnp.where(kept, jnp.take_along_axis(probs, jnp.maximum(experts, 0), -1),
                             0.0), axis=-1)
  return {"moe_load_entropy": entropy / jnp.log(float(e)),
          "moe_zero_experts": jnp.sum(load == 0).astype(jnp.float32),
          "moe_pair_coactive": jnp.mean(both),
          "moe_router_cos": mean_abs_cos(cos),
          "moe_routed_score": jnp.mean(routed)}
