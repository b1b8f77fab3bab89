"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Sharding is declared once: the model names the logical axes of every parameter and activation,
and LOGICAL_RULES below map those names onto the mesh axes (data, fsdp, tensor). The same code
runs on 1 CPU, on 8 fake CPU devices, and on 8 GPUs; only the config's mesh section (MeshConfig)
changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.qwen2 import Params, Qwen2Config, init_params, param_logical_axes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Parameters shard their "embed" dimension over fsdp (ZeRO-3 style) and
# their head / mlp / vocab dimensions over tensor; activations shard batch over data and fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("cache_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_length", None),
    ("activation_embed", None),
    ("cache_length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes over `config.devices` devices (null: all `num_devices` present); -1 takes the
    remaining ones. Sizes that span fewer devices are refused rather than leaving the rest idle (a
    config made for 8 GPUs on 2 hosts x 8): the error names the sizes that would use them all, and
    `mesh.devices` for a deliberately smaller mesh."""
    sizes = [config.data, config.fsdp, config.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {config}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {config}: axis sizes must be positive or -1")
    if config.devices is not None and not 1 <= config.devices <= num_devices:
        raise ValueError(f"mesh.devices={config.devices}, but {num_devices} devices are present")
    target = config.devices or num_devices
    where = f"the {target} available devices" if config.devices is None else f"mesh.devices={target}"
    described = f"mesh data={config.data} fsdp={config.fsdp} tensor={config.tensor}"
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if target % known:
            raise ValueError(f"{described} does not divide {where}")
        sizes[free[0]] = target // known
    elif known != target:
        raise ValueError(_mesh_size_mismatch(described, dict(zip(MESH_AXES, sizes)), target, config.devices))
    return tuple(sizes)


def _mesh_size_mismatch(described: str, sizes: dict[str, int], target: int, devices: int | None) -> str:
    """Why fixed axis sizes do not span `target` devices, and the sizes that would."""
    known = math.prod(sizes.values())
    fits = [f"mesh.{axis}={target * size // known}" for axis, size in sizes.items()
            if (target * size) % known == 0]
    use_all = (f"use {'them' if devices else 'every device'} with "
               f"{' or '.join(fits) or f'axis sizes whose product is {target}'} (or -1 on that axis)")
    if devices is not None:
        return f"{described} spans {known} devices, but mesh.devices={devices}; {use_all}"
    if known > target:
        return f"{described} needs {known} devices, but {target} are present; {use_all}"
    return (f"{described} spans {known} of the {target} devices present and would leave {target - known} idle; "
            f"{use_all}, or run on the first {known} with mesh.devices={known}")


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types, so logical constraints inside jit are honoured, over every
    device (of `devices`, default jax.devices()) or the first `config.devices` of them."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    used = devices[: math.prod(shape)]
    if len(used) < len(devices):
        log.info("mesh %s uses %d of %d devices (mesh.devices=%d)", shape, len(used), len(devices), len(used))
    left_out = sorted({d.process_index for d in devices} - {d.process_index for d in used})
    if left_out:
        raise ValueError(f"mesh.devices={len(used)} leaves process{'es' if len(left_out) > 1 else ''} "
                         f"{', '.join(map(str, left_out))} without a device: a run of several processes "
                         f"spans all of theirs (mesh.devices=null)")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(used).reshape(shape), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Enter the mesh and the logical rules: inside, model activations carry their constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    unused: frozenset[str] = frozenset()) -> PartitionSpec:
    """PartitionSpec for one array; a dimension its mesh axes do not divide stays replicated.

    Qwen2.5-3B has 2 key/value heads, so on tensor=8 those weights fall back to replication
    instead of failing; a mesh axis is never used twice in one spec. Mesh axes in `unused` are
    left out (a layout that replicates over them).
    """
    rules = dict(LOGICAL_RULES)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and a not in unused and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def shardings_for(logical_axes: Any, shapes: Any, mesh: Mesh, unused: frozenset[str] = frozenset()) -> Any:
    """NamedSharding tree from a logical-axes tree and a matching tree of arrays or shape structs."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, unused)),
        logical_axes,
        shapes,
        is_leaf=_is_axes,
    )


