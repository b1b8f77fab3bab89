"""The generation engine: everything that samples from our model goes through it.

    engine = GenerationEngine(model_config, stop_ids, pad_id, mesh=mesh, layout="replicated")
    engine.sync(params)                       # once per rollout: the sampler's copy of the actor
    out = engine.generate(prompts, sampling, key, cache_key="group-0")
    out.completions[i][j]                     # prompt i's j-th sample: tokens and log-probs

Behind that interface: the jitted sampler (sampler.py, a name in GENERATORS), the sampling layout
(layout.py: the weight copy made by `sync`), the prefix cache (prefix_cache.py: with a
`cache_key`, a call prefills only what its prompts add to that key's last call), and the
placement of rows over devices and processes (placement.py). Callers hand over this process's
prompts, in order, and get their completions back: one process or several, prefix cache on or
off, is the engine's business. With several processes every call is a collective (`collective`):
every process calls, in the same order, an empty share included, and serves only its `share` of
a batch's requests.

`submit` dispatches the device work and returns at once; `result()` waits for it, so a caller can
wait in a worker thread while its event loop talks to judges and users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Hashable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rlpa_jax.generation.layout import SamplingLayout
from rlpa_jax.generation.placement import RowPlacement
from rlpa_jax.generation.prefix_cache import PrefixSampler, PromptCache, plan_prefill
from rlpa_jax.generation.sampler import (
    Generation,
    SamplingParams,
    bucket,
    build_generator,
    left_pad,
)
from rlpa_jax.model import hf
from rlpa_jax.model.checkpoint_folder import hf_folder
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.model.tokenizer import chat_token_ids, load_tokenizer, stop_token_ids
from rlpa_jax.runtime import multihost, parallel

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation: its tokens (the stop token included when one was produced) and
    their log-probabilities under the unfiltered model distribution."""

    tokens: np.ndarray  # (length,) int32
    logprobs: np.ndarray  # (length,) float32


@dataclasses.dataclass(frozen=True)
class Generated:
    """A generate call's output for this process's prompts, with what it cost."""

    completions: list[list[Completion]]  # per prompt, its num_samples completions
    prompt_tokens: int  # real prompt tokens of this process's prompts
    prefilled_tokens: int  # of those, the ones run through the model (fewer with a prefix cache)
    generated_tokens: int


class PendingGeneration:
    """Dispatched device work; `result()` waits for it and reads back this process's rows."""

    def __init__(self, read):
        self._read = read

    def result(self) -> Generated:
        return self._read()


