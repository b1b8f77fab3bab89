"""What a run of several processes (one per host, `jax.distributed`) needs beyond one process.

Every process runs the same program over one global mesh, but each holds only its own devices'
shards of a batch-sharded array, and host-side state (conversations, files, logs) is its own. The
helpers here are the only places that cross that line:

- `local_rows` / `rows_by_index` / `global_from_local_rows`: this process's rows of a batch-sharded
  array as numpy (in order, or by global row index), and a global array built from every process's
  rows;
- `fetch` (a replicated or fully addressable value, e.g. a loss) and `gather` (every row on every
  process, a collective): what replaces `jax.device_get`, which fails on an array that spans hosts;
- `allgather_json`, `agree_on_max`, `reduce_metrics`: small host values exchanged between processes
  (a shape bucket, metric sums and counts) so that every process takes the same decision;
- `check_agreement`: processes that disagree on the config or their devices stop with one error.

With one process every helper is the plain single-process operation, at no extra cost. Everything
that is a collective must be called by every process, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


class ProcessMismatch(ValueError):
    """The processes of one run disagree on what they run (config, devices, versions)."""


class NotAddressable(ValueError):
    """A value spread over several hosts was fetched as if this process held all of it."""


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def joined_processes() -> int:
    """The run's process count, asked without starting a backend when this process joined none
    (1 then): for host-side code such as an LLM client, which may be built before any device use."""
    return jax.process_count() if jax.distributed.is_initialized() else 1


def is_main_process() -> bool:
    """Process 0 writes what a run writes once: logs, metrics, plots, the HF export."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Host values exchanged between processes


def allgather_json(value: Any) -> list[Any]:
    """Every process's `value` (anything JSON can hold), in process order; a collective.

    Two fixed-shape exchanges (the lengths, then the bytes padded to the longest), so processes
    holding values of different sizes still meet in the same collective instead of hanging."""
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(json.dumps(value, sort_keys=True, default=str).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:length]).decode("utf-8")) for row, length in zip(gathered, lengths)]


def allgather_objects(value: Any) -> list[Any]:
    """Every process's `value` (any picklable object: e.g. its sampled turns), in process order;
    a collective. The peers run the same code, so pickle's round trip is exact."""
    if jax.process_count() == 1:
        return [value]
    return [pickle.loads(bytes.fromhex(text)) for text in allgather_json(pickle.dumps(value).hex())]


def agree_on_any(flag: bool) -> bool:
    """Whether any process raised `flag` (e.g. a Ctrl-C on one host): every process takes the same
    decision at the same point of the loop."""
    return bool(agree_on_max(int(bool(flag))))


def barrier(name: str) -> None:
    """Every process waits here for the others (e.g. after process 0 wrote a shared file)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree_on_max(values: int | Sequence[int]) -> int | tuple[int, ...]:
    """The largest value over processes (element-wise for a shape): the bucket every process pads
    its rows to, so that the global program sees one shape."""
    scalar = isinstance(values, (int, np.integer))
    mine = [int(values)] if scalar else [int(v) for v in values]
    every = allgather_json(mine)
    if len({len(v) for v in every}) > 1:
        raise ProcessMismatch(f"processes disagree on the rank of a shape: {every}")
    agreed = tuple(max(column) for column in zip(*every))
    return agreed[0] if scalar else agreed


def reduce_metrics(sums: Mapping[str, float], counts: Mapping[str, int] | None = None) -> dict[str, float]:
    """Metrics over every process's samples, equal to what one process holding all of them logs.

    `sums[k]` is this process's sum of metric k over its `counts[k]` samples: the result is the
    mean over all samples (sum of sums / sum of counts; 0.0 with no samples anywhere). A key
    without a count is a total (e.g. `invalid_samples`), summed over processes. Every process
    must pass the same keys."""
    counts = counts or {}
    every = allgather_json({"sums": {k: float(v) for k, v in sums.items()},
                            "counts": {k: int(v) for k, v in counts.items()}})
    keys = [sorted(e["sums"]) for e in every]
    if any(k != keys[0] for k in keys):
        differing = sorted(set().union(*map(set, keys)) - set.intersection(*map(set, keys)))
        raise ProcessMismatch(f"processes report different metrics: {differing}")
    result = {}
    for key in keys[0]:
        total = math.fsum(e["sums"][key] for e in every)
        if key in counts:
            n = sum(e["counts"].get(key, 0) for e in every)
            result[key] = total / n if n else 0.0
        else:
            result[key] = total
    return result


# ---------------------------------------------------------------------------------------------
# Arrays that span hosts


def local_row_indices(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> np.ndarray:
    """The global rows this process's devices hold, ascending (each once, even when several local
    devices hold copies of the same rows, e.g. over a tensor axis)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.asarray(sorted(rows), np.int64)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded (or replicated) array, as numpy in global row order."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    if array.ndim == 0 or array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    pieces: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].indices(array.shape[0])[0] if shard.index else 0
        if start not in pieces:  # a copy of rows already taken (another device of the same slice)
            pieces[start] = np.asarray(shard.data)
    return np.concatenate([pieces[start] for start in sorted(pieces)])


