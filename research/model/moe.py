"""Mixture-of-experts channel mixer (`model.channel.kind = "moe"`), in three separable pieces.

  router    Router: logits = x W_r (fp32), p = softmax(logits), each token's k experts and
            their gates (renormalized if `norm_topk`) by the router of `router`: topk (the
            top-k probabilities), gatepro or maxscore (research/model/routers.py)
  dispatch  plan_dispatch / dispatch_tokens / combine: every (token, choice) assignment gets a
            slot in its expert's buffer of `capacity` slots per group (a group = one sequence);
            first choices of a group are placed before second choices (GShard), assignments
            past the capacity are dropped (their output is 0; the residual carries the token)
  experts   Experts: E SwiGLU (or any function activation) FFNs applied batched to the
            buffers [experts, groups, capacity, embed]; the weights carry the logical axis
            `experts`, which the rules table maps to the `expert` mesh axis

  y = sum_k gate_k * kept_k * Expert_{e_k}(x)                       (Switch eq. 2, top-k form)

`dispatch = "dropless"` sets the capacity to the group size: a token picks an expert at most
once, so nothing can drop and the output is exactly the per-token expert sum (the price on
static-shape hardware is E/k times the expert FLOPs actually executed; FLOPs/token reports the
activated k experts). `dispatch = "capacity"` uses ceil(capacity_factor * S * k / E) slots.

Losses (added to the objective through the forward context):
  moe_balance  aux_coef * E * sum_i f_i P_i, f_i = share of the T*k assignments routed to expert
               i, P_i = mean router probability of i (Switch Transformer eqs. 4-6; = aux_coef
               when perfectly balanced)
  moe_z        z_coef * mean(logsumexp(logits)^2) (ST-MoE eq. 5), when z_coef > 0
  moe_erc      erc_coef * L_ERC, the expert-router coupling loss (Lv et al. 2025, §3 of the
               digest), when erc_coef > 0, on training forwards only:
                 proxies  R~_i = R_i (.) delta_i, delta_i ~ U(1 - eps_i, 1 + eps_i) elementwise,
                          eps_i = min_{j != i} |R_i - R_j| / (2 |R_i|) (the bound that keeps a
                          proxy nearer its own router row; App. B), no gradient through delta
                 M[i, j]  = |R~_i W_g^j|_2, proxy i through expert j's gate projection [E, E]
                 L_ERC    = 1/E^2 sum_i sum_{j != i} relu(M[i,j] - a M[i,i])
                                                 + relu(M[j,i] - a M[i,i])
               (rows: a proxy excites its own expert most; columns: an expert responds to its
               own proxy most); a = erc_alpha; erc_noise=False uses the clean rows (the paper's
               no-noise ablation); erc_router_grad=False keeps its gradient off the router
               rows (the other reading of an ambiguous pseudocode line). Layers' losses are
               summed, like the balance loss. The noise key is the step's key folded with
               ERC's stream and the layer. Its unweighted value (mean over layers) and the
               mean eps are logged as `stat/erc` and `stat/erc_eps`.

The fraction of token-expert assignments dropped is recorded as the statistic `moe_dropped`
(mean over MoE layers; the trainer logs it as `stat/moe_dropped`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from research import sharding as sharding_lib
from research.errors import ConfigError
from research.model import ffn as ffn_lib
from research.model import routers
from research.model.linear import init_std, out_depth_factor
from research.sharding import constrain

DISPATCHES = ("dropless", "capacity")


# ------------------------------------------------------------------------------------ router

@dataclasses.dataclass
class Routing:
  logits: jax.Array   # [..., E] fp32
  probs: jax.Array    # [..., E] fp32, softmax(logits)
  experts: jax.Array  # [..., k] int32, chosen experts in descending probability
  gates: jax.Array    # [..., k] fp32, their weights
  row_cos: jax.Array | None = None  # [E, E] cosines of the router rows (routers.row_cosines)


class Router(nnx.Module):
  """The router of one MoE layer: logits = x W_r and p = softmax(logits) in fp32, and the
  experts and gates of `kind` (research/model/routers.py: topk, gatepro, maxscore)."""

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, std: float,
               norm_topk: bool, rngs: nnx.Rngs, kind: str = "topk", gatepro=None,
               maxscore=None):
    init = jax.nn.initializers.normal(std)
    self.kernel = nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32),
                            out_sharding=("embed", None))
    self.top_k, self.norm_topk, self.kind = top_k, norm_topk, kind
    self.gatepro = dict(gatepro or routers.GATEPRO_DEFAULTS)
    self.maxscore = dict(maxscore or routers.MAXSCORE_DEFAULTS)

  def __call__(self, x: jax.Array, *, progress=None, capacity: int | None = None) -> Routing:
    """x [G, S, d]; progress: the fraction of training done (None: the trained model);
    capacity: assignments per expert and group (maxscore's constraint)."""
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...])
    probs = jax.nn.softmax(logits, axis=-1)
    cos = routers.row_cosines(self.kernel[...])  # GatePro's competition; the diagnostics
    if self.kind == "maxscore":
      if capacity is None:
        raise ValueError("the maxscore router needs the dispatch capacity")
      m = self.maxscore
      experts = routers.maxscore_assign(probs, self.top_k, capacity, m["sinkhorn_iters"],
                                        m["sinkhorn_eps"])
      gates = jnp.where(experts >= 0,
                        jnp.take_along_axis(probs, jnp.maximum(experts, 0), axis=-1), 0.0)
      tau = routers.maxscore_boost(m["boost"], m["boost_until"], progress)
      gates = gates * jnp.concatenate([jnp.ones_like(gates[..., :1]),
                                       jnp.broadcast_to(tau, gates[..., 1:].shape)], axis=-1)
    else:
      scored = probs
      if self.kind == "gatepro":
        g = self.gatepro
        nearest = routers.nearest_competitor(cos)
        penalised = routers.gatepro_logits(logits, nearest, g["lam"], g["competition"])
        on = routers.gatepro_on(g["until"], progress)
        scored = jax.nn.softmax(jnp.where(on, penalised, logits), axis=-1)
      gates, experts = jax.lax.top_k(scored, self.top_k)
    if self.norm_topk:
      gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-30)
    return Routing(logits, probs, experts.astype(jnp.int32), gates, cos)


