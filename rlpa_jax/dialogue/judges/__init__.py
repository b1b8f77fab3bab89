"""Profile and response judges, chosen by `judges.kind` in the config.

JUDGES maps each kind to a function of the config's `judges` section that returns the
(ProfileJudge, ResponseJudge) pair; a new kind is one new entry. The interfaces live in
judges/base.py, the embedded rules in judges/rules.py, the LLM judges in judges/llm.py.
"""

from __future__ import annotations

from typing import Callable

from rlpa_jax.config.llm_sections import inherited
from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import JudgeConfig
from rlpa_jax.dialogue.judges.base import (
    ItemMatchingJudge,
    ProfileJudge,
    ResponseJudge,
    ResponseRequest,
    TurnScore,
    score_turn,
)
from rlpa_jax.dialogue.judges.llm import LLMProfileJudge, LLMResponseJudge
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.llm.client import client_from_section

JudgePair = tuple[ProfileJudge, ResponseJudge]


def embedded_judges(section: JudgeConfig) -> JudgePair:
    return EmbeddedProfileJudge(), EmbeddedResponseJudge()


def llm_judges(section: JudgeConfig) -> JudgePair:
    """Each judge on its own endpoint section (judges.profile.llm, judges.response.llm; unset fields
    come from judges.llm) and its own client, so each has its own metrics; judges on one endpoint
    still share its rate limiter."""
    profile = client_from_section(inherited(section.profile.llm, section.llm), "judges.profile.llm")
    response = client_from_section(inherited(section.response.llm, section.llm), "judges.response.llm")
    return (LLMProfileJudge(profile, prompt_name=section.profile_prompt),
            LLMResponseJudge(response, prompt_name=section.response_prompt))


JUDGES: dict[str, Callable[[JudgeConfig], JudgePair]] = {
    "embedded": embedded_judges,
    "llm": llm_judges,
}


# Each kind's profile judge class, so that what a config asks of a kind is checked at load, before
# any judge is built (app/build.py: ppo.credit=item needs one that says which items matched).
PROFILE_JUDGE_TYPES: dict[str, type] = {"embedded": EmbeddedProfileJudge, "llm": LLMProfileJudge}


def matches_items(kind: str) -> bool:
    """Whether judges.kind's profile judge says which inferred items matched (an ItemMatchingJudge)."""
    return issubclass(PROFILE_JUDGE_TYPES[kind], ItemMatchingJudge)


def build_judges(section: JudgeConfig) -> JudgePair:
    """The (profile judge, response judge) that `section.kind` names in JUDGES."""
    if section.kind not in JUDGES:
        raise ConfigError(f"judges.kind={section.kind!r} is not a judge kind; expected one of {sorted(JUDGES)}")
    return JUDGES[section.kind](section)


__all__ = [
    "JUDGES",
    "PROFILE_JUDGE_TYPES",
    "ItemMatchingJudge",
    "JudgePair",
    "ProfileJudge",
    "ResponseJudge",
    "ResponseRequest",
    "TurnScore",
    "build_judges",
    "matches_items",
    "score_turn",
]
