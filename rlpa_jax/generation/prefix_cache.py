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
across turns) and prefills only the rest. Decoding is sampling.decode, as for a full prefill.

The fresh cache of a call with prompts of at most T tokens (T bucketed as for a full prefill):

    slots [0, K)       each row's kept prefix, right-aligned (masked holes on the left)
    slots [K, T)       the new suffix block, S = T - K slots, left-padded (holes masked)
    slots [T, T + new) the decode slots, as sampling.generate lays them out

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
slice of a stacked array, see qwen2.unstack_layers); per layer, each slab is written and read
where it lies.

The cache is valid for one set of parameters: it lives for one rollout (PPO updates between
rollouts change the parameters; rollout.schedule=turn, which updates between turns, samples
with full prefills).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlpa_jax.generation.sampler import (
    Generation,
    SamplingParams,
    bucket,
    constrain_cache,
    decode,
    empty_cache,
    is_per_layer,
)
from rlpa_jax.model.qwen2 import Cache, Params, Qwen2Config, forward, positions_from_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptCache:
    """One call's prompts as they sit in its prefilled cache (on device) and where (on the host)."""

    # The prompt slots only, before the n-way copy, in the form the parameters run on: per-layer
    # lists of (rows, T, kv_heads, head_dim) for SamplingLayout's per-layer weights, one stacked
    # (layers, rows, T, kv_heads, head_dim) array each for stacked ones.
    cache: Cache
    prompts: list[np.ndarray]  # each prompt's tokens (row i of the cache holds prompt i)
    slots: list[np.ndarray]  # each prompt's cache slots, in token order


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Host arrays for one call: which kept entries to copy and which suffix tokens to prefill."""

    source_rows: np.ndarray  # (rows,) int32: the kept row each prompt copies its prefix from
    source_slots: np.ndarray  # (rows, K) int32: its slots there, right-aligned (0 in holes)
    kept_mask: np.ndarray  # (rows, K) bool
    kept: np.ndarray  # (rows,) int32: prefix tokens reused per row
    suffix_tokens: np.ndarray  # (rows, S) int32, left-padded
    suffix_mask: np.ndarray  # (rows, S) bool
    full_length: int  # T: the prompt slots a full prefill would use (K + S)


def common_prefix_lengths(prompt: np.ndarray, kept: Sequence[np.ndarray]) -> np.ndarray:
    """For each kept prompt, how many leading tokens it shares with `prompt`."""
    lengths = np.zeros(len(kept), np.int64)
    for i, old in enumerate(kept):
        n = min(len(old), len(prompt))
        differ = np.flatnonzero(old[:n] != prompt[:n])
        lengths[i] = differ[0] if differ.size else n
    return lengths


def plan_prefill(prompts: Sequence[Sequence[int]], previous: PromptCache | None, pad_id: int,
                 length_buckets: Sequence[int], batch_multiple: int = 1) -> PrefillPlan:
    """Match each prompt with its longest shared prefix among `previous`'s rows and lay out the rest.

    At least the last token of every prompt is prefilled (its logits start the decoding). Rows
    added to reach `batch_multiple` are all padding, as in sampling.pad_prompts.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("plan_prefill needs at least one prompt and no empty prompt")
    prompts = [np.asarray(p, np.int32) for p in prompts]
    rows = -(-len(prompts) // batch_multiple) * batch_multiple
    source = np.zeros(rows, np.int32)
    shared = np.zeros(rows, np.int64)
    for i, prompt in enumerate(prompts):
        if previous is not None and previous.prompts:
            lengths = common_prefix_lengths(prompt, previous.prompts)
            source[i] = int(np.argmax(lengths))
            shared[i] = min(int(lengths[source[i]]), len(prompt) - 1)
    lengths = np.array([len(p) for p in prompts] + [0] * (rows - len(prompts)))
    full_length = bucket(int(lengths.max()), length_buckets)
    # The suffix block fits the longest unshared part, rounded up to a multiple of the smallest
    # bucket (rounding to the buckets themselves would leave much less room for the kept
    # prefixes); prefixes longer than the rest of T shrink. Nothing shared: a full prefill.
    granularity = min(length_buckets)
    suffix_length = full_length
    if shared.max() > 0:
        suffix_length = min(-(-int((lengths - shared).max()) // granularity) * granularity, full_length)
    kept_length = full_length - suffix_length
    kept = np.minimum(shared, kept_length).astype(np.int32)

    source_slots = np.zeros((rows, kept_length), np.int32)
    kept_mask = np.zeros((rows, kept_length), bool)
    suffix_tokens = np.full((rows, suffix_length), pad_id, np.int32)
    suffix_mask = np.zeros((rows, suffix_length), bool)
    for i, prompt in enumerate(prompts):
        k = int(kept[i])
        if k:
            source_slots[i, kept_length - k:] = previous.slots[source[i]][:k]
            kept_mask[i, kept_length - k:] = True
        suffix = prompt[k:]
        suffix_tokens[i, suffix_length - len(suffix):] = suffix
        suffix_mask[i, suffix_length - len(suffix):] = True
    return PrefillPlan(source, source_slots, kept_mask, kept, suffix_tokens, suffix_mask, full_length)


def prompt_slots(plan: PrefillPlan, count: int) -> list[np.ndarray]:
    """Where each of the first `count` rows' prompt tokens sit in the cache the plan builds."""
    kept_length, full_length = plan.source_slots.shape[1], plan.full_length
    return [np.concatenate([np.arange(kept_length - plan.kept[i], kept_length),
                            np.arange(full_length - plan.suffix_mask[i].sum(), full_length)]).astype(np.int32)
            for i in range(count)]


def copy_prefixes(previous: Cache, source_rows: jax.Array, source_slots: jax.Array) -> Cache:
    """cache[layer, source_rows[i], source_slots[i, j]]: each row's kept prefix, right-aligned, in
    `previous`' form (stacked or per-layer lists).

    A program of its own, so the sampling program's shape does not depend on the last call's."""
    if is_per_layer(previous):
        return constrain_cache({k: [x[source_rows[:, None], source_slots] for x in v] for k, v in previous.items()})
    return constrain_cache({k: v[:, source_rows[:, None], source_slots] for k, v in previous.items()})


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
    lists of (rows, K, ...) as `params` run on, None when K = 0), decode as sampling.generate does.
    Returns the generation and the new prompt cache (prompt slots only, one row per prompt, in the
    same form)."""
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
    """Samples prompt batches that continue earlier ones, keeping the jitted program and counters.

    Counters (`counts`, summed over calls): rows; reused_rows (rows that kept a prefix);
    kept_tokens; prefilled_tokens (real tokens run through the model); full_tokens (what a full
    prefill runs: every prompt token); prefilled_slots and full_slots (the same with padding:
    rows x S against rows x T).
    """

    def __init__(self, config: Qwen2Config, stop_ids: Sequence[int], pad_id: int):
        self.config = config
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self._jitted = jax.jit(generate_continuing, static_argnames=("config", "sampling", "stop_ids", "pad_id"))
        self._copy = jax.jit(copy_prefixes)
        self._signatures: set[tuple] = set()
        self.counts: Counter = Counter()

    @classmethod
    def like(cls, generator) -> "PrefixSampler":
        """One for the same model as a jax generator (sampling.Sampler: it names its config)."""
        if not isinstance(getattr(generator, "config", None), Qwen2Config):
            raise ValueError(f"rollout.prefix_cache=true needs the jax sampler (rollout.generator=jax); "
                             f"{type(generator).__name__} has no model config to reuse caches with")
        return cls(generator.config, generator.stop_ids, generator.pad_id)

    @property
    def compile_count(self) -> int:
        """Sampling programs compiled (the small prefix-copying programs are not counted)."""
        return len(self._signatures)

    def __call__(self, params: Params, prompts: Sequence[Sequence[int]], previous: PromptCache | None,
                 key: jax.Array, sampling: SamplingParams, length_buckets: Sequence[int], batch_multiple: int = 1,
                 put_batch: Callable = lambda x: x) -> tuple[Generation, PromptCache]:
        """Sample every prompt, reusing what `previous` (this group's last call, same parameters)
        holds of it; returns the generation and the cache to pass next time."""
        plan = plan_prefill(prompts, previous, self.pad_id, length_buckets, batch_multiple)
        self._count(plan, len(prompts))
        kept_cache = None
        if plan.source_slots.shape[1]:
            kept_cache = self._copy(previous.cache, put_batch(plan.source_rows), put_batch(plan.source_slots))
        signature = (plan.suffix_tokens.shape, plan.source_slots.shape[1], sampling)
        if signature not in self._signatures:
            self._signatures.add(signature)
            log.info("prefix sampler: compiling for suffixes %s after %d kept slots (program %d)",
                     plan.suffix_tokens.shape, plan.source_slots.shape[1], len(self._signatures))
        generation, cache = self._jitted(
            params, self.config, kept_cache,
            *(put_batch(a) for a in (plan.kept_mask, plan.kept, plan.suffix_tokens, plan.suffix_mask)),
            key, sampling, self.stop_ids, self.pad_id)
        return generation, PromptCache(cache, [np.asarray(p, np.int32) for p in prompts], prompt_slots(plan, len(prompts)))

    def _count(self, plan: PrefillPlan, count: int) -> None:
        rows = plan.suffix_tokens.shape[0]
        prefilled = int(plan.suffix_mask.sum())
        self.counts.update(rows=count, reused_rows=int((plan.kept[:count] > 0).sum()), kept_tokens=int(plan.kept.sum()),
                           prefilled_tokens=prefilled, full_tokens=prefilled + int(plan.kept.sum()),
                           prefilled_slots=rows * plan.suffix_tokens.shape[1], full_slots=rows * plan.full_length)
