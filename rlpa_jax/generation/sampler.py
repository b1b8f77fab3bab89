"""Batched generation as jitted pure functions over the same parameters the trainer updates.

One call prefills a batch of left-padded prompts once, copies each prompt's cache for its n
samples, and decodes with a `lax.while_loop` that stops as soon as every row has emitted a stop
id. It returns the sampled tokens, their log-probabilities under the unfiltered model
distribution (what the PPO trainer recomputes), and response lengths. Prompt lengths and batch
sizes are bucketed by the caller (`pad_prompts`), so a run compiles a handful of programs.

Everything that samples (the rollout, the evaluation policies, SFT previews) does so through the
`Generator` interface, built from the GENERATORS table by config name (`rollout.generator`): a new
sampler is one class and one table entry.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple, Protocol, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlpa_jax.model.layer_stacks import has_stacked_layers, init_cache, init_layer_caches, unstack_cache, unstack_layers
from rlpa_jax.model.qwen2 import CACHE_AXES, Cache, Params, Qwen2Config, forward, positions_from_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static decoding settings (hashable: part of the compiled program's identity)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    num_samples: int = 1  # samples per prompt, decoded from copies of one prefilled cache

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}; expected 0 < top_p <= 1")
        if self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"top_k={self.top_k}, num_samples={self.num_samples}; expected top_k >= 0, num_samples >= 1")


class Generation(NamedTuple):
    tokens: jax.Array  # (rows, max_new_tokens) int32, pad after the stop token
    logprobs: jax.Array  # (rows, max_new_tokens) float32, 0 after the stop token
    mask: jax.Array  # (rows, max_new_tokens) bool, True on generated tokens (stop token included)
    lengths: jax.Array  # (rows,) int32
    steps: jax.Array  # () int32, decode steps run (early stop makes this < max_new_tokens)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Mask logits outside the top-k set and the smallest top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is below top_p (the top token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def choose_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token ids, their log-probabilities under the unfiltered, untempered distribution)."""
    if sampling.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


def is_per_layer(cache: Cache) -> bool:
    """Whether a cache is per-layer lists (`unstack_cache`, `init_layer_caches`) rather than stacked."""
    return isinstance(cache["k"], (list, tuple))


def constrain_cache(cache: Cache) -> Cache:
    """The KV cache's sharding constraint (rows over data and fsdp), stacked or per layer."""
    if is_per_layer(cache):
        return {k: [nn.with_logical_constraint(x, CACHE_AXES[1:]) for x in v] for k, v in cache.items()}
    return {k: nn.with_logical_constraint(v, CACHE_AXES) for k, v in cache.items()}


def empty_cache(params: Params, config: Qwen2Config, batch: int, slots: int) -> Cache:
    """An empty cache in the form `params` run on: stacked for the layer scan, per-layer lists for
    per-layer weights (SamplingLayout's output)."""
    if has_stacked_layers(params):
        return constrain_cache(init_cache(config, batch, slots))
    return constrain_cache(init_layer_caches(config, batch, slots))