def param_shardings(config: Qwen2Config, mesh: Mesh, head: str = "lm", unused: frozenset[str] = frozenset()) -> Params:
    """The sharding of every parameter of a Qwen2 policy (head="lm") or critic (head="value"); mesh
    axes in `unused` are not used (e.g. {"data", "fsdp"}: split over tensor only)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))
    return shardings_for(param_logical_axes(config, head), abstract, mesh, unused)


def shard(tree: Any, shardings: Any) -> Any:
    """Place a pytree on the mesh (a no-op for leaves already placed that way)."""
    return jax.device_put(tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp), everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# Bounds on waiting for other processes (seconds), overridable from the environment of every process:
# a process that never arrives fails the others' start after INIT; one that dies (killed, a lost
# host) is declared dead after HEARTBEAT and every other process then stops with JAX's "another
# task died" error (it aborts, exit status 134) instead of waiting forever in a collective.
ENV_INIT_TIMEOUT = "RLPA_DISTRIBUTED_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "RLPA_DISTRIBUTED_HEARTBEAT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


@dataclasses.dataclass(frozen=True)
class DistributedLaunch:
    """How this process joins a multi-process run; None fields are left to JAX's cluster detection."""

    launcher: str  # "env" (JAX_* variables), "slurm" or "openmpi"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S


def _env_int(environ, name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}")
    return value


def distributed_launch(environ=os.environ) -> DistributedLaunch | None:
    """The multi-process launch this environment describes, or None for a single process.

    JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (by hand, ssh, any launcher)
    are read here and passed on; under SLURM (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE
    > 1) JAX's own cluster detection finds them. A half-set JAX_* triple is an error naming what is
    missing, not a process that waits for peers that were never started."""
    timeouts = dict(init_timeout_s=_env_int(environ, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S, 1),
                    heartbeat_timeout_s=_env_int(environ, ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S, 1))
    cluster = ("slurm" if _env_int(environ, "SLURM_NTASKS", 1) > 1 else
               "openmpi" if _env_int(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1 else None)
    explicit = {name: environ.get(name) for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    if any(explicit.values()):
        missing = [name for name, value in explicit.items() if not value]
        if missing and cluster is None:  # under SLURM / Open MPI, JAX detects what is not set
            raise ValueError(f"multi-process launch: {', '.join(missing)} not set (a run started by hand needs "
                             "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process)")
        count = _env_int(environ, "JAX_NUM_PROCESSES", minimum=1)
        index = _env_int(environ, "JAX_PROCESS_ID")
        if count is not None and index is not None and index >= count:
            raise ValueError(f"JAX_PROCESS_ID={index} must be below JAX_NUM_PROCESSES={count}")
        return DistributedLaunch(cluster or "env", explicit["JAX_COORDINATOR_ADDRESS"] or None, count, index, **timeouts)
    if cluster is not None:
        return DistributedLaunch(cluster, **timeouts)
    return None


def initialize_distributed(environ=os.environ) -> bool:
    """Join the run's other processes (jax.distributed.initialize) when launched as one of several;
    a single process does nothing, so the same launch script runs on a laptop and on a cluster.

    Must run before anything touches a JAX device. CPU collectives go through gloo (the CPU
    backend has no other cross-process implementation); GPUs use NCCL regardless of that setting.
    """
    launch = distributed_launch(environ)
    if launch is None:
        return False
    if jax.distributed.is_initialized():  # joined already (a second launch script's main in one process)
        return True
    if not environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
                               process_id=launch.process_id, initialization_timeout=launch.init_timeout_s,
                               heartbeat_timeout_seconds=launch.heartbeat_timeout_s)
    log.info("jax.distributed (%s): process %d of %d, %d local of %d devices", launch.launcher, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
