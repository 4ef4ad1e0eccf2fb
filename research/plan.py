"""`research plan`: what a config needs on a named cluster, without the cluster.

For an experiment at any scale (the `paper` scale above all) and a cluster shape from
`CLUSTERS`, the plan gives per device: parameter, optimizer-state, gradient and activation
memory under the sharding rules (research/sharding.py), whether that fits the device, the
FLOPs of a training step and its time at a stated MFU. It then lowers the real training step
on an abstract mesh of the cluster's size (`jax.sharding.AbstractMesh`: shapes and shardings,
no devices, nothing allocated): a step whose shardings do not agree fails there.

Memory, per device (bytes):
  parameters   fp32 master weights, each divided by the mesh axes its logical axes map to
  optimizer    AdamW's two fp32 moments, sharded like the parameters
  gradients    fp32, sharded like the parameters
  gathered     under FSDP, the weights gathered whole for the forward and backward, in the
               compute dtype (an unrolled step may gather every layer's at once: an upper bound)
  activations  what the backward pass keeps, in the compute dtype: per layer, the block's input
               (remat=block) or ACT_PER_TOKEN_LAYER values per token per layer of width d_model
               plus ACT_FFN_PER_TOKEN_LAYER of width d_ff and the attention scores and
               probabilities (fp32, heads x seq per token) where the jnp attention runs
               (`attention_stores_scores`; a kernel keeps a log-sum-exp per row instead),
               with one layer's full set live during the backward under remat; plus the logits and
               their gradient (fp32) over the vocabulary; divided over the data-parallel axes
               (batch) and the tensor axis (heads, FFN width, vocabulary); under token
               repetition (model.phd) the blocks hold K copies of each token
It is an estimate: a compiler may keep more (fusion buffers, collectives' staging) or less
(buffers reused). tests/test_plan.py checks it against XLA's own accounting of the compiled step
(`memory_analysis()`) on 8 CPU devices: the parameters and optimizer state exactly, the whole
within PLAN_TOLERANCE where activations dominate (tiny shapes have fixed overheads this does not
model). A plan "fits" when the total is at most FIT_FRACTION of the device's memory.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import config as config_lib
from research import sharding
from research.errors import ConfigError

# per token per layer: values of width d_model kept for the backward (norm outputs, q, k, v,
# attention output, residual inputs) and of width d_ff (gate, up, activation, down input)
ACT_PER_TOKEN_LAYER = 10
ACT_FFN_PER_TOKEN_LAYER = 4
FIT_FRACTION = 0.9  # the rest for XLA's workspace, collectives and fragmentation
PLAN_TOLERANCE = 0.25  # |estimate / XLA's accounting - 1| where activations dominate
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Cluster:
  name: str
  device: str  # the device kind, as jax names it (research/train/mfu.py PEAK_FLOPS)
  devices: int
  memory_gib: float  # per device
  peak_flops: float  # dense bf16 per device
  platform: str  # what the step is lowered for: cuda | tpu

  @property
  def backend(self) -> str:
    """jax's name for the platform's backend (gpu for cuda)."""
    return {"cuda": "gpu"}.get(self.platform, self.platform)


def _gpu(name, kind, n, mem, peak):
  return Cluster(name, kind, n, mem, peak, "cuda")


def _tpu(name, kind, chips, mem, peak):
  return Cluster(name, kind, chips, mem, peak, "tpu")


# Memory and dense bf16 peak from the vendors' data sheets. TPU slice names count TensorCores
# for v4 / v5p (two per chip: v5p-256 is 128 chips) and chips for v5e / v6e.
CLUSTERS = {c.name: c for c in (
    _gpu("h100x8", "H100", 8, 80, 989e12),
    _gpu("h100x64", "H100", 64, 80, 989e12),
    _gpu("h100x256", "H100", 256, 80, 989e12),
    _gpu("h200x8", "H200", 8, 141, 989e12),
    _gpu("a100x8", "A100", 8, 80, 312e12),
    _tpu("v4-128", "TPU v4", 64, 32, 275e12),
    _tpu("v5p-256", "TPU v5p", 128, 95, 459e12),
    _tpu("v5e-256", "TPU v5e", 256, 16, 197e12),
    _tpu("v6e-256", "TPU v6e", 256, 32, 918e12),
)}


def cluster(name: str) -> Cluster:
  if name not in CLUSTERS:
    raise config_lib.unknown_key_error(name, CLUSTERS, what="cluster")
  return CLUSTERS[name]


def local_cluster(devices=None) -> Cluster:
  """The devices of this process as a Cluster: an accelerator's memory as jax reports it, a
  CPU's share of the host memory available now (what other processes leave)."""
  from research.train import mfu  # pylint: disable=import-outside-toplevel
  devices = list(devices or jax.devices())
  d = devices[0]
  limit = (d.memory_stats() or {}).get("bytes_limit") if d.platform != "cpu" else None
  if limit is None:
    limit = _host_available_bytes() / max(len(jax.local_devices()), 1)
  return Cluster("this machine", d.device_kind, len(devices), limit / GIB,
                 mfu.peak_flops_per_device(d), d.platform)


