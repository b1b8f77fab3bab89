"""Will an iteration fit the devices? Its largest programs compiled (never run) at start-up, with
abstract arguments that carry the run's shardings, and each one's per-device memory, plus what
stays resident beside it, compared with a device's memory: a config that would not fit stops
before the warm start with the program, the estimate and the setting to change, instead of an
out-of-memory crash an hour in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rlpa_jax.model.qwen2 import CACHE_AXES, Qwen2Config
from rlpa_jax.runtime import parallel
from rlpa_jax.runtime.compiled_cost import ProgramCost, fits, program_cost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Program:
    name: str
    lowered: jax.stages.Lowered
    resident_bytes: int  # live on each device beside the program's arguments (training state, kept prompt caches)
    advice: str  # the settings that shrink it


def device_memory_bytes() -> float | None:
    """The first local device's memory (None where the backend does not say, e.g. CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics raise or return None
        return None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (its shard of every leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kept_prompt_cache_bytes(config: Qwen2Config, mesh: Mesh, rows: int, slots: int, caches: int) -> int:
    """Per-device bytes of `caches` kept prompt caches (prefix_cache.PromptCache): keys and values of
    `rows` prompts x `slots` prompt slots in every layer, in the compute dtype, split as the
    sampler's cache is (rows over data and fsdp, key/value heads over tensor where they divide).
    Per-layer lists or one stacked array: the same bytes."""
    shape = (config.num_layers, rows, slots, config.num_kv_heads, config.head_dim)
    sharding = NamedSharding(mesh, parallel.logical_to_spec(CACHE_AXES, shape, mesh))
    return caches * 2 * math.prod(sharding.shard_shape(shape)) * np.dtype(config.dtype).itemsize


def rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))


def check(programs: list[Program], device_bytes: float) -> list[ProgramCost]:
    """Compiles each program and raises ValueError for the first that does not fit."""
    costs = []
    for program in programs:
        cost = program_cost(program.name, program.lowered.compile())
        problem = fits(cost, device_bytes, program.resident_bytes)
        if problem:
            raise ValueError(f"this run would not fit its devices: {problem}. {program.advice}")
        log.info("memory check: %s needs %.2f GB of %.1f GB per device", program.name,
                 (cost.accelerator_memory_bytes + program.resident_bytes) / 1e9, device_bytes / 1e9)
        costs.append(cost)
    return costs
