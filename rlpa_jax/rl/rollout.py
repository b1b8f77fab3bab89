"""The host-side multi-turn rollout loop: conversations in flight, n samples per turn, best-of-n.

Each turn, a group of conversations is rendered into prompts, sampled n times in one call of the
generation engine, parsed and scored by the judges, continued with its best sample, and answered
by the simulated users in one batch. Groups run as concurrent coroutines: while one group waits
for the device (in a worker thread), the others talk to judges and users, so host calls for one
group overlap device work for another. Every sample becomes one PPO experience.

With the engine's prefix cache on, each group's calls within one `run` form a cache chain: a turn
prefills only what its prompts add to the group's previous turn (generation/prefix_cache.py). The
chain lives for one `run`: the parameters are fixed within a rollout, and an update changes them.

With several processes the engine serves only this process's share of every group (the
conversations whose rows land on its devices): the process renders their prompts, makes their
judge and user calls, and every engine call is a collective, so groups run one after the other,
in the same order on every process. The sampled turns are exchanged at the end, so every process
returns all of them, in the one-process order. play_turn (the `turn` schedule) returns every
sampled turn but updates only the conversations this process played (the trainer's pool
exchanges the rest, rl/schedule.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from typing import Sequence

import jax
import numpy as np

from rlpa_jax.dialogue.chat import PROFILE_CLOSE, Message, ParsedTurn, assistant_message
from rlpa_jax.dialogue.judges import TurnScore
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
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
    sampled turn. The engine must hold the parameters to sample with (`engine.sync`)."""

    _runs = itertools.count()  # each run's prefix-cache chains are its own

    def __init__(self, environment: Environment, engine: GenerationEngine, sampling: SamplingParams, max_rounds: int,
                 groups: int = 2):
        self.environment, self.engine, self.sampling = environment, engine, sampling
        self.max_rounds, self.groups = max_rounds, groups
        self.timings: Counter = Counter()

    def run(self, conversations: list[Conversation], key: jax.Array) -> RolloutResult:
        self.timings = Counter()
        start = time.perf_counter()
        groups = [conversations[g::self.groups] for g in range(self.groups)]
        groups = [g for g in groups if g]
        run = next(self._runs)
        mine, played = self._play_groups([
            (lambda g=g, group=group: self._run_group(group, g, jax.random.fold_in(key, g), (run, g)))
            for g, group in enumerate(groups)])
        return self._result(mine, conversations, start, played)

    def play_turn(self, conversations: list[Conversation], turns: Sequence[int], key: jax.Array) -> RolloutResult:
        """One turn of each conversation (the `turn` schedule's pool, each at its own `turns[i]`):
        sampled, scored, continued with its best sample and answered by its user. The pool is split
        into the same pipeline groups as run()'s, so a call has as many rows as there. Full
        prefills, no prompt cache: the parameters change between one turn and the next.

        With several processes, each plays only its share of every group and returns every sampled
        turn; the conversations it did not play are left as they were (`local_ids` names those it
        played: the caller brings the others up to date)."""
        self.timings = Counter()
        start = time.perf_counter()
        slots = [list(range(g, len(conversations), self.groups)) for g in range(self.groups)]
        slots = [g for g in slots if g]

        async def play_group(g: int, members: list[int]):
            group = [conversations[i] for i in members]
            positions = self.engine.share(len(group))
            samples = await self._turn([group[i] for i in positions], [turns[members[i]] for i in positions],
                                       jax.random.fold_in(key, g))
            position_of = {group[i].conversation_id: i for i in positions}
            pairs = [((g, position_of[s.conversation_id], s.sample_index), s) for s in samples]
            return pairs, [group[i] for i in positions]

        mine, played = self._play_groups([(lambda g=g, members=members: play_group(g, members))
                                          for g, members in enumerate(slots)])
        return self._result(mine, conversations, start, played)

    def _play_groups(self, coroutines) -> tuple[list[tuple[tuple, Sample]], list[Conversation]]:
        """Every group's (order key, sample) pairs and the conversations this process played. The
        groups run concurrently, or, when every engine call is a collective, one after the other in
        the same order on every process (concurrent groups would call in an order set by latency)."""
        async def play():
            if self.engine.collective:
                return [await make() for make in coroutines]
            return await asyncio.gather(*(make() for make in coroutines))

        # run_sync: asyncio.run, or from inside a running event loop (a notebook's kernel) on a worker thread
        results = run_sync(play())
        return [pair for pairs, _ in results for pair in pairs], [c for _, group in results for c in group]

    def _result(self, mine: list[tuple[tuple, Sample]], conversations: list[Conversation], start: float,
                played: list[Conversation]) -> RolloutResult:
        self.timings["rollout_s"] = time.perf_counter() - start
        if not self.engine.collective:
            samples = [sample for _, sample in sorted(mine, key=lambda pair: pair[0])]
            stats = self._stats(samples)
            # What the replies drew out of the users: profile F1 can only count what was revealed.
            stats["revealed_items"] = float(np.mean([len(c.user.revealed) for c in conversations])) if conversations else 0.0
            return RolloutResult(samples, conversations, stats)
        samples = _in_order(mine)
        stats = self._stats(samples)
        stats |= multihost.reduce_metrics({"revealed_items": sum(len(c.user.revealed) for c in played)},
                                          {"revealed_items": len(played)})
        # Token and failure counts over every process (the times stay this process's own).
        stats |= multihost.reduce_metrics({k: float(self.timings.get(k, 0)) for k in COUNTED})
        if self.timings.get("sampling_s"):
            stats["sampling_tokens_per_s"] = stats["generated_tokens"] / self.timings["sampling_s"]
        stats["conversations_here"] = float(len(played))  # this process's share (per-process, not reduced)
        return RolloutResult(samples, conversations, stats, frozenset(c.conversation_id for c in played))

    async def _run_group(self, group: list[Conversation], g: int, key, cache_key):
        """A group's dialogues to the end, this process's share of them; the group's calls are one
        prefix-cache chain. Returns ((order key, sample) pairs, the conversations played)."""
        positions = self.engine.share(len(group))
        position_of = {group[i].conversation_id: i for i in positions}
        mine = []
        try:
            for turn in range(self.max_rounds):
                active = [group[i] for i in positions if group[i].active]
                if not self.engine.any_left(len(active)):
                    break
                samples = await self._turn(active, [turn] * len(active), jax.random.fold_in(key, turn), cache_key)
                mine += [((g, s.turn, position_of[s.conversation_id], s.sample_index), s) for s in samples]
        finally:
            self.engine.forget(cache_key)
        return mine, [group[i] for i in positions]

    async def _turn(self, conversations: list[Conversation], turns: list[int], key, cache_key=None) -> list[Sample]:
        """One turn of `conversations` (each at its own turn): sampled, scored, continued, answered."""
        t0 = time.perf_counter()
        prompts = [self.environment.prompt_tokens(c.history) for c in conversations]
        pending = self.engine.submit(prompts, self.sampling, key, cache_key=cache_key)
        # Wait for the device in a thread, so other groups' host work proceeds meanwhile.
        generated = await asyncio.to_thread(pending.result)
        t1 = time.perf_counter()
        self.timings.update(prompt_tokens=generated.prompt_tokens, prefilled_tokens=generated.prefilled_tokens)
        rows = [[(c.tokens, c.logprobs) for c in samples] for samples in generated.completions]
        return await self._continue(conversations, turns, prompts, rows, t0, t1, generated.generated_tokens)

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


def _history_entry(sample: Sample) -> Message:
    """The chosen turn as the conversation remembers it; a malformed turn stays as raw text."""
    if sample.parsed.well_formed:
        return assistant_message(sample.parsed.profile, sample.parsed.response)
    return Message("assistant", sample.text.strip() or "...")
