"""The host-side multi-turn rollout loop: conversations in flight, n samples per turn, best-of-n.

Each turn, a group of conversations is rendered into prompts, sampled n times in one jitted
sampler call, parsed and scored by the judges, continued with its best sample, and answered by
the simulated users in one batch. Groups run as concurrent coroutines: while one group waits for
the device (in a worker thread), the others talk to judges and users, so host calls for one group
overlap device work for another. Every sample becomes one PPO experience.

With a PrefixSampler, each group keeps its prompts' KV cache from one turn to the next and
prefills only what the next prompts add (prefix_cache.py). That cache lives for one `run`: the
parameters are fixed within a rollout, and an update changes them.

With several processes (multihost.py), every process knows every conversation of the iteration but
plays only those whose sampler rows land on its own devices (`row_indices`): it renders their
prompts, places them as its rows of the global batch (`place_rows`), reads back its own rows of
the samples, and makes their judge and user calls. A conversation keeps its row for the whole
rollout (a stopped one becomes a padding row), so rows and the sampler's random draws are those of
the one-process run as long as no simulated user fails. Every sampler call is a collective: groups
then run one after the other, in the same order on every process (not as concurrent coroutines,
whose device calls would come in an order set by judge latency). The sampled turns are exchanged
at the end, so every process returns all of them, in the one-process order. play_turn (the `turn`
schedule) places its groups' rows the same way; it returns every sampled turn but updates only the
conversations this process played (the trainer's pool exchanges the rest, rl/schedule.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Sequence

import jax
import numpy as np

from rlpa_jax.dialogue.chat import PROFILE_CLOSE, Message, ParsedTurn, assistant_message
from rlpa_jax.dialogue.judges import TurnScore
from rlpa_jax.generation.prefix_cache import PrefixSampler, PromptCache
from rlpa_jax.generation.sampler import Generator, SamplingParams, bucket, left_pad, pad_prompts
from rlpa_jax.model.qwen2 import Params
from rlpa_jax.rl.environment import Conversation, Environment, reward_of
from rlpa_jax.rl.item_credit import token_item_credit
from rlpa_jax.runtime import multihost

# Rollout counters that are totals over every process's conversations.
COUNTED = ("prompt_tokens", "prefilled_tokens", "generated_tokens", "user_failures")


@dataclasses.dataclass
class Sample:
    """One sampled turn: a PPO experience (tokens and sampler log-probs) with its reward parts."""

    conversation_id: int
    turn: int
    sample_index: int
    prompt_tokens: np.ndarray
    response_tokens: np.ndarray  # includes the stop token when one was produced
    sampler_logprobs: np.ndarray
    text: str
    parsed: ParsedTurn
    score: TurnScore
    reward: float  # the reward the configured mode trains on
    chosen: bool = False
    profile_length: int = 0  # response tokens up to the end of </profile> (0: no well-formed turn)
    # With item credit: each response token's share of the profile F1 (rl/item_credit.py), and
    # which tokens belong to a profile line; None otherwise.
    item_credit: np.ndarray | None = None
    item_mask: np.ndarray | None = None


def profile_block_length(tokenizer, tokens: Sequence[int], well_formed: bool) -> int:
    """How many of a turn's tokens it takes to close its <profile> block (0 for a malformed turn):
    the smallest prefix whose text holds the closing tag, by bisection over decoded prefixes."""
    if not well_formed:
        return 0
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if PROFILE_CLOSE in tokenizer.decode(tokens[:middle], skip_special_tokens=True):
            high = middle
        else:
            low = middle + 1
    return low


@dataclasses.dataclass
class RolloutResult:
    samples: list[Sample]
    conversations: list[Conversation]
    stats: dict[str, float]
    # The conversations this process played (None: all of them; several processes: its share).
    local_ids: frozenset[int] | None = None


class Rollout:
    """Runs conversations for `max_rounds` turns (run) or one turn (play_turn) and returns every
    sampled turn."""

    def __init__(self, environment: Environment, generator: Generator, sampling: SamplingParams, max_rounds: int,
                 prompt_buckets: Sequence[int], groups: int = 2, batch_multiple: int = 1, put_batch=None,
                 prefix_sampler: PrefixSampler | None = None, place_rows=None, row_indices=None):
        self.environment, self.generator, self.sampling = environment, generator, sampling
        self.max_rounds, self.prompt_buckets, self.groups = max_rounds, tuple(prompt_buckets), groups
        self.batch_multiple = batch_multiple
        self.put_batch = put_batch or (lambda x: x)  # places prompt arrays on the mesh when there is one
        self.prefix_sampler = prefix_sampler  # None: every turn prefills its prompts in full
        self.timings: Counter = Counter()
        # Several processes: (this process's rows, global row count) -> the global batch, and
        # global row count -> which rows land on this process's devices (trainer.py).
        self.place_rows, self.row_indices = place_rows, row_indices

    def run(self, params: Params, conversations: list[Conversation], key: jax.Array) -> RolloutResult:
        self.timings = Counter()
        start = time.perf_counter()
        groups = [conversations[g::self.groups] for g in range(self.groups)]
        groups = [g for g in groups if g]
        if multihost.process_count() > 1:
            if self.prefix_sampler is not None:
                raise ValueError("a rollout over several processes runs without rollout.prefix_cache")
            self._require_row_placement()
            mine, played = asyncio.run(self._run_groups_in_order(params, groups, key))
            return self._result(_in_order(mine), conversations, start, played)
        samples = asyncio.run(self._run_groups(params, groups, key))
        return self._result(samples, conversations, start)

    def play_turn(self, params: Params, conversations: list[Conversation], turns: Sequence[int],
                  key: jax.Array) -> RolloutResult:
        """One turn of each conversation (the `turn` schedule's pool, each at its own `turns[i]`):
        sampled, scored, continued with its best sample and answered by its user. The pool is split
        into the same pipeline groups as run()'s, so a sampler call has as many rows as there. Full
        prefills, no prompt cache: the parameters change between one turn and the next.

        With several processes, each plays only its share of every group (its rows, as in run())
        and returns every sampled turn; the conversations it did not play are left as they were
        (`local_ids` names those it played: the caller brings the others up to date)."""
        self.timings = Counter()
        start = time.perf_counter()
        slots = [list(range(g, len(conversations), self.groups)) for g in range(self.groups)]
        slots = [g for g in slots if g]
        if multihost.process_count() > 1:
            self._require_row_placement()
            mine, played = asyncio.run(self._play_turn_in_order(params, conversations, turns, slots, key))
            return self._result(_in_order(mine), conversations, start, played)

        async def play() -> list[Sample]:
            results = await asyncio.gather(*(
                self._turn(params, [conversations[i] for i in g], [turns[i] for i in g], jax.random.fold_in(key, n))
                for n, g in enumerate(slots)))
            return [s for group_samples, _ in results for s in group_samples]

        return self._result(asyncio.run(play()), conversations, start)

    def _result(self, samples: list[Sample], conversations: list[Conversation], start: float,
                played: list[Conversation] | None = None) -> RolloutResult:
        self.timings["rollout_s"] = time.perf_counter() - start
        stats = self._stats(samples)
        # What the replies drew out of the users: profile F1 can only count what was revealed.
        if played is None:
            stats["revealed_items"] = float(np.mean([len(c.user.revealed) for c in conversations])) if conversations else 0.0
            return RolloutResult(samples, conversations, stats)
        stats |= multihost.reduce_metrics({"revealed_items": sum(len(c.user.revealed) for c in played)},
                                          {"revealed_items": len(played)})
        # Token and failure counts over every process (the times stay this process's own).
        stats |= multihost.reduce_metrics({k: float(self.timings.get(k, 0)) for k in COUNTED})
        if self.timings.get("sampling_s"):
            stats["sampling_tokens_per_s"] = stats["generated_tokens"] / self.timings["sampling_s"]
        stats["conversations_here"] = float(len(played))  # this process's share (per-process, not reduced)
        return RolloutResult(samples, conversations, stats, frozenset(c.conversation_id for c in played))

    async def _run_groups(self, params, groups, key) -> list[Sample]:
        results = await asyncio.gather(*(self._run_group(params, g, jax.random.fold_in(key, i)) for i, g in enumerate(groups)))
        return [s for group_samples in results for s in group_samples]

    async def _run_group(self, params, group: list[Conversation], key) -> list[Sample]:
        samples: list[Sample] = []
        kept: PromptCache | None = None  # this group's prompt cache from its last turn
        for turn in range(self.max_rounds):
            active = [c for c in group if c.active]
            if not active:
                break
            turn_samples, kept = await self._turn(params, active, turn, jax.random.fold_in(key, turn), kept,
                                                  keep=self.prefix_sampler is not None)
            samples += turn_samples
        return samples

    async def _run_groups_in_order(self, params, groups, key):
        """Several processes: this process's share of every group, the groups one after the other.
        Returns ((order key, sample) for its sampled turns, the conversations it played)."""
        mine, played = [], []
        for g, group in enumerate(groups):
            rows = -(-len(group) // self.batch_multiple) * self.batch_multiple
            slots = [int(i) for i in self.row_indices(rows)]  # this process's rows, fixed for the rollout
            positions = [i for i in slots if i < len(group)]
            played += [group[i] for i in positions]
            group_key = jax.random.fold_in(key, g)
            for turn in range(self.max_rounds):
                active = [i for i in positions if group[i].active]
                prompts = {i: self.environment.prompt_tokens(group[i].history) for i in active}
                # One collective: whether any process still plays, and the prompt bucket of the call.
                count, longest = multihost.agree_on_max((len(active), max(map(len, prompts.values()), default=0)))
                if count == 0:
                    break
                samples = await self._turn_of_share(params, group, slots, rows, prompts, turn, bucket(
                    longest, self.prompt_buckets), jax.random.fold_in(group_key, turn))
                mine += [((g, s.turn, position, s.sample_index), s) for position, s in samples]
        return mine, played

    async def _play_turn_in_order(self, params, conversations, turns, slots, key):
        """Several processes: play_turn's groups (`slots`: indices into `conversations`) one after
        the other, this process playing its rows of each. Returns ((order key, sample) for its
        sampled turns, the conversations it played)."""
        mine, played = [], []
        for g, members in enumerate(slots):
            group = [conversations[i] for i in members]
            rows = -(-len(group) // self.batch_multiple) * self.batch_multiple
            share = [int(i) for i in self.row_indices(rows)]
            positions = [i for i in share if i < len(group)]
            played += [group[i] for i in positions]
            prompts = {i: self.environment.prompt_tokens(group[i].history) for i in positions}
            (longest,) = multihost.agree_on_max((max(map(len, prompts.values()), default=0),))
            samples = await self._turn_of_share(params, group, share, rows, prompts, [turns[i] for i in members],
                                                bucket(longest, self.prompt_buckets), jax.random.fold_in(key, g))
            mine += [((g, position, s.sample_index), s) for position, s in samples]
        return mine, played

    def _require_row_placement(self) -> None:
        if self.row_indices is None or self.place_rows is None:
            raise ValueError("a rollout over several processes needs row placement (place_rows, row_indices)")

    async def _turn_of_share(self, params, group, slots, rows, prompts, turn, length, key):
        """One sampler call over every process's rows; this process's conversations (`prompts`,
        by position) scored and answered, at `turn` (or at `turn[position]` each). Returns
        (position, sample) pairs."""
        n = self.sampling.num_samples
        t0 = time.perf_counter()
        tokens, mask = left_pad([prompts.get(position) for position in slots], length, self.generator.pad_id)
        self.timings["prompt_tokens"] += sum(map(len, prompts.values()))
        self.timings["prefilled_tokens"] += sum(map(len, prompts.values()))
        generation = self.generator(params, self.place_rows(tokens, rows), self.place_rows(mask, rows), key,
                                    self.sampling)
        by_row = await asyncio.to_thread(_rows_by_index, generation)
        t1 = time.perf_counter()
        positions = sorted(prompts)
        conversations = [group[i] for i in positions]
        sampled, generated = [], 0
        for i in positions:
            row = []
            for j in range(n):
                toks, lps, size = (by_row[name][i * n + j] for name in ("tokens", "logprobs", "lengths"))
                row.append((toks[:size], lps[:size]))
                generated += int(size)
            sampled.append(row)
        turns = [turn if isinstance(turn, int) else turn[i] for i in positions]
        samples = await self._continue(conversations, turns, [prompts[i] for i in positions], sampled, t0, t1,
                                       generated)
        position_of = {c.conversation_id: i for c, i in zip(conversations, positions)}
        return [(position_of[s.conversation_id], s) for s in samples]

    def _sample_prompts(self, params, prompts: list[list[int]], key, kept: PromptCache | None, keep: bool):
        """(generation, the prompt cache to keep, or None unless `keep`) for one turn's prompts."""
        if keep:
            before = self.prefix_sampler.counts["prefilled_tokens"]
            generation, kept = self.prefix_sampler(params, prompts, kept, key, self.sampling, self.prompt_buckets,
                                                   self.batch_multiple, self.put_batch)
            self.timings["prefilled_tokens"] += self.prefix_sampler.counts["prefilled_tokens"] - before
            return generation, kept
        tokens, mask = pad_prompts(prompts, self.generator.pad_id, self.prompt_buckets, self.batch_multiple)
        self.timings["prefilled_tokens"] += sum(map(len, prompts))
        return self.generator(params, self.put_batch(tokens), self.put_batch(mask), key, self.sampling), None

    async def _turn(self, params, conversations: list[Conversation], turn: int | Sequence[int], key,
                    kept: PromptCache | None = None, keep: bool = False) -> tuple[list[Sample], PromptCache | None]:
        n = self.sampling.num_samples
        turns = [turn] * len(conversations) if isinstance(turn, int) else list(turn)  # one per conversation
        t0 = time.perf_counter()
        prompts = [self.environment.prompt_tokens(c.history) for c in conversations]
        self.timings["prompt_tokens"] += sum(map(len, prompts))
        generation, kept = self._sample_prompts(params, prompts, key, kept, keep)
        # Wait for the device in a thread, so other groups' host work proceeds meanwhile.
        generation = await asyncio.to_thread(jax.device_get, generation)
        t1 = time.perf_counter()
        rows = [[(generation.tokens[i * n + j, :generation.lengths[i * n + j]],
                  generation.logprobs[i * n + j, :generation.lengths[i * n + j]]) for j in range(n)]
                for i in range(len(conversations))]
        samples = await self._continue(conversations, turns, prompts, rows, t0, t1, int(generation.lengths.sum()))
        return samples, kept

    async def _continue(self, conversations, turns, prompts, rows, t0: float, t1: float,
                        generated_tokens: int) -> list[Sample]:
        """A turn's samples (`rows`: per conversation, n (tokens, log-probs)) decoded, scored,
        continued with the best one and answered by the users."""
        texts = [[self.environment.tokenizer.decode(toks, skip_special_tokens=True) for toks, _ in row] for row in rows]
        scored = await self.environment.score(conversations, texts)
        t2 = time.perf_counter()

        samples, best = [], []
        for c, c_turn, prompt, row, row_texts, row_scores in zip(conversations, turns, prompts, rows, texts, scored):
            turn_samples = [self._sample(c, c_turn, j, prompt, toks, lps, text, parsed, score, matched)
                            for j, ((toks, lps), text, (parsed, score, matched)) in enumerate(zip(row, row_texts, row_scores))]
            chosen = max(turn_samples, key=lambda s: (s.score.valid, s.reward, -s.sample_index))
            chosen.chosen = True
            samples += turn_samples
            best.append(chosen)
            c.history.append(_history_entry(chosen))
        replies = await self.environment.user_sim.respond([c.user for c in conversations], [c.history for c in conversations])
        for c, reply in zip(conversations, replies):
            if reply is None:  # the simulator failed: this conversation stops, its samples stay
                c.active = False
            else:
                c.history.append(Message("user", reply))
        t3 = time.perf_counter()
        self.timings.update(sampling_s=t1 - t0, scoring_s=t2 - t1, users_s=t3 - t2,
                            generated_tokens=generated_tokens, user_failures=replies.count(None))
        return samples

    def _sample(self, conversation, turn, index, prompt, tokens, logprobs, text, parsed, score, matched) -> Sample:
        tokenizer = self.environment.tokenizer
        sample = Sample(conversation.conversation_id, turn, index, np.asarray(prompt, np.int32), tokens.astype(np.int32),
                        logprobs.astype(np.float32), text, parsed, score, reward_of(score, self.environment.reward_mode),
                        profile_length=profile_block_length(tokenizer, tokens, parsed.well_formed))
        if self.environment.item_credit:
            sample.item_credit, sample.item_mask = token_item_credit(
                tokenizer, tokens, text, parsed, matched, len(conversation.user.persona.items), sample.profile_length)
        return sample

    def _stats(self, samples: list[Sample]) -> dict[str, float]:
        valid = [s for s in samples if s.score.valid]
        chosen = [s for s in valid if s.chosen]

        def mean(values):
            return float(np.mean(values)) if values else 0.0

        stats = {
            "samples": len(samples),
            "invalid_samples": len(samples) - len(valid),
            "reward": mean([s.reward for s in valid]),
            "profile_f1": mean([s.score.profile_reward for s in valid]),
            "response_reward": mean([s.score.response_reward for s in valid]),
            "well_formed": mean([float(s.score.well_formed) for s in valid]),
            "best_of_n_reward": mean([s.reward for s in chosen]),
            "response_tokens": mean([len(s.response_tokens) for s in samples]),
        }
        stats.update({k: float(v) for k, v in self.timings.items()})
        if self.timings.get("sampling_s"):
            stats["sampling_tokens_per_s"] = self.timings["generated_tokens"] / self.timings["sampling_s"]
        return stats


def _in_order(mine: list[tuple[tuple, Sample]]) -> list[Sample]:
    """Every process's sampled turns (each (order key, sample) pairs; a collective), in the order
    the one-process rollout returns them."""
    every = [part for parts in multihost.allgather_objects(mine) for part in parts]
    return [sample for _, sample in sorted(every, key=lambda part: part[0])]


def _rows_by_index(generation) -> dict[str, dict[int, np.ndarray]]:
    """This process's rows of a sampler call's outputs, by global row index (each output may be
    laid out differently)."""
    return {name: multihost.rows_by_index(getattr(generation, name)) for name in ("tokens", "logprobs", "lengths")}


def _history_entry(sample: Sample) -> Message:
    """The chosen turn as the conversation remembers it; a malformed turn stays as raw text."""
    if sample.parsed.well_formed:
        return assistant_message(sample.parsed.profile, sample.parsed.response)
    return Message("assistant", sample.text.strip() or "...")