def switch_balance_loss(routing: Routing) -> jax.Array:
  """E * sum_i f_i P_i over all tokens (Switch eqs. 4-6, with f over the T*k assignments)."""
  num_experts = routing.probs.shape[-1]
  onehot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)  # [..., k, E]
  f = jnp.mean(onehot.reshape(-1, num_experts), axis=0)
  p = jnp.mean(routing.probs.reshape(-1, num_experts), axis=0)
  return num_experts * jnp.sum(f * p)


def router_z_loss(routing: Routing) -> jax.Array:
  """mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1)))


# ---------------------------------------------------------------------------------- ERC loss

ERC_NOISE_STREAM = 0x455243  # folded into the step's key, so ERC's noise never reuses dropout's


def erc_proxies(rows: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(R~ [E, d], eps [E]) for router rows R [E, d] (see the module docstring): each row scaled
  elementwise by a stop-gradient draw from U(1 - eps_i, 1 + eps_i)."""
  r = rows.astype(jnp.float32)
  sq = jnp.sum(r * r, axis=-1)
  gram = jnp.dot(r, r.T, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
  dist = jnp.where(jnp.eye(r.shape[0], dtype=bool), jnp.inf, dist)
  eps = jax.lax.stop_gradient(jnp.min(dist, axis=1) / (2.0 * jnp.sqrt(sq) + 1e-12))
  u = jax.random.uniform(key, r.shape, jnp.float32)
  delta = jax.lax.stop_gradient((1.0 - eps)[:, None] + u * (2.0 * eps)[:, None])
  return r * delta, eps


def erc_matrix(proxies: jax.Array, gate: jax.Array) -> jax.Array:
  """M [E proxies, E experts], M[i, j] = |R~_i W_g^j|_2, for proxies [E, d] and the experts'
  gate projections [E, d, D]."""
  return jnp.linalg.norm(jnp.einsum("id,jdf->ijf", proxies, gate.astype(jnp.float32)), axis=-1)


def erc_loss(proxies: jax.Array, gate: jax.Array, alpha: float) -> jax.Array:
  """L_ERC of proxies [E, d] against the experts' gate projections [E, d, D] (module
  docstring; the mean over all E^2 entries, the zero diagonal included, as the paper's
  pseudocode)."""
  e = proxies.shape[0]
  m = erc_matrix(proxies, gate)
  own = jnp.diagonal(m)
  rows = jax.nn.relu(m - alpha * own[:, None])  # [i, j]: M[i, j] against alpha M[i, i]
  cols = jax.nn.relu(m - alpha * own[None, :])  # [j, i]: M[j, i] against alpha M[i, i]
  off = 1.0 - jnp.eye(e, dtype=jnp.float32)
  return jnp.sum((rows + cols) * off) / (e * e)


# ---------------------------------------------------------------------------------- dispatch

@dataclasses.dataclass
class DispatchPlan:
  slot_token: jax.Array  # [G, E, C] int32: token of the group in each slot, S where empty
  position: jax.Array    # [G, S, k] int32: slot of each assignment in its expert's buffer
  kept: jax.Array        # [G, S, k] bool: False where the assignment overflowed
  capacity: int

  @property
  def dropped(self) -> jax.Array:
    return jnp.sum(~self.kept)


def capacity_for(dispatch: str, group_size: int, num_experts: int, top_k: int,
                 capacity_factor: float) -> int:
  if dispatch == "dropless":
    return group_size
  if dispatch == "capacity":
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / num_experts)))
  raise ConfigError(f"model.channel.moe.dispatch='{dispatch}' is not one of "
                    f"{', '.join(DISPATCHES)}")