def generate(
    params: Params,
    config: Qwen2Config,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> Generation:
    """Sample `sampling.num_samples` continuations per left-padded prompt (rows prompt-major)."""
    chex.assert_rank([prompt_tokens, prompt_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    chex.assert_type(prompt_tokens, int)
    batch, prompt_len = prompt_tokens.shape
    slots = prompt_len + sampling.max_new_tokens

    # Prefill the shared history once, then decode (each sample from its own copy of the cache).
    key_mask = jnp.zeros((batch, slots), bool).at[:, :prompt_len].set(prompt_mask.astype(bool))
    cache = empty_cache(params, config, batch, slots)
    logits, cache = forward(params, config, prompt_tokens, key_mask, positions_from_mask(prompt_mask),
                            cache=cache, cache_index=0, last_only=True)
    return decode(params, config, cache, key_mask, logits[:, -1], prompt_mask.astype(jnp.int32).sum(-1),
                  key, sampling, stop_ids, pad_id)


def decode(
    params: Params,
    config: Qwen2Config,
    cache,
    key_mask: jax.Array,
    last_logits: jax.Array,
    next_position: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> Generation:
    """Sample from prefilled prompts: `cache` (one row per prompt, stacked or per-layer lists) holds
    the prompts in its first slots and has `max_new_tokens` free slots after them; `key_mask` marks
    the real prompt slots, `last_logits` are each prompt's last-token logits, `next_position` each
    prompt's real length (the position of the first new token). Every prompt's row is copied n
    times, then decoded."""
    chex.assert_rank([last_logits, key_mask, next_position], [2, 2, 1])
    chex.assert_equal_shape_prefix([last_logits, key_mask, next_position], 1)
    batch = last_logits.shape[0]
    n, new = sampling.num_samples, sampling.max_new_tokens
    prompt_len = key_mask.shape[1] - new
    stop = jnp.asarray(stop_ids, jnp.int32)
    key_mask = jnp.repeat(key_mask, n, axis=0)
    last_logits = jnp.repeat(last_logits, n, axis=0)
    next_position = jnp.repeat(next_position, n, axis=0)

    rows = batch * n
    first, first_logprob = choose_tokens(last_logits, jax.random.fold_in(key, 0), sampling)
    tokens = jnp.full((rows, new), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((rows, new), jnp.float32).at[:, 0].set(first_logprob)
    done = jnp.isin(first, stop)
    lengths = jnp.ones((rows,), jnp.int32)

    # The decode loop runs the layers one after another on per-layer weights and cache: under the
    # layer scan XLA would copy every layer's weights out of the stack on every step (see
    # layer_stacks.unstack_layers). SamplingLayout's parameters already are per layer and are read as
    # they are; stacked ones (the training layout, a caller without a SamplingLayout) are split
    # here, one copy of the layer weights per call.
    decode_params = unstack_layers(params, config) if has_stacked_layers(params) else params
    layers = cache if is_per_layer(cache) else unstack_cache(cache)
    cache = constrain_cache({k: [jnp.repeat(x, n, axis=0) for x in v] for k, v in layers.items()})

    def keep_going(state):
        step, _, _, done, *_ = state
        return (step < new) & ~jnp.all(done)

    def decode_step(state):
        step, tokens, logprobs, done, lengths, cache, key_mask = state
        slot = prompt_len + step - 1
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, jnp.ones((rows, 1), bool), slot, axis=1)
        positions = (next_position + step - 1)[:, None]
        # Tied to the step, the weights are loop-variant for XLA: a layout that splits them (the
        # trainer's FSDP) gathers each layer's weights inside the step as under the layer scan,
        # instead of XLA hoisting every gather out of the loop into one whole unsplit copy.
        step_params, step = jax.lax.optimization_barrier((decode_params, step))
        logits, cache = forward(step_params, config, previous, key_mask, positions, cache=cache, cache_index=slot)
        token, logprob = choose_tokens(logits[:, 0], jax.random.fold_in(key, step), sampling)
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop)
        return step + 1, tokens, logprobs, done, lengths, cache, key_mask

    state = (jnp.int32(1), tokens, logprobs, done, lengths, cache, key_mask)
    steps, tokens, logprobs, done, lengths, _, _ = jax.lax.while_loop(keep_going, decode_step, state)
    mask = jnp.arange(new)[None, :] < lengths[:, None]
    return Generation(tokens, logprobs, mask, lengths, steps)


# ---------------------------------------------------------------------------------------------
# Host side: bucketing and a compile-counting wrapper


def bucket(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that fits `size`; sizes beyond the last bucket round up to its multiple."""
    for b in sorted(buckets):
        if size <= b:
            return b
    largest = max(buckets)
    return -(-size // largest) * largest


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    length_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
    batch_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a bucketed length; add all-padding rows up to a batch multiple."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts needs at least one prompt and no empty prompt")
    length = bucket(max(len(p) for p in prompts), length_buckets)
    rows = -(-len(prompts) // batch_multiple) * batch_multiple
    return left_pad(list(prompts) + [None] * (rows - len(prompts)), length, pad_id)


def left_pad(prompts: Sequence[Sequence[int] | None], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of shape (len(prompts), length): each prompt right-aligned, None an all-padding row."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, prompt in enumerate(prompts):
        if prompt is not None:
            tokens[i, length - len(prompt):] = prompt
            mask[i, length - len(prompt):] = True
    return tokens, mask


class Sampler:
    """Holds the jitted generate for one model config and counts how many programs it compiled."""

    def __init__(self, config: Qwen2Config, stop_ids: Sequence[int], pad_id: int):
        self.config = config
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)
        self._jitted = jax.jit(generate, static_argnames=("config", "sampling", "stop_ids", "pad_id"))
        self._signatures: set[tuple] = set()

    @property
    def compile_count(self) -> int:
        return len(self._signatures)

    def lower(self, params: Params, tokens, mask, key: jax.Array, sampling: SamplingParams) -> jax.stages.Lowered:
        """The program a call with these (possibly abstract) arguments runs, lowered, not run."""
        return self._jitted.lower(params, self.config, tokens, mask, key, sampling, self.stop_ids, self.pad_id)

    def __call__(self, params: Params, tokens, mask, key: jax.Array, sampling: SamplingParams) -> Generation:
        signature = (tuple(tokens.shape), sampling)
        if signature not in self._signatures:
            self._signatures.add(signature)
            log.info("sampler: compiling for prompts %s, %s (program %d)", tokens.shape, sampling, len(self._signatures))
        return self._jitted(params, self.config, tokens, mask, key, sampling, self.stop_ids, self.pad_id)


class Generator(Protocol):
    """Samples continuations of left-padded prompts with the parameters it is given."""

    pad_id: int

    @property
    def compile_count(self) -> int:
        """Programs compiled so far (logged: a growing count means unbucketed shapes)."""
        ...

    def __call__(self, params: Params, tokens, mask, key: jax.Array, sampling: SamplingParams) -> Generation: ...


# Config name -> constructor (model config, stop token ids, pad id) -> Generator.
GENERATORS: dict[str, Callable[[Qwen2Config, Sequence[int], int], Generator]] = {"jax": Sampler}


def build_generator(kind: str, config: Qwen2Config, stop_ids: Sequence[int], pad_id: int) -> Generator:
    if kind not in GENERATORS:
        raise ValueError(f"rollout.generator={kind!r} is not one of {', '.join(GENERATORS)}")
    return GENERATORS[kind](config, stop_ids, pad_id)
