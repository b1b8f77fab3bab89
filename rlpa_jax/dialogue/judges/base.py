"""The judge interfaces and the per-turn score built from their verdicts.

Two judge roles score every sampled turn:
- a ProfileJudge counts how many inferred profile items match a distinct true item
  (the Profile Reward is the F1 built from that count); an ItemMatchingJudge also says which
  ones matched, which per-item credit needs;
- a ResponseJudge gives the strict 0/1 Response Reward (natural, relevant, logical,
  engaging and informative, all five or nothing).

A judge that cannot score a sample answers None; score_turn turns that into an invalid
(masked, counted) sample rather than a silent 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from rlpa_jax.dialogue.chat import Message, ParsedTurn
from rlpa_jax.dialogue.personas.base import Persona
from rlpa_jax.dialogue.profile import ProfileItem, profile_f1

ProfilePairs = Sequence[tuple[Sequence[ProfileItem], Sequence[ProfileItem]]]  # (inferred, true) per sample


@dataclass(frozen=True)
class ResponseRequest:
    persona: Persona
    history: Sequence[Message]  # the conversation before the reply; ends with the user's message
    reply: str  # the policy's <response> text (untrusted)


class ProfileJudge(Protocol):
    async def count_matches(self, pairs: ProfilePairs) -> list[int | None]:
        """For each (inferred, true): inferred items matching a distinct true item; None = unscored."""
        ...


class ResponseJudge(Protocol):
    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        """1 if the reply meets all five criteria, 0 if not, None if it could not be scored."""
        ...


@runtime_checkable
class ItemMatchingJudge(ProfileJudge, Protocol):
    """A ProfileJudge that also says which inferred items matched: per-item credit
    (ppo.credit=item) needs it, a bare count does not say which item earned it."""

    async def match_items(self, pairs: ProfilePairs) -> list[frozenset[int] | None]:
        """For each (inferred, true): which inferred items match (for crediting items one by one)."""
        ...


@dataclass(frozen=True)
class TurnScore:
    profile_reward: float
    response_reward: float
    total: float
    valid: bool  # False: a judge failed; the sample is masked out and counted
    well_formed: bool


def score_turn(parsed: ParsedTurn, matched: int | None, response_ok: int | None, num_true: int) -> TurnScore:
    """Profile F1 + 0/1 response; malformed -> 0 (still valid); a judge failure -> invalid."""
    if not parsed.well_formed or parsed.profile is None or parsed.response is None:
        return TurnScore(0.0, 0.0, 0.0, valid=True, well_formed=False)
    if matched is None or response_ok is None:
        return TurnScore(0.0, 0.0, 0.0, valid=False, well_formed=True)
    if response_ok not in (0, 1):
        raise ValueError(f"judges.score_turn: response_ok must be 0, 1 or None, got {response_ok!r}")
    profile_reward = float(profile_f1(matched, len(parsed.profile), num_true))
    response_reward = float(response_ok)
    return TurnScore(profile_reward, response_reward, profile_reward + response_reward, True, True)