def plan_dispatch(experts: jax.Array, num_experts: int, capacity: int) -> DispatchPlan:
  """Slots for the assignments experts [G, S, k]: choice 0 of every token of a group is placed
  before choice 1 (GShard's priority), tokens in sequence order; overflow is dropped, and so
  is an expert of -1 (a router that found no room)."""
  g, s, k = experts.shape
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)            # [G, S, k, E]
  ordered = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)       # choice-major
  taken = jnp.cumsum(ordered, axis=1) - 1                                     # slot if chosen
  position = jnp.sum(taken * ordered, axis=-1).reshape(g, k, s).transpose(0, 2, 1)
  kept = (position < capacity) & (experts >= 0)  # -1: the router found no expert
  experts = jnp.maximum(experts, 0)
  groups = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))
  tokens = jnp.broadcast_to(jnp.arange(s)[None, :, None], (g, s, k))
  slot = jnp.where(kept, position, capacity)                                  # overflow column
  slot_token = jnp.full((g, num_experts, capacity + 1), s, jnp.int32)
  slot_token = slot_token.at[groups, experts, slot].set(tokens)[:, :, :capacity]
  return DispatchPlan(slot_token, position.astype(jnp.int32), kept, capacity)


def dispatch_tokens(x: jax.Array, plan: DispatchPlan) -> jax.Array:
  """x [G, S, d] -> expert buffers [E, G, C, d] (empty slots hold zeros)."""
  g = x.shape[0]
  padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)            # row S = empty
  buffers = padded[jnp.arange(g)[:, None, None], plan.slot_token]            # [G, E, C, d]
  return buffers.transpose(1, 0, 2, 3)


