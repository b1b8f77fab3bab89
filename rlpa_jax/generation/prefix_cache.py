"""Prefix (KV-cache) reuse across dialogue turns: prefill only what a prompt adds to the last one.

A conversation's prompt for turn t+1 shares a long prefix with its prompt for turn t: everything
up to the previous assistant turn, which is re-rendered without its profile block; after that come
that reply, the user's message, the chosen turn (with its profile) and the user's answer. The
keys and values of a causal model at a slot depend only on the tokens up to it and their
positions, so a token of the shared prefix has the same cache entry in both prompts. Each call
here therefore keeps its rows' prompt cache (before the n-way copy) and, next call, matches every
new prompt with the kept row that shares its longest prefix (host side, exact token comparison:
any mismatch, a truncated history included, just shortens what is reused, down to nothing),
copies those entries into a fresh cache (one gather on device, so padding never accumulates
across turns) and prefills only the rest. Decoding is sampler.decode, as for a full prefill.

The fresh cache of a call with prompts of at most T tokens (T bucketed as for a full prefill):

    slots [0, K)       each row's kept prefix, right-aligned (masked holes on the left)
    slots [K, T)       the new suffix block, S = T - K slots, left-padded (holes masked)
    slots [T, T + new) the decode slots, as sampler.generate lays them out

with S a multiple of the smallest bucket (suffixes are about one exchange long, so a run meets
few sizes and compiles a handful of programs). The suffix is written where no kept entry lives,
so padding never clobbers the prefix; positions are explicit (a token's position is the number of
real tokens before it), so the holes change nothing but float rounding. Rows whose prefix does
not fit K keep less of it.

The kept cache has the form of the cache the prefill ran on: per-layer lists under
SamplingLayout's per-layer weights (what the sampler reads), one stacked array for stacked
parameters. Per-layer is the cheaper form to keep there: the same bytes, but a stacked kept cache
would make the sampling program concatenate the layers' prompt slots into one array on the way
out and, next call, slice each layer's prefix back out of it on the way in (XLA:CPU copies a
slice of a stacked array, see layer_stacks.unstack_layers); per layer, each slab is written and read
where it lies.

The cache is valid for one set of parameters: it lives for one rollout (PPO updates between
rollouts change the parameters; rollout.schedule=turn, which updates between turns, samples
with full prefills).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from typing import Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rlpa_jax.generation.sampler import (
    Generation,
    SamplingParams,
    bucket,
    constrain_cache,
    decode,
    empty_cache,
    is_per_layer,
)
from rlpa_jax.model.qwen2 import (
    CACHE_AXES,
    Cache,
    Params,
    Qwen2Config,
    forward,
    positions_from_mask,
)
from rlpa_jax.runtime import parallel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptCache:
    """One call's prompts as they sit in its prefilled cache (on device) and where (on the host)."""

    # The prompt slots only, before the n-way copy, in the form the parameters run on: per-layer
    # lists of (rows, T, kv_heads, head_dim) for SamplingLayout's per-layer weights, one stacked
    # (layers, rows, T, kv_heads, head_dim) array each for stacked ones.
    cache: Cache
    rows: int  # the rows of the call that made it (how they split over devices)
    prompts: dict[int, np.ndarray]  # by global row: the prompt each of this process's rows holds
    slots: dict[int, np.ndarray]  # by global row: that prompt's cache slots, in token order


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Host arrays for this process's rows of one call (`rows_here` order): which kept entries to
    copy and which suffix tokens to prefill."""

    rows_here: list[int]  # the global rows these arrays fill
    source_rows: np.ndarray  # (rows_here,) int32: the kept row each prompt copies its prefix from
    source_slots: np.ndarray  # (rows_here, K) int32: its slots there, right-aligned (0 in holes)
    kept_mask: np.ndarray  # (rows_here, K) bool
    kept: np.ndarray  # (rows_here,) int32: prefix tokens reused per row
    suffix_tokens: np.ndarray  # (rows_here, S) int32, left-padded
    suffix_mask: np.ndarray  # (rows_here, S) bool
    full_length: int  # T: the prompt slots a full prefill would use (K + S)


def common_prefix_lengths(prompt: np.ndarray, kept: Sequence[np.ndarray]) -> np.ndarray:
    """For each kept prompt, how many leading tokens it shares with `prompt`."""
    lengths = np.zeros(len(kept), np.int64)
    for i, old in enumerate(kept):
        n = min(len(old), len(prompt))
        differ = np.flatnonzero(old[:n] != prompt[:n])
        lengths[i] = differ[0] if differ.size else n
    return lengths


def block_start(row: int, rows: int, previous_rows: int, shards: int) -> int:
    """The first kept row on the device that holds `row` of a `rows`-row call (rows split into
    `shards` equal blocks, as the kept call's `previous_rows` are)."""
    return (row * shards // rows) * previous_rows // shards


def match_prefixes(prompts: Mapping[int, np.ndarray], rows: int, previous: PromptCache | None,
                   shards: int = 1) -> dict[int, tuple[int, int]]:
    """For each row's prompt: (the kept row sharing its longest prefix, how many of its tokens to
    reuse). Only kept rows on the same device are candidates (the copy is device-local); at least
    the last token of every prompt is prefilled (its logits start the decoding)."""
    matches = {}
    for row, prompt in prompts.items():
        if previous is None or not previous.prompts:
            matches[row] = (0, 0)
            continue
        shard = row * shards // rows
        candidates = [r for r in sorted(previous.prompts) if r * shards // previous.rows == shard]
        if not candidates:
            matches[row] = (block_start(row, rows, previous.rows, shards), 0)
            continue
        lengths = common_prefix_lengths(prompt, [previous.prompts[r] for r in candidates])
        best = int(np.argmax(lengths))
        matches[row] = (candidates[best], min(int(lengths[best]), len(prompt) - 1))
    return matches


def plan_prefill(prompts: Mapping[int, Sequence[int]], rows_here: Sequence[int], rows: int,
                 previous: PromptCache | None, pad_id: int, length_buckets: Sequence[int], shards: int = 1,
                 agree: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda values: values) -> PrefillPlan:
    """Match each prompt (by global row; this process's rows `rows_here` of a `rows`-row call)
    with its longest shared prefix among `previous`' rows and lay out the rest. Rows without a
    prompt are all padding, as in sampler.left_pad. `agree` makes the lengths that set the
    program's shapes the same on every process (multihost.agree_on_max; one process: as they are)."""
    prompts = {row: np.asarray(p, np.int32) for row, p in prompts.items()}
    if any(len(p) == 0 for p in prompts.values()):
        raise ValueError("plan_prefill: a prompt is empty")
    matches = match_prefixes(prompts, rows, previous, shards)
    unshared = [len(p) - matches[row][1] for row, p in prompts.items()]
    longest, most_unshared, any_shared = agree((max(map(len, prompts.values()), default=1), max(unshared, default=0),
                                                int(any(shared for _, shared in matches.values()))))
    full_length = bucket(longest, length_buckets)
    # The suffix block fits the longest unshared part, rounded up to a multiple of the smallest
    # bucket (rounding to the buckets themselves would leave much less room for the kept
    # prefixes); prefixes longer than the rest of T shrink. Nothing shared: a full prefill.
    granularity = min(length_buckets)
    suffix_length = min(-(-most_unshared // granularity) * granularity, full_length) if any_shared else full_length
    kept_length = full_length - suffix_length

    here = len(rows_here)
    previous_rows = previous.rows if previous is not None else rows
    source = np.array([matches[row][0] if row in prompts else block_start(row, rows, previous_rows, shards)
                       for row in rows_here], np.int32)
    kept = np.array([min(matches[row][1], kept_length) if row in prompts else 0 for row in rows_here], np.int32)
    source_slots = np.zeros((here, kept_length), np.int32)
    kept_mask = np.zeros((here, kept_length), bool)
    suffix_tokens = np.full((here, suffix_length), pad_id, np.int32)
    suffix_mask = np.zeros((here, suffix_length), bool)
    for i, row in enumerate(rows_here):
        if row not in prompts:
            continue
        k = int(kept[i])
        if k:
            source_slots[i, kept_length - k:] = previous.slots[int(source[i])][:k]
            kept_mask[i, kept_length - k:] = True
        suffix = prompts[row][k:]
        suffix_tokens[i, suffix_length - len(suffix):] = suffix
        suffix_mask[i, suffix_length - len(suffix):] = True
    return PrefillPlan(list(rows_here), source, source_slots, kept_mask, kept, suffix_tokens, suffix_mask, full_length)


def prompt_slots(plan: PrefillPlan, i: int) -> np.ndarray:
    """Where the prompt tokens of the plan's i-th row sit in the cache the plan builds."""
    kept_length, full_length = plan.source_slots.shape[1], plan.full_length
    return np.concatenate([np.arange(kept_length - plan.kept[i], kept_length),
                           np.arange(full_length - plan.suffix_mask[i].sum(), full_length)]).astype(np.int32)


def copy_prefixes(previous: Cache, source_rows: jax.Array, source_slots: jax.Array) -> Cache:
    """cache[layer, source_rows[i], source_slots[i, j]]: each row's kept prefix, right-aligned, in
    `previous`' form (stacked or per-layer lists).

    A program of its own, so the sampling program's shape does not depend on the last call's."""
    if is_per_layer(previous):
        return constrain_cache({k: [x[source_rows[:, None], source_slots] for x in v] for k, v in previous.items()})
    return constrain_cache({k: v[:, source_rows[:, None], source_slots] for k, v in previous.items()})


def copy_prefixes_by_device(mesh: Mesh, previous: Cache, source_rows: jax.Array, source_slots: jax.Array) -> Cache:
    """copy_prefixes where rows are split over several devices: every row copies from a kept row
    on its own device (match_prefixes picks only those), so each device gathers from its own block
    and no cache entry crosses devices (a global gather would move the whole kept cache)."""
    row_axis = 0 if is_per_layer(previous) else 1
    axes = CACHE_AXES[1:] if row_axis == 0 else CACHE_AXES  # as constrain_cache lays the cache out
    cache_specs = jax.tree.map(lambda x: parallel.logical_to_spec(axes, x.shape, mesh), previous)
    row_axes = jax.tree.leaves(cache_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0][row_axis]
    index_spec = PartitionSpec(row_axes)

    def local(cache, rows, slots):
        block = jax.tree.leaves(cache)[0].shape[row_axis]
        rows = rows - (jax.lax.axis_index(row_axes) * block if row_axes is not None else 0)
        if row_axis == 0:
            return jax.tree.map(lambda x: x[rows[:, None], slots], cache)
        return jax.tree.map(lambda x: x[:, rows[:, None], slots], cache)

    return jax.shard_map(local, mesh=mesh, in_specs=(cache_specs, index_spec, index_spec),
                         out_specs=cache_specs)(previous, source_rows, source_slots)


def _write_kept(cache: Cache, kept_cache: Cache, kept_length: int) -> Cache:
    """The kept prefixes in the first `kept_length` slots of a fresh cache of the same form."""
    if is_per_layer(cache):
        return {k: [x.at[:, :kept_length].set(y.astype(x.dtype)) for x, y in zip(cache[k], kept_cache[k])]
                for k in cache}
    return {k: cache[k].at[:, :, :kept_length].set(kept_cache[k].astype(cache[k].dtype)) for k in cache}


def _prompt_slots(cache: Cache, prompt_length: int) -> Cache:
    """The first `prompt_length` slots of every row (a copy: the decode goes on writing the rest)."""
    if is_per_layer(cache):
        return constrain_cache({k: [x[:, :prompt_length] for x in v] for k, v in cache.items()})
    return constrain_cache({k: v[:, :, :prompt_length] for k, v in cache.items()})


def generate_continuing(
    params: Params,
    config: Qwen2Config,
    kept_cache: Cache | None,
    kept_mask: jax.Array,
    kept: jax.Array,
    suffix_tokens: jax.Array,
    suffix_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[Generation, Cache]:
    """Prefill the suffixes after the kept prefixes (`kept_cache`: (layers, rows, K, ...) or per-layer
    lists of (rows, K, ...) as `params` run on, None when K = 0), decode as sampler.generate does.
    Returns the generation and the new prompt cache (prompt slots only, one row per prompt, in the
    same form)."""
    chex.assert_rank([suffix_tokens, suffix_mask, kept_mask, kept], [2, 2, 2, 1])
    chex.assert_equal_shape([suffix_tokens, suffix_mask])
    chex.assert_equal_shape_prefix([suffix_tokens, kept_mask, kept], 1)
    batch, suffix_length = suffix_tokens.shape
    kept_length = kept_mask.shape[1]
    prompt_length = kept_length + suffix_length
    slots = prompt_length + sampling.max_new_tokens

    cache = empty_cache(params, config, batch, slots)
    if kept_length:
        cache = constrain_cache(_write_kept(cache, kept_cache, kept_length))
    key_mask = (jnp.zeros((batch, slots), bool).at[:, :kept_length].set(kept_mask)
                .at[:, kept_length:prompt_length].set(suffix_mask))
    positions = kept[:, None] + positions_from_mask(suffix_mask)
    logits, cache = forward(params, config, suffix_tokens, key_mask, positions,
                            cache=cache, cache_index=kept_length, last_only=True)
    prompt_cache = _prompt_slots(cache, prompt_length)
    generation = decode(params, config, cache, key_mask, logits[:, -1], kept + suffix_mask.astype(jnp.int32).sum(-1),
                        key, sampling, stop_ids, pad_id)
    return generation, prompt_cache


class PrefixSampler:
    """Samples prompt batches that continue earlier ones, keeping the jitted programs and counters.

    Counters (`counts`, summed over calls, this process's rows): rows; reused_rows (rows that kept
    a prefix); kept_tokens; prefilled_tokens (real tokens run through the model); full_tokens (what
    a full prefill runs: every prompt token); prefilled_slots and full_slots (the same with padding:
    rows x S against rows x T).
    """

    def __init__(self, config: Qwen2Config, stop_ids: Sequence[int], pad_id: int, mesh: Mesh | None = None):
        self.config = config
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self.shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._jitted = jax.jit(generate_continuing, static_argnames=("config", "sampling", "stop_ids", "pad_id"))
        self._copy = jax.jit(copy_prefixes if self.shards == 1 else functools.partial(copy_prefixes_by_device, mesh))
        self._signatures: set[tuple] = set()
        self.counts: Counter = Counter()

    @classmethod
    def like(cls, generator, mesh: Mesh | None = None) -> "PrefixSampler":
        """One for the same model as a jax generator (sampler.Sampler: it names its config)."""
        if not isinstance(getattr(generator, "config", None), Qwen2Config):
            raise ValueError(f"rollout.prefix_cache=true needs the jax sampler (rollout.generator=jax); "
                             f"{type(generator).__name__} has no model config to reuse caches with")
        return cls(generator.config, generator.stop_ids, generator.pad_id, mesh)

    @property
    def compile_count(self) -> int:
        """Sampling programs compiled (the small prefix-copying programs are not counted)."""
        return len(self._signatures)

    def __call__(self, params: Params, plan: PrefillPlan, previous: PromptCache | None, rows: int,
                 prompts: Mapping[int, Sequence[int]], key: jax.Array, sampling: SamplingParams,
                 put: Callable = lambda x, rows: x) -> tuple[Generation, PromptCache]:
        """Sample the planned call (`put` places this process's rows of a host array into the
        call's global batch), reusing what `previous` (this cache's last call, same parameters)
        holds; returns the generation and the cache to pass next time."""
        self._count(plan, len(prompts))
        kept_cache = None
        if plan.source_slots.shape[1]:
            kept_cache = self._copy(previous.cache, put(plan.source_rows, rows), put(plan.source_slots, rows))
        signature = (rows, plan.suffix_tokens.shape[1], plan.source_slots.shape[1], sampling)
        if signature not in self._signatures:
            self._signatures.add(signature)
            log.info("prefix sampler: compiling for suffixes %s after %d kept slots (program %d)",
                     (rows, plan.suffix_tokens.shape[1]), plan.source_slots.shape[1], len(self._signatures))
        generation, cache = self._jitted(
            params, self.config, kept_cache,
            *(put(a, rows) for a in (plan.kept_mask, plan.kept, plan.suffix_tokens, plan.suffix_mask)),
            key, sampling, self.stop_ids, self.pad_id)
        filled = [(i, row) for i, row in enumerate(plan.rows_here) if row in prompts]
        return generation, PromptCache(cache, rows, {row: np.asarray(prompts[row], np.int32) for _, row in filled},
                                       {row: prompt_slots(plan, i) for i, row in filled})

    def _count(self, plan: PrefillPlan, count: int) -> None:
        here = plan.suffix_tokens.shape[0]
        prefilled = int(plan.suffix_mask.sum())
        self.counts.update(rows=count, reused_rows=int((plan.kept > 0).sum()), kept_tokens=int(plan.kept.sum()),
                           prefilled_tokens=prefilled, full_tokens=prefilled + int(plan.kept.sum()),
                           prefilled_slots=here * plan.suffix_tokens.shape[1], full_slots=here * plan.full_length)
