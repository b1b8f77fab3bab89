"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Sharding is declared once: the model names the logical axes of every parameter and activation,
and LOGICAL_RULES below map those names onto the mesh axes (data, fsdp, tensor). The same code
runs on 1 CPU, on 8 fake CPU devices, and on 8 GPUs; only MeshConfig changes.
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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; -1 on one axis means 'all remaining devices'."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes; -1 takes the remaining devices. Fixed sizes that use fewer devices than exist
    run on the first ones (a one-device job on an 8-GPU host), but must divide the device count."""
    sizes = [config.data, config.fsdp, config.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {config}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {config}: axis sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh data={config.data} fsdp={config.fsdp} tensor={config.tensor} does not divide "
            f"the {num_devices} available devices"
        )
    if free:
        sizes[free[0]] = num_devices // known
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types, so logical constraints inside jit are honoured."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    used = devices[: math.prod(shape)]
    if len(used) < len(devices):
        log.info("mesh %s uses %d of %d devices", shape, len(used), len(devices))
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


def initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when launched as one process of several hosts.

    Detects the usual launchers (explicit JAX_COORDINATOR_ADDRESS, SLURM, Open MPI); a single
    process does nothing, so the same launch script runs on a laptop and on a cluster.
    """
    multi_host = (
        "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if not multi_host:
        return False
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