def combine(expert_out: jax.Array, plan: DispatchPlan, experts: jax.Array,
            gates: jax.Array) -> jax.Array:
  """Expert outputs [E, G, C, d] -> y [G, S, d] = sum_k gate_k kept_k out[e_k, g, slot_k]."""
  g, s, k = experts.shape
  out = expert_out.transpose(1, 0, 2, 3)                                      # [G, E, C, d]
  slot = jnp.minimum(plan.position, plan.capacity - 1)
  picked = out[jnp.arange(g)[:, None, None], jnp.maximum(experts, 0), slot]  # [G, S, k, d]
  weight = jnp.where(plan.kept, gates, 0.0).astype(picked.dtype)
  return jnp.einsum("gsk,gskd->gsd", weight, picked)


# ----------------------------------------------------------------------------------- experts

class Experts(nnx.Module):
  """E independent FFNs applied to their buffers [E, G, C, d]; init as `make_linear` would
  (in: N(0, init_std^2), out: scaled by the depth rule of `model.init_out_scaling`)."""

  def __init__(self, cfg, num_experts: int, d_expert: int, *, layer: int, dtype,
               rngs: nnx.Rngs):
    act = ffn_lib.ACTIVATIONS.get(cfg.channel.activation)
    if isinstance(act, type):
      raise ConfigError(f"model.channel.activation='{cfg.channel.activation}' has parameters; "
                        "MoE experts take a parameter-free activation")
    self.act, self.gated = act, ffn_lib.is_gated(cfg.channel.activation)
    d, std = cfg.d_model, init_std(cfg)
    init_in = jax.nn.initializers.normal(std)
    init_out = jax.nn.initializers.normal(std * out_depth_factor(cfg, layer))
    shape_in, axes_in = (num_experts, d, d_expert), ("experts", "embed", "mlp")
    self.up = nnx.Param(init_in(rngs.params(), shape_in, jnp.float32), out_sharding=axes_in)
    self.gate = (nnx.Param(init_in(rngs.params(), shape_in, jnp.float32), out_sharding=axes_in)
                 if self.gated else None)
    self.down = nnx.Param(init_out(rngs.params(), (num_experts, d_expert, d), jnp.float32),
                          out_sharding=("experts", "mlp", "embed"))
    self.dtype = dtype

  def weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    return (self.up[...], None if self.gate is None else self.gate[...], self.down[...])

  def __call__(self, xe: jax.Array) -> jax.Array:
    mesh = expert_parallel_mesh()
    if mesh is not None:
      return expert_parallel(self, xe, mesh)
    return expert_ffn(xe, *self.weights(), act=self.act, dtype=self.dtype)

  def params_per_expert(self) -> int:
    return sum(math.prod(p.shape[1:]) for p in (self.up, self.gate, self.down) if p is not None)


def expert_ffn(xe: jax.Array, up: jax.Array, gate: jax.Array | None, down: jax.Array, *, act,
               dtype) -> jax.Array:
  """The experts [E, d, f] / [E, f, d] applied to their buffers xe [E, G, C, d]."""
  xe = xe.astype(dtype)
  h = jnp.einsum("egcd,edf->egcf", xe, up.astype(dtype))
  if gate is not None:
    h = act(jnp.einsum("egcd,edf->egcf", xe, gate.astype(dtype)), h)
  else:
    h = act(h)
  return jnp.einsum("egcf,efd->egcd", h, down.astype(dtype))


def expert_parallel_mesh():
  """The current mesh when its `expert` axis is > 1 (the experts run expert-parallel), else
  None."""
  mesh = sharding_lib.current_mesh()
  return mesh if mesh is not None and mesh.shape.get("expert", 1) > 1 else None


