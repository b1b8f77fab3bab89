"""The environment of RLPA's rollouts: conversations with simulated users, rendered into policy
prompts, and the judges that score every sampled turn.

Everything here is host code that talks to the outside (simulated users, judges); the device
work (sampling, forwards) lives in rollout.py and experience.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Literal, Sequence

from rlpa_jax.dialogue.chat import Message, ParsedTurn, parse_turn, prompt_token_ids
from rlpa_jax.dialogue.judges import (
    ItemMatchingJudge,
    ProfileJudge,
    ResponseJudge,
    ResponseRequest,
    TurnScore,
    score_turn,
)
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.requests import redact_url
from rlpa_jax.dialogue.personas import Persona, make_persona
from rlpa_jax.dialogue.profile import format_profile
from rlpa_jax.dialogue.users import OPENING_MESSAGE, UserSimulator, UserState

RewardMode = Literal["both", "profile", "response"]


@dataclasses.dataclass
class Conversation:
    conversation_id: int
    persona: Persona
    user: UserState
    history: list[Message]
    active: bool = True


def reward_parts(score: TurnScore, mode: RewardMode) -> tuple[float, float]:
    """(profile part, response part) of the reward the mode trains on; the ablations keep one."""
    return (score.profile_reward if mode in ("both", "profile") else 0.0,
            score.response_reward if mode in ("both", "response") else 0.0)


def reward_of(score: TurnScore, mode: RewardMode) -> float:
    """Turn reward = profile F1 + response gate; the ablations keep one part."""
    return sum(reward_parts(score, mode))


def start_conversations(personas: Sequence[Persona], user_sim: UserSimulator, seeds: Sequence[int],
                        first_id: int = 0, switch_turn: int | None = None,
                        switch_personas: Sequence[Persona] | None = None) -> list[Conversation]:
    """Cold starts: each user opens with the ALOE greeting and nothing about themselves."""
    conversations = []
    for i, (persona, seed) in enumerate(zip(personas, seeds)):
        switch_to = switch_personas[i] if switch_personas is not None and switch_turn is not None else None
        state = user_sim.start(persona, seed, switch_turn if switch_to else None, switch_to)
        conversations.append(Conversation(first_id + i, persona, state, [Message("user", OPENING_MESSAGE)]))
    return conversations


class Environment:
    """Everything outside the device: prompt rendering, judges, simulated users.

    With `item_credit`, the profile judge also says which inferred items matched (it must be an
    ItemMatchingJudge, as the embedded judge is) and each sample gets per-token item credits."""

    def __init__(self, tokenizer, system_prompt: str, user_sim: UserSimulator, profile_judge: ProfileJudge,
                 response_judge: ResponseJudge, reward_mode: RewardMode = "both", max_prompt_tokens: int = 4096,
                 item_credit: bool = False, response_reference: Literal["inferred", "persona"] = "inferred"):
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.reference_persona = response_reference == "persona"
        self.user_sim, self.profile_judge, self.response_judge = user_sim, profile_judge, response_judge
        self.reward_mode, self.max_prompt_tokens = reward_mode, max_prompt_tokens
        self.item_credit = item_credit and reward_mode != "response"
        if self.item_credit and not isinstance(profile_judge, ItemMatchingJudge):
            raise ValueError(f"ppo.credit=item needs a profile judge that says which items matched "
                             f"(judges.kind=embedded does); {type(profile_judge).__name__} only counts them")

    def response_reference(self, conversation: Conversation, parsed: ParsedTurn) -> Persona:
        """Whom the response judge role-plays: the profile the policy wrote (the paper), or the
        user's true persona."""
        if self.reference_persona:
            return conversation.user.persona
        return make_persona("inferred", format_profile(parsed.profile), "", parsed.profile)

    def judge_problems(self) -> list[str]:
        """Why judges left samples unscored, per judge that says (the LLM judges: endpoint and last error)."""
        problems = []
        for role, judge in (("profile judge", self.profile_judge), ("response judge", self.response_judge)):
            problem = getattr(judge, "last_problem", None)
            if problem:
                client = getattr(judge, "client", None)
                where = f" ({client.config.model} at {redact_url(client.config.base_url)})" if client else ""
                problems.append(f"{role}{where}: {problem}")
        return problems

    def llm_clients(self) -> dict[str, LLMClient]:
        """The LLM client of each role that talks to one (user, profile_judge, response_judge)."""
        stages = {"user": self.user_sim, "profile_judge": self.profile_judge, "response_judge": self.response_judge}
        return {role: stage.client for role, stage in stages.items()
                if isinstance(getattr(stage, "client", None), LLMClient)}

    def prompt_tokens(self, history: Sequence[Message]) -> list[int]:
        return prompt_token_ids(self.tokenizer, self.system_prompt, history, self.max_prompt_tokens)

    async def score(self, conversations: Sequence[Conversation],
                    texts: Sequence[Sequence[str]]) -> list[list[tuple[ParsedTurn, TurnScore, frozenset[int] | None]]]:
        """Parse and judge every sample of every conversation, both judges concurrently: the parsed
        turn, its score, and which of its profile items matched (None unless item credit is on)."""
        parsed = [[parse_turn(t) for t in row] for row in texts]
        cells = [(i, j) for i, row in enumerate(parsed) for j, p in enumerate(row) if p.well_formed]
        truth = [conversations[i].user.persona.items for i, _ in cells]
        pairs = [(parsed[i][j].profile, true) for (i, j), true in zip(cells, truth)]
        requests = [ResponseRequest(self.response_reference(conversations[i], parsed[i][j]),
                                    tuple(conversations[i].history), parsed[i][j].response) for i, j in cells]
        profile_call = self.profile_judge.match_items(pairs) if self.item_credit else self.profile_judge.count_matches(pairs)
        found, response_ok = await asyncio.gather(profile_call, self.response_judge.judge(requests))
        if self.item_credit:  # the judge returned each turn's matched item indices
            matched, counts = found, [None if m is None else len(m) for m in found]
        else:  # the judge returned match counts
            matched, counts = [None] * len(found), found
        judged = {cell: (count, m, r, len(true))
                  for cell, count, m, r, true in zip(cells, counts, matched, response_ok, truth)}
        results = []
        for i, row in enumerate(parsed):
            out = []
            for j, p in enumerate(row):
                count, m, r, n_true = judged.get((i, j), (None, None, None, 0))
                out.append((p, score_turn(p, count, r, n_true), m))
            results.append(out)
        return results