class GenerationEngine:
    """Samples our model: `sync(params)` once per parameter version, then `generate` or `submit`."""

    def __init__(self, model_config: Qwen2Config, stop_ids: Sequence[int], pad_id: int, *, mesh: Mesh | None = None,
                 layout: str = "replicated", prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 generator: str = "jax", prefix_cache: bool = False):
        self.model_config, self.pad_id = model_config, int(pad_id)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.mesh, self.prompt_buckets = mesh, tuple(prompt_buckets)
        self.placement = RowPlacement(mesh)
        self.layout = SamplingLayout(model_config, mesh, layout)
        self.sampler = build_generator(generator, model_config, self.stop_ids, self.pad_id)
        self.prefix_sampler = PrefixSampler.like(self.sampler, mesh) if prefix_cache else None
        self.params: Params | None = None
        self.synced = False
        self._kept: dict[Hashable, PromptCache] = {}
        self._lock = threading.Lock()  # calls may come from worker threads; the kept caches are shared

    # ------------------------------------------------------------------------------ parameters

    def sync(self, params: Params) -> None:
        """The sampler's copy of `params` (resharded on device into the sampling layout); the kept
        prompt caches belong to the old parameters and are dropped."""
        with self._activated():
            self.params = jax.block_until_ready(self.layout(params))
        self.synced = True
        self._kept.clear()

    def release(self) -> None:
        """Drop the sampling copy and every kept cache (e.g. before an update needs the memory)."""
        self.params, self.synced = None, False
        self._kept.clear()

    def forget(self, cache_key: Hashable) -> None:
        """Drop one prefix-cache chain (a finished dialogue group)."""
        with self._lock:
            for key in [k for k in self._kept if k[0] == cache_key]:
                del self._kept[key]

    # ------------------------------------------------------------------------------ placement

    @property
    def collective(self) -> bool:
        """Whether every call is a collective over processes (made by all, in the same order)."""
        return self.placement.collective

    @property
    def keeps_prefixes(self) -> bool:
        return self.prefix_sampler is not None

    @property
    def compile_count(self) -> int:
        """Sampling programs compiled so far (logged: a growing count means unbucketed shapes)."""
        return self.sampler.compile_count + (self.prefix_sampler.compile_count if self.prefix_sampler else 0)

    def share(self, count: int, max_batch_size: int | None = None) -> list[int]:
        """Which of a batch of `count` requests this process serves (all of them in one process)."""
        return self.placement.share(count, max_batch_size)

    def any_left(self, count_here: int) -> bool:
        """Whether any process still has requests (a collective with several processes)."""
        return self.placement.any_left(count_here)

    # ------------------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, key: jax.Array, *,
                 cache_key: Hashable | None = None, max_batch_size: int | None = None) -> Generated:
        """This process's prompts (token ids, in order), sampled `sampling.num_samples` times each."""
        return self.submit(prompts, sampling, key, cache_key=cache_key, max_batch_size=max_batch_size).result()

    def submit(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, key: jax.Array, *,
               cache_key: Hashable | None = None, max_batch_size: int | None = None) -> PendingGeneration:
        """generate's device work dispatched, its result to be read later.

        One call, or one per `max_batch_size` requests (call c then draws with fold_in(key, c)).
        With a `cache_key` and the prefix cache on, each call continues that key's last call of the
        same index (same parameters): only what its prompts add is prefilled."""
        if not self.synced:
            raise RuntimeError("GenerationEngine: sync(params) before generating")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("GenerationEngine: a prompt is empty")
        rows, filled = self.placement.calls(len(prompts), max_batch_size)
        starts = np.cumsum([0] + [len(mine) for mine in filled])
        parts = [list(prompts[starts[c]:starts[c + 1]]) for c in range(len(filled))]
        use_cache = cache_key is not None and self.prefix_sampler is not None
        # One collective for every call's prompt bucket (the prefix plan agrees its own lengths).
        longest = [max(map(len, part), default=1) for part in parts]
        if filled and not use_cache and self.collective:
            longest = list(multihost.agree_on_max(tuple(longest)))
        pending, prefilled = [], 0
        with self._activated():
            for c, (part, mine) in enumerate(zip(parts, filled)):
                call_key = key if len(filled) == 1 else jax.random.fold_in(key, c)
                placed = dict(zip(mine, part))
                if use_cache:
                    generation, count = self._continue_call((cache_key, c), placed, rows, call_key, sampling)
                else:
                    generation, count = self._full_call(placed, rows, longest[c], call_key, sampling)
                pending.append((mine, generation))
                prefilled += count

        def read() -> Generated:
            completions = [completion for mine, generation in pending for completion in self._read(generation, mine,
                                                                                                    sampling)]
            generated = sum(len(c.tokens) for samples in completions for c in samples)
            return Generated(completions, sum(map(len, prompts)), prefilled, generated)

        return PendingGeneration(read)

    def generate_everywhere(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                            key: jax.Array) -> list[list[Completion]]:
        """Every prompt's completions on every process, each process passing all of `prompts`
        (the same on each): it samples its share and the processes exchange what they sampled."""
        mine = self.share(len(prompts))
        completions = self.generate([prompts[i] for i in mine], sampling, key).completions
        if not self.collective:
            return completions
        every = dict(pair for pairs in multihost.allgather_objects(list(zip(mine, completions))) for pair in pairs)
        return [every[i] for i in range(len(prompts))]

    def _full_call(self, placed: dict[int, Sequence[int]], rows: int, longest: int, key, sampling):
        tokens, mask = left_pad([placed.get(row) for row in self.placement.rows_here(rows)],
                                bucket(longest, self.prompt_buckets), self.pad_id)
        generation = self.sampler(self.params, self.placement.put(tokens, rows), self.placement.put(mask, rows), key,
                                  sampling)
        return generation, sum(map(len, placed.values()))

    def _continue_call(self, chain: Hashable, placed: dict[int, Sequence[int]], rows: int, key, sampling):
        agree = multihost.agree_on_max if self.collective else (lambda values: values)
        with self._lock:
            previous = self._kept.pop(chain, None)
        plan = plan_prefill(placed, self.placement.rows_here(rows), rows, previous, self.pad_id, self.prompt_buckets,
                            self.placement.row_multiple, agree)
        generation, kept = self.prefix_sampler(self.params, plan, previous, rows, placed, key, sampling,
                                               self.placement.put)
        with self._lock:
            self._kept[chain] = kept
        return generation, int(plan.suffix_mask.sum())

    def _read(self, generation: Generation, mine: list[int], sampling: SamplingParams) -> list[list[Completion]]:
        n = sampling.num_samples
        tokens, logprobs, lengths = (self.placement.read(getattr(generation, name))
                                     for name in ("tokens", "logprobs", "lengths"))
        return [[Completion(tokens[row * n + j][:int(lengths[row * n + j])],
                            logprobs[row * n + j][:int(lengths[row * n + j])]) for j in range(n)] for row in mine]

    def _activated(self):
        return parallel.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------ on its own

    def lower(self, params: Params, tokens, mask, key, sampling: SamplingParams) -> jax.stages.Lowered:
        """The sampler program for these (abstract) arguments, lowered, not run (memory check)."""
        return self.sampler.lower(self.layout.abstract(params), tokens, mask, key, sampling)