def expert_parallel(experts: "Experts", xe: jax.Array, mesh) -> jax.Array:
  """Expert parallelism: the buffers xe [E, G, C, d] of each device's own groups go to the
  devices that hold their experts by an all-to-all over the `expert` mesh axis, the local
  experts [E / n, ...] run on [E / n, n G_local, C, d], and a second all-to-all brings the
  outputs back. Inside shard_map: the experts' weights are never gathered over `expert` (an
  fsdp-sharded weight is gathered over fsdp, as FSDP does for every weight)."""
  n = mesh.shape["expert"]
  num_experts = xe.shape[0]
  if num_experts % n:
    raise ConfigError(f"expert parallelism over {n} devices needs model.channel.moe.num_experts "
                      f"divisible by {n} (it is {num_experts})")
  groups = sharding_lib.logical_to_spec(("batch",), (xe.shape[1],), mesh)[0]
  buffers = P(None, groups, None, None)
  weight = P("expert", None, None)
  up, gate, down = experts.weights()

  def local(xe, up, down, *gate):
    xe = jax.lax.all_to_all(xe, "expert", 0, 1, tiled=True)      # [E/n, n G_l, C, d]
    y = expert_ffn(xe, up, gate[0] if gate else None, down, act=experts.act,
                   dtype=experts.dtype)
    return jax.lax.all_to_all(y, "expert", 1, 0, tiled=True)     # [E, G_l, C, d]

  args = (xe, up, down) + ((gate,) if gate is not None else ())
  return jax.shard_map(local, mesh=mesh, in_specs=(buffers,) + (weight,) * (len(args) - 1),
                       out_specs=buffers, check_vma=False)(*args)


# ------------------------------------------------------------------------------ the mixer