def rows_by_index(array: jax.Array) -> dict[int, np.ndarray]:
    """This process's rows of a batch-sharded (or replicated) array by global row index: a
    collective-free read of its own shards (all rows with one process)."""
    return dict(zip(local_row_indices(array.sharding, array.shape).tolist(), local_rows(array)))


def global_from_local_rows(local: np.ndarray, sharding: jax.sharding.Sharding, global_rows: int) -> jax.Array:
    """The global array whose rows on this process's devices are `local` (rows `local_row_indices`,
    in order); every process passes its own rows. With one process: a device_put of `local`."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (global_rows, *local.shape[1:]))


def put_identical(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array of `host`, which every process holds whole and identical (e.g. a minibatch
    built from the gathered experience): each process places only its own devices' slices, with no
    collective (jax.device_put would compare the data across processes first)."""
    host = np.asarray(host)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _is_local(x: Any) -> bool:
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def fetch(tree: Any) -> Any:
    """`jax.device_get` for values this process can read whole: fully addressable arrays, and
    replicated ones (a loss, a metric) read from a local copy. An array split over hosts raises
    NotAddressable naming its shape and sharding: use `local_rows` (this process's rows) or
    `gather` (every row, a collective) for those."""
    def one(x):
        if _is_local(x):
            return jax.device_get(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        raise NotAddressable(
            f"an array of shape {x.shape} sharded as {x.sharding.spec if hasattr(x.sharding, 'spec') else x.sharding} "
            f"spans {len(x.sharding.device_set)} devices of several processes; this process holds only its own rows "
            "(multihost.local_rows) or must gather them from every process (multihost.gather)")
    return jax.tree.map(one, tree)


def gather(tree: Any) -> Any:
    """Every array of `tree` whole on every process, as numpy. A collective when an array spans
    hosts (every process must call it, in the same order); a plain device_get otherwise."""
    if all(_is_local(x) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)) if not _is_local(x)
                        else np.asarray(jax.device_get(x)), tree)


# ---------------------------------------------------------------------------------------------
# Start-up agreement


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"ppo.actor_lr": 3e-5, ...} from a nested dict (lists and scalars are leaves)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def fingerprint(facts: Mapping[str, Any]) -> str:
    """A short sha256 of a JSON-able dict (keys sorted), as printed in a mismatch."""
    canonical = json.dumps(facts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def device_facts() -> dict[str, Any]:
    """What this process brings to the mesh: its platform, device count and kinds, JAX version."""
    devices = jax.local_devices()
    return {"platform": devices[0].platform, "local_devices": len(devices),
            "device_kinds": sorted({d.device_kind for d in devices}), "jax": jax.__version__}


def describe_differences(every: Sequence[Mapping[str, Any]], limit: int = 8) -> list[str]:
    """One line per process that differs from process 0, naming the dotted keys that differ."""
    reference = flatten(every[0])
    lines = []
    for index, facts in enumerate(every[1:], start=1):
        flat = flatten(facts)
        keys = sorted(k for k in set(reference) | set(flat) if reference.get(k, "<absent>") != flat.get(k, "<absent>"))
        if not keys:
            continue
        sections = sorted({k.split(".", 1)[0] for k in keys})
        # "process 1's config differs at ppo.actor_lr: ..." (the section named once when there is one)
        name = (lambda k: k.split(".", 1)[-1]) if len(sections) == 1 else (lambda k: k)
        shown = ", ".join(f"{name(k)}: {flat.get(k, '<absent>')!r} (process 0: {reference.get(k, '<absent>')!r})"
                          for k in keys[:limit])
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        lines.append(f"process {index}'s {' and '.join(sections)} differs at {shown}{more} "
                     f"[fingerprints {fingerprint(facts)} vs {fingerprint(every[0])}]")
    return lines


def check_agreement(facts: Mapping[str, Any]) -> None:
    """Every process exchanges `facts` (e.g. {"config": ..., "devices": device_facts()}, or
    {"error": ...} for a process that could not load its config) and raises the same
    ProcessMismatch when any differs, naming the process and the keys; a collective, so every
    process stops together instead of some waiting forever in the first training step."""
    every = allgather_json(dict(facts))
    errors = [f"process {i}: {f['error']}" for i, f in enumerate(every) if "error" in f]
    if errors:
        raise ProcessMismatch("\n".join(errors))
    differences = describe_differences(every)
    if differences:
        raise ProcessMismatch(f"the {len(every)} processes of this run disagree (every process must run the same "
                              "config on the same kind and number of devices):\n  " + "\n  ".join(differences))