def _host_available_bytes() -> float:
  """MemAvailable of /proc/meminfo (Linux), else the physical memory."""
  import os  # pylint: disable=import-outside-toplevel
  try:
    for line in open("/proc/meminfo", encoding="ascii"):
      if line.startswith("MemAvailable:"):
        return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fit_grad_accum(c, cl: Cluster, dtype_bytes: int) -> tuple[int, Plan]:
  """The fewest micro-batches (dividing the batch over the data-parallel mesh) whose plan
  fits `cl`; the largest count when none does (its plan says so)."""
  shape = sharding.mesh_shape(c.mesh.preset, cl.devices, c.mesh.tensor, c.mesh.expert)
  per_device = c.train.batch_size // (shape["data"] * shape["fsdp"] * shape["expert"])
  p = None
  for accum in [a for a in range(1, per_device + 1) if per_device % a == 0]:
    trial = ml_collections.ConfigDict(c.to_dict())
    trial.train.grad_accum = accum
    p = estimate(trial, cl, dtype_bytes=dtype_bytes)
    if p.fits:
      return accum, p
  return max(per_device, 1), p


def abstract_mesh(shape: dict[str, int]) -> jax.sharding.AbstractMesh:
  sizes = tuple(shape[a] for a in sharding.MESH_AXES)
  return jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def _shards(spec, mesh_shape: dict[str, int]) -> int:
  n = 1
  for entry in spec:
    for axis in (entry,) if isinstance(entry, str) else (entry or ()):
      n *= mesh_shape[axis]
  return n


@dataclasses.dataclass
class Plan:
  cluster: Cluster
  mesh: dict[str, int]
  params: float  # total parameters
  bytes_params: float  # per device, and below
  bytes_optimizer: float
  bytes_gradients: float
  bytes_gathered: float
  bytes_activations: float
  flops_per_step: float
  tokens_per_step: int
  mfu: float
  grad_accum: int = 1
  lowered: str = "not tried"  # "ok (N s)" or the error
  # parameters of at least UNSHARDED_FRACTION of the model that the mesh was meant to split but
  # cannot (a dim that does not divide its mesh axes is replicated): "path shape (axes)"
  unsharded: tuple[str, ...] = ()
  # bytes each device sends per step in the expert axis's all-to-alls (MoE expert parallelism)
  bytes_all_to_all: float = 0.0

  @property
  def bytes_total(self) -> float:
    return (self.bytes_params + self.bytes_optimizer + self.bytes_gradients
            + self.bytes_gathered + self.bytes_activations)

  @property
  def fits(self) -> bool:
    return self.bytes_total <= FIT_FRACTION * self.cluster.memory_gib * GIB

  @property
  def step_time_s(self) -> float:
    return self.flops_per_step / (self.cluster.devices * self.cluster.peak_flops * self.mfu)


UNSHARDED_FRACTION = 0.01