def resolve(m) -> None:
  """run_config.resolve hook: d_expert = 0 -> d_ff // top_k (activated FFN compute = the dense
  FFN's); checks the combination."""
  e = m.channel.moe
  if not 1 <= e.top_k <= e.num_experts:
    raise ConfigError(f"model.channel.moe.top_k={e.top_k} must be in [1, num_experts="
                      f"{e.num_experts}]")
  if e.dispatch not in DISPATCHES:
    raise ConfigError(f"model.channel.moe.dispatch='{e.dispatch}' is not one of "
                      f"{', '.join(DISPATCHES)}")
  routers.check(e)
  if e.router == "maxscore" and e.dispatch == "capacity" and e.capacity_factor < 1:
    raise ConfigError(f"model.channel.moe.router=maxscore assigns every token k experts within "
                      f"capacity: capacity_factor={e.capacity_factor} must be >= 1")
  if e.d_expert == 0:
    e.d_expert = max(1, m.channel.d_ff // e.top_k)


@ffn_lib.CHANNEL_MIXERS.register("moe")
class MoE(ffn_lib.ChannelMixer):
  """Top-k routed mixture of FFN experts (see the module docstring)."""

  resolve = staticmethod(resolve)
  defaults = dict(moe=dict(
      num_experts=8, top_k=2,
      d_expert=0,  # 0: d_ff // top_k (activated FFN compute = the dense FFN's)
      dispatch="dropless",  # dropless (capacity = group size) | capacity
      capacity_factor=1.25,  # capacity: ceil(factor * seq * top_k / num_experts) slots
      aux_coef=0.01, z_coef=0.0,  # Switch load-balancing loss; router z-loss (ST-MoE)
      norm_topk=False,  # renormalize the top-k gates to sum 1
      router="topk",  # topk | gatepro | maxscore (research/model/routers.py; their settings
                      # moe.gatepro.*, moe.maxscore.* come with routers.SWITCH)
      # ERC (expert-router coupling) loss: weight (0 = off; the paper's 1), margin alpha, the
      # proxies' bounded noise (False: the clean router rows, the paper's ablation), and
      # whether its gradient reaches the router rows (the paper's pseudocode is ambiguous)
      erc_coef=0.0, erc_alpha=1.0, erc_noise=True, erc_router_grad=True))

  def __init__(self, cfg, *, layer: int, dtype, rngs: nnx.Rngs):
    e = cfg.channel.moe
    if e.d_expert <= 0:
      raise ConfigError("model.channel.moe.d_expert is 0: resolve the config first")
    self.num_experts, self.top_k = e.num_experts, e.top_k
    self.dispatch, self.capacity_factor = e.dispatch, e.capacity_factor
    self.aux_coef, self.z_coef = e.aux_coef, e.z_coef
    self.erc_coef, self.erc_alpha, self.erc_noise = e.erc_coef, e.erc_alpha, e.erc_noise
    self.erc_router_grad = e.erc_router_grad
    if self.erc_coef < 0 or self.erc_alpha < 0:
      raise ConfigError(f"model.channel.moe.erc_coef={self.erc_coef} and erc_alpha="
                        f"{self.erc_alpha} must be >= 0")
    self.layer = layer
    kind = e.get("router", "topk")
    self.router = Router(cfg.d_model, e.num_experts, e.top_k, std=init_std(cfg),
                         norm_topk=e.norm_topk, rngs=rngs, kind=kind,
                         gatepro=e.gatepro.to_dict() if kind == "gatepro" else None,
                         maxscore=e.maxscore.to_dict() if kind == "maxscore" else None)
    self.experts = Experts(cfg, e.num_experts, e.d_expert, layer=layer, dtype=dtype, rngs=rngs)
    self.d_model, self.d_expert = cfg.d_model, e.d_expert

  def __call__(self, x: jax.Array, ctx) -> jax.Array:
    # x: [batch, seq, embed]; groups are sequences.
    capacity = capacity_for(self.dispatch, x.shape[1], self.num_experts, self.top_k,
                            self.capacity_factor)
    routing = self.router(x, progress=None if ctx is None else ctx.progress, capacity=capacity)
    if ctx is not None:
      if self.aux_coef > 0:
        ctx.add_aux_loss("moe_balance", self.aux_coef * switch_balance_loss(routing))
      if self.z_coef > 0:
        ctx.add_aux_loss("moe_z", self.z_coef * router_z_loss(routing))
      if self.erc_coef > 0 and ctx.dropout_key is not None:  # training forwards only
        self._add_erc_loss(ctx)
    plan = plan_dispatch(routing.experts, self.num_experts, capacity)
    if ctx is not None:
      ctx.add_stat("moe_dropped", plan.dropped / plan.kept.size)
      for name, value in routers.diagnostics(routing.probs, routing.experts, plan.kept,
                                             routing.row_cos).items():
        ctx.add_stat(name, jax.lax.stop_gradient(value))
    buffers = dispatch_tokens(x, plan)
    if expert_parallel_mesh() is not None:
      out = self.experts(buffers)  # expert parallel: placed by its shard_map (expert_parallel)
    else:
      buffers = constrain(buffers, ("act_experts", "batch", None, "act_embed"))
      out = constrain(self.experts(buffers), ("act_experts", "batch", None, "act_embed"))
    return combine(out, plan, routing.experts, routing.gates).astype(x.dtype)

  def _add_erc_loss(self, ctx) -> None:
    rows = self.router.kernel[...].T  # [E, d]: R
    if not self.erc_router_grad:  # ERC then trains the experts' gate projections only
      rows = jax.lax.stop_gradient(rows)
    gate = self.experts.gate if self.experts.gated else self.experts.up  # W_g [E, d, D]
    if self.erc_noise:
      key = jax.random.fold_in(jax.random.fold_in(ctx.dropout_key, ERC_NOISE_STREAM), self.layer)
      proxies, eps = erc_proxies(rows, key)
      ctx.add_stat("erc_eps", jnp.mean(eps))
    else:
      proxies = rows
    value = erc_loss(proxies, gate[...], self.erc_alpha)
    ctx.add_aux_loss("moe_erc", self.erc_coef * value)
    ctx.add_stat("erc", value)

  def flops_per_token(self, seq_len: int) -> float:
    # ERC's 2 E^2 d D per layer and step does not grow with the tokens: not counted
    del seq_len
    matrices = 3 if self.experts.gated else 2
    router = 2 * self.d_model * self.num_experts
    return router + self.top_k * 2 * self.d_model * self.d_expert * matrices

  def sparse_parameters(self) -> list[tuple[int, int, int]]:
    """The experts: E of them, k read per token (research/model/accounting.py)."""
    return [(self.num_experts, self.experts.params_per_expert(), self.top_k)]