class ChatModel:
    """A local Hugging Face Qwen2 folder behind the engine: chat messages in, reply texts out."""

    def __init__(self, engine: GenerationEngine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    @classmethod
    def from_hf(cls, directory: str | Path, *, mesh: Mesh | None = None, layout: str = "replicated",
                prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, prefix_cache: bool = False) -> "ChatModel":
        """Weights, config and tokenizer (with its chat template) from `directory`; with a mesh,
        read straight into the trainer's parameter shardings on it. A `.gguf` file is read through
        its converted folder (model/checkpoint_folder.py)."""
        directory = hf_folder(directory)
        shardings = None if mesh is None else parallel.param_shardings(hf.load_config(directory), mesh)
        params, config = hf.load_params(directory, shardings=shardings)
        tokenizer = load_tokenizer(directory)
        engine = GenerationEngine(config, stop_token_ids(tokenizer), tokenizer.pad_token_id, mesh=mesh, layout=layout,
                                  prompt_buckets=prompt_buckets, prefix_cache=prefix_cache)
        engine.sync(params)
        return cls(engine, tokenizer)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The model's own chat template over `messages`, ready for the assistant's turn."""
        return chat_token_ids(self.tokenizer, list(messages), add_generation_prompt=True)

    def chat(self, conversations: Sequence[Sequence[dict[str, str]]], sampling: SamplingParams,
             key: jax.Array | None = None) -> list[str]:
        """The reply to each conversation ({"role", "content"} messages), in one batched call."""
        key = jax.random.key(0) if key is None else key
        out = self.engine.generate([self.prompt_ids(messages) for messages in conversations], sampling, key)
        return [self.tokenizer.decode(samples[0].tokens, skip_special_tokens=True) for samples in out.completions]