def estimate(c, cl: Cluster, *, mfu: float = 0.4, dtype_bytes: int = 2) -> Plan:
  """The memory and time of `c` (a resolved config with model.vocab_size set) on `cl`."""
  from research.model import abstract_model, model_summary, phd  # pylint: disable=import-outside-toplevel
  m, t = c.model, c.train
  shape = sharding.mesh_shape(c.mesh.preset, cl.devices, c.mesh.tensor, c.mesh.expert)
  data_parallel = shape["data"] * shape["fsdp"] * shape["expert"]
  accum = t.grad_accum or 1
  micro = t.batch_size // accum
  if micro % data_parallel:
    raise ConfigError(f"train.batch_size={t.batch_size} (micro-batch {micro}) does not divide "
                      f"over the {data_parallel}-way data-parallel mesh of {cl.name}")
  mesh = abstract_mesh(shape)
  model = abstract_model(m)
  summary = model_summary(model, c.data.seq_len)
  bytes_params = bytes_gathered = 0.0
  unsharded = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    logical = var.get_metadata().get("out_sharding")
    spec, lost = sharding.split_dims(logical, value.shape, mesh)
    if lost and value.size >= UNSHARDED_FRACTION * summary["params"]:
      unsharded.append(f"{'/'.join(map(str, path))} {tuple(value.shape)} ({'; '.join(lost)})")
    shards = _shards(spec, shape)
    bytes_params += value.size * 4 / shards
    fsdp = _shards([a for a in spec if a is not None and "fsdp" in ((a,) if isinstance(a, str) else a)],
                   shape)
    if fsdp > 1:
      bytes_gathered += value.size * dtype_bytes / (shards // fsdp)
  copies = phd.settings(m).copies  # token repetition: K copies of each token run the blocks
  tokens = micro // data_parallel * c.data.seq_len * copies  # per device per micro-batch
  tp = shape["tensor"]
  d, f, heads, layers = m.d_model, m.channel.d_ff, m.num_heads, m.num_layers
  per_layer = tokens * (ACT_PER_TOKEN_LAYER * d + ACT_FFN_PER_TOKEN_LAYER * f / tp) * dtype_bytes
  if attention_stores_scores(m, cl.backend, dtype_bytes):
    per_layer += tokens * heads / tp * c.data.seq_len * copies * 4 * 2  # scores, probs, fp32
  else:
    per_layer += tokens * heads / tp * 4  # a kernel's log-sum-exp per row
  if m.remat == "block":
    activations = layers * tokens * d * dtype_bytes + per_layer
  else:
    activations = layers * per_layer
  activations += 2 * tokens // copies * m.vocab_size / tp * 4  # logits and gradient, fp32
  a2a = all_to_all_bytes(m, shape, micro // data_parallel, c.data.seq_len, dtype_bytes) * accum
  return Plan(cluster=cl, mesh=shape, params=summary["params"], bytes_params=bytes_params,
              bytes_optimizer=2 * bytes_params, bytes_gradients=bytes_params,
              bytes_gathered=bytes_gathered, bytes_activations=activations,
              flops_per_step=summary["flops_per_token_train"] * t.batch_size * c.data.seq_len,
              unsharded=tuple(unsharded),
              tokens_per_step=t.batch_size * c.data.seq_len, mfu=mfu, grad_accum=accum,
              bytes_all_to_all=a2a)


def attention_stores_scores(m, backend: str, dtype_bytes: int) -> bool:
  """Whether the step's attention on `backend` (cpu | gpu | tpu) keeps its [heads, seq, seq]
  scores and probabilities for the backward: the jnp path does; the kernels (the CPU kernel in
  float32, the Pallas flash kernels) keep one log-sum-exp per query row. Mixers other than
  dense attention and MoDA are charged the scores too (an upper bound)."""
  from research.model import attention, phd  # pylint: disable=import-outside-toplevel
  if m.attention.kind not in ("dense", "moda") or phd.settings(m).active:
    return True
  impl = m.attention.impl
  if impl == "cpu" and backend != "cpu":
    return True  # refused when the model runs there
  impl = attention.resolve_impl(impl, backend)
  if m.attention.kind == "moda":
    return impl in ("xla", "cpu")  # MoDA's auto is jnp everywhere
  return impl == "xla" or (impl == "cpu" and dtype_bytes != 4)


def all_to_all_bytes(m, shape: dict[str, int], sequences: int, seq_len: int,
                     dtype_bytes: int) -> float:
  """Bytes one device sends per micro-batch in the all-to-alls of expert parallelism
  (research/model/moe.py `expert_parallel`): each MoE layer moves its dispatch buffers
  [E, sequences, C, d] to the experts' devices and the outputs back, forward and backward
  (4 all-to-alls), of which (n - 1) / n leaves the device on an n-way `expert` axis. Zero
  without MoE or without an expert axis."""
  from research.model import moe  # pylint: disable=import-outside-toplevel
  n = shape.get("expert", 1)
  if m.channel.kind != "moe" or n <= 1:
    return 0.0
  e = m.channel.moe
  capacity = moe.capacity_for(e.dispatch, seq_len, e.num_experts, e.top_k, e.capacity_factor)
  buffer = e.num_experts * sequences * capacity * m.d_model * dtype_bytes
  return m.num_layers * 4 * buffer * (n - 1) / n


def lower_step(c, cl: Cluster) -> float:
  """Lowers the training step of `c` on an abstract mesh of `cl` (shapes only) for its
  platform; returns the seconds it took. Raises what the lowering raises."""
  from research.model import abstract_model, attention, compute_dtype  # pylint: disable=import-outside-toplevel
  from research.model import lr_multipliers  # pylint: disable=import-outside-toplevel
  from research.train import optim  # pylint: disable=import-outside-toplevel
  from research.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  from research.train.trainer import make_train_step  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  shape = sharding.mesh_shape(c.mesh.preset, cl.devices, c.mesh.tensor, c.mesh.expert)
  mesh = abstract_mesh(shape)
  dtype = compute_dtype(c.train.precision, "gpu" if cl.platform == "cuda" else "tpu")
  model_cfg = copy.deepcopy(c.model)  # attention's impl as the target resolves it, not the host
  model_cfg.attention.impl = attention.resolve_impl(model_cfg.attention.impl, cl.backend)
  model = abstract_model(model_cfg, dtype)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)

  def placed(state):
    def one(var):
      value = var.get_value()
      spec = sharding.logical_to_spec(var.get_metadata().get("out_sharding"), value.shape, mesh)
      return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                              sharding=jax.sharding.NamedSharding(mesh, spec)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  params, other = placed(params), placed(other)
  tx, schedule = make_optimizer(c.train, lr_multipliers(c.model, c.train.steps))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with sharding.use_mesh(mesh):
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optim.state_shardings(tx, params, replicated)
  opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           opt_state, opt_shardings)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params,
           "other": other, "opt_state": opt_state}
  batch_sharding = sharding.named_sharding(("batch", "seq"),
                                           (c.train.batch_size, c.data.seq_len), mesh)
  batch = {k: jax.ShapeDtypeStruct((c.train.batch_size, c.data.seq_len), jnp.int32,
                                   sharding=batch_sharding) for k in ("inputs", "targets")}
  with sharding.use_mesh(mesh):
    jax.jit(make_train_step(graphdef, tx, schedule, c)).trace(state, batch).lower(
        lowering_platforms=(cl.platform,))
  return time.perf_counter() - start


