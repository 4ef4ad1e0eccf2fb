"""Device meshes and the one logical-axis rules table.

Model code names the axes of every parameter and main activation with logical names (`embed`,
`heads`, `batch`, ...) and makes no sharding decision. This file maps logical names onto mesh
axes through `LOGICAL_RULES`, the single table that every preset uses; presets differ only in
the sizes of the mesh axes:

  preset    data        fsdp        tensor  expert
  dp        N / expert  1           1       expert (1)
  fsdp      1           N / expert  1       expert (1)
  fsdp_tp   1           N / tensor  tensor  1
  ep        N / expert  1           1       expert (N when mesh.expert is 1)
  fsdp_ep   1           N / expert  1       expert (> 1)

(`expert` is expert parallelism: MoE experts are sharded on it and tokens move to their
experts' devices by an all-to-all inside shard_map (research/model/moe.py); tokens are batch-
sharded over it as well, so it is data parallelism for everything but the experts.) A logical dimension whose size does not divide by its mesh axes is
replicated instead of raising deep inside XLA; this keeps e.g. 2 KV heads on a 4-way tensor
axis legal.

Mesh axes use `AxisType.Auto` written out explicitly: activations are constrained with
`with_sharding_constraint` at a few places (`constrain`) and the compiler propagates the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research.errors import ResearchError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
PRESETS = ("dp", "fsdp", "fsdp_tp", "ep", "fsdp_ep")

# logical name -> mesh axes (None: replicated). Parameters and activations use distinct names
# for the model width so that FSDP can shard weights on `embed` while activations keep it whole.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("act_embed", None),
    ("act_stream", None),  # hyper-connection streams / VWN groups: [batch, seq, stream, embed]
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_experts", "expert"),  # MoE expert buffers [experts, groups, capacity, embed]
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("memory_slots", ("fsdp", "tensor")),
    ("ngram_rows", ("fsdp", "tensor")),  # hashed n-gram embedding tables (over-encoding)
    ("norm", None),
    ("stream", None),  # residual connection weights (hyper, frac, vwn): small, replicated
    ("layers", None),
)

_RULES = dict(LOGICAL_RULES)
_active: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar(
    "research_mesh", default=None)


class MeshError(ResearchError, ValueError):
  """The requested mesh cannot be built on the devices present."""


def mesh_shape(preset: str, num_devices: int, tensor: int = 1, expert: int = 1) -> dict[str, int]:
  if preset not in PRESETS:
    raise MeshError(f"unknown mesh preset '{preset}' (choose one of {', '.join(PRESETS)})")
  if preset in ("ep", "fsdp_ep") and tensor != 1:
    raise MeshError(f"mesh preset '{preset}' has no tensor axis (mesh.tensor={tensor})")
  if preset == "ep" and expert == 1:
    expert = num_devices
  if preset == "fsdp_ep" and expert == 1:
    raise MeshError("mesh preset 'fsdp_ep' needs mesh.expert > 1 (the expert-parallel size; "
                    "the rest of the devices is the fsdp axis)")
  if num_devices % (tensor * expert):
    raise MeshError(
        f"mesh preset '{preset}' with tensor={tensor} and expert={expert} needs a device count "
        f"divisible by {tensor * expert}, but {num_devices} devices are present")
  rest = num_devices // (tensor * expert)
  if preset == "dp":
    if tensor != 1:
      raise MeshError("mesh preset 'dp' has no tensor axis: use fsdp_tp for mesh.tensor > 1")
    return dict(data=rest, fsdp=1, expert=expert, tensor=1)
  if preset == "ep":
    return dict(data=rest, fsdp=1, expert=expert, tensor=1)
  if preset == "fsdp_ep":
    return dict(data=1, fsdp=rest, expert=expert, tensor=1)
  if preset == "fsdp":
    if tensor != 1:
      raise MeshError("mesh preset 'fsdp' has no tensor axis: use fsdp_tp for mesh.tensor > 1")
    return dict(data=1, fsdp=rest, expert=expert, tensor=1)
  return dict(data=1, fsdp=rest, expert=expert, tensor=tensor)


def make_mesh(preset: str = "dp", *, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh over all (or the given) devices; sizes that do not fit are a MeshError."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(preset, len(devices), tensor, expert)
  sizes = tuple(shape[a] for a in MESH_AXES)
  if math.prod(sizes) != len(devices):
    raise MeshError(f"mesh {shape} does not use exactly the {len(devices)} devices present")
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def initialize_distributed(mesh_cfg) -> None:
  """Multi-host start-up, when `mesh.distributed` asks for it (once per process; before any
  other jax computation). jax finds the coordinator and this process's rank on clusters it
  knows (SLURM, Open MPI, Kubernetes, TPU pods); elsewhere the launcher sets
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  CPU processes exchange collectives over gloo (TCP)."""
  if not mesh_cfg.distributed or jax.distributed.is_initialized():
    return
  import os  # pylint: disable=import-outside-toplevel
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise MeshError(f"mesh.distributed: cannot join the cluster ({str(e).splitlines()[0]}); "
                    "on a machine jax does not detect, set JAX_COORDINATOR_ADDRESS, "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None


def to_host(x) -> np.ndarray:
  """A replicated array's value on this host, also when it spans other processes' devices
  (where `np.asarray` / `float` refuse): its first local copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def mesh_from_config(mesh_cfg) -> jax.sharding.Mesh:
  """The mesh of `config.mesh`; multi-host start-up happens here, and only when asked."""
  initialize_distributed(mesh_cfg)
  devices = jax.devices()
  n = mesh_cfg.num_devices
  if n:
    if n > len(devices):
      raise MeshError(f"mesh.num_devices={n} but only {len(devices)} {devices[0].platform} "
                      "device(s) are present")
    devices = devices[:n]
  return make_mesh(mesh_cfg.preset, tensor=mesh_cfg.tensor, expert=mesh_cfg.expert,
                   devices=devices)


def split_dims(logical: Sequence[str | None] | None, shape: Sequence[int],
               mesh: jax.sharding.Mesh) -> tuple[P, list[str]]:
  """The PartitionSpec of `logical` on `mesh`, and the dims it replicates although their rule
  names mesh axes (of size > 1) because those do not divide them ("name: dim over size")."""
  if logical is None:
    return P(), []
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out, lost = [], []
  for name, dim in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in _RULES:
      raise KeyError(f"logical axis '{name}' has no rule in research.sharding.LOGICAL_RULES")
    axes = _RULES[name]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      if axes:
        lost.append(f"{name}: {dim} over {size}")
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out), lost


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: jax.sharding.Mesh) -> P:
  """Maps logical axis names to a PartitionSpec, replicating dims that do not divide."""
  return split_dims(logical, shape, mesh)[0]


def named_sharding(logical, shape, mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
  """Makes `mesh` the current mesh for jax and for `constrain` (trace jitted code inside). An
  AbstractMesh (shapes only: research/plan.py lowers on one) is entered as jax's abstract mesh."""
  token = _active.set(mesh)
  enter = (jax.sharding.use_abstract_mesh if isinstance(mesh, jax.sharding.AbstractMesh)
           else jax.set_mesh)
  try:
    with enter(mesh):
      yield mesh
  finally:
    _active.reset(token)


def current_mesh() -> jax.sharding.Mesh | None:
  return _active.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names; a no-op outside `use_mesh` or on 1 device."""
  mesh = _active.get()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(logical, x.shape, mesh))


def describe(mesh: jax.sharding.Mesh) -> str:
  return " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