def plan(c, cl: Cluster, *, mfu: float = 0.4, lower: bool = True) -> Plan:
  """The estimate of `c` on `cl` (with train.grad_accum = 0: the fewest micro-batches that
  fit), and the lowering of its step."""
  if c.train.grad_accum == 0:
    c = ml_collections.ConfigDict(c.to_dict())
    c.train.grad_accum, _ = fit_grad_accum(c, cl, dtype_bytes=2)
  p = estimate(c, cl, mfu=mfu)
  if lower:
    try:
      p.lowered = f"ok ({lower_step(c, cl):.0f} s)"
    except Exception as e:  # the plan still says what it knows; the reason is the finding
      p.lowered = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
  return p


def _gib(x: float) -> str:
  return f"{x / GIB:,.1f}"


def table(plans: list[Plan]) -> str:
  lines = ["| cluster | devices | mesh | accum | params/dev GiB | optimizer GiB | grads GiB | "
           "gathered GiB | activations GiB | total GiB (of) | fits | TFLOP/step | step s @MFU | "
           "tokens/s | lowering |", "|" + "---|" * 15]
  for p in plans:
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "1 device"
    lines.append(
        f"| {p.cluster.name} | {p.cluster.devices} x {p.cluster.device} | {mesh} | "
        f"{p.grad_accum} | "
        f"{_gib(p.bytes_params)} | {_gib(p.bytes_optimizer)} | {_gib(p.bytes_gradients)} | "
        f"{_gib(p.bytes_gathered)} | {_gib(p.bytes_activations)} | {_gib(p.bytes_total)} ({p.cluster.memory_gib:g}) | "
        f"{'yes' if p.fits else 'NO'} | {p.flops_per_step / 1e12:,.0f} | "
        f"{p.step_time_s:.2f} @{p.mfu:.0%} | {p.tokens_per_step / p.step_time_s:,.0f} | "
        f"{p.lowered} |")
  for p in plans:
    if p.bytes_all_to_all:
      lines.append(f"- {p.cluster.name}: the expert axis's all-to-alls send "
                   f"{_gib(p.bytes_all_to_all)} GiB per device per step "
                   f"({p.bytes_all_to_all / p.tokens_per_step * p.cluster.devices / 1e3:,.1f} "
                   f"KB per token per device)")
  for p in plans:
    for item in p.unsharded:
      lines.append(f"- {p.cluster.name}: replicated, its dim does not divide the mesh: {item}")
  return "\n".join(lines)
