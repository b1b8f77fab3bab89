"""The embedded judges: transparent, deterministic rules, no network.

EmbeddedProfileJudge matches items slot by slot (dialogue/matching.py); EmbeddedResponseJudge
applies the five response criteria, each a rule that returns its verdict and the reason. Policy
replies are untrusted data: the rules never read them as instructions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from rlpa_jax.dialogue.judges.base import ProfilePairs, ResponseRequest
from rlpa_jax.dialogue.matching import (
    MatchRules,
    canonical_slot,
    count_item_matches,
    matched_item_indices,
    mentioned_item_indices,
    value_tokens,
)
from rlpa_jax.dialogue.text import (
    assistant_replies,
    content_tokens,
    is_flattery_heavy,
    looks_like_injection,
    message_topics,
    near_duplicate,
    sentences,
    user_messages,
    words,
)

_TAG_RE = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>")
_LIST_LINE_RE = re.compile(r"^\s*([-*\u2022]|\d+[.)])\s+", re.MULTILINE)
_MARKUP_RE = re.compile(r"\\[a-zA-Z]+|```|[{}]|^\s*#", re.MULTILINE)
_INVITATION_RE = re.compile(
    r"\b(tell me|let me know|would you|do you|have you|how about|what about|i'?d love to hear|"
    r"curious|feel free|share more|any (plans|thoughts|ideas))\b",
    re.IGNORECASE,
)


class EmbeddedProfileJudge:
    """Rule-based, slot-aware item matching (an ItemMatchingJudge)."""

    def __init__(self, rules: MatchRules = MatchRules()) -> None:
        self.rules = rules

    async def count_matches(self, pairs: ProfilePairs) -> list[int | None]:
        return [count_item_matches(inferred, true, self.rules) for inferred, true in pairs]

    async def match_items(self, pairs: ProfilePairs) -> list[frozenset[int] | None]:
        """For each (inferred, true): which inferred items match (for crediting items one by one)."""
        return [matched_item_indices(inferred, true, self.rules) for inferred, true in pairs]


# --------------------------------------------------------------------------------------
# Embedded response criteria: each returns (ok, reason)
# --------------------------------------------------------------------------------------

Verdict = tuple[bool, str]


def is_natural(request: ResponseRequest) -> Verdict:
    """Reads like a chat message: 1-4 sentences, 3-120 words, no tags, lists or markup."""
    reply = request.reply.strip()
    if _TAG_RE.search(reply):
        return False, "contains markup tags"
    if _LIST_LINE_RE.search(reply):
        return False, "contains a list"
    if _MARKUP_RE.search(reply):
        return False, "contains markup or code"
    if looks_like_injection(reply):
        return False, "contains instructions aimed at the grader"
    word_count = len(words(reply))
    if not 3 <= word_count <= 120:
        return False, f"{word_count} words (needs 3 to 120)"
    sentence_count = len(sentences(reply))
    if not 1 <= sentence_count <= 4:
        return False, f"{sentence_count} sentences (needs 1 to 4)"
    return True, "reads like a chat message"


def is_relevant(request: ResponseRequest) -> Verdict:
    """Once the user has revealed something, the reply builds on it or the conversation topic."""
    said = user_messages(request.history)
    revealed = set()
    for message in said:
        revealed |= mentioned_item_indices(request.persona.items, message)
    if not revealed:
        return True, "the user has revealed nothing yet"
    reply_tokens = content_tokens(request.reply) | value_tokens(request.reply)
    user_tokens = set().union(*(content_tokens(message) | value_tokens(message) for message in said))
    shared = reply_tokens & user_tokens
    if shared:
        return True, f"builds on the user's words ({', '.join(sorted(shared)[:3])})"
    revealed_slots = {canonical_slot(request.persona.items[index].slot) for index in revealed}
    topics = message_topics(request.reply) & revealed_slots
    if topics:
        return True, f"talks about what the user revealed ({', '.join(sorted(topics))})"
    return False, "ignores everything the user has shared"


def is_logical(request: ResponseRequest) -> Verdict:
    """Follows from the user's last message; a question gets an answer, not only a question back."""
    said = user_messages(request.history)
    if not said:
        return True, "no user message to answer"
    last = said[-1]
    last_tokens = content_tokens(last) | value_tokens(last)
    if not last_tokens:
        return True, "the last user message is a greeting"
    if "?" in last and all(sentence.rstrip().endswith("?") for sentence in sentences(request.reply)):
        return False, "answers the user's question with questions only"
    reply_tokens = content_tokens(request.reply) | value_tokens(request.reply)
    if reply_tokens & last_tokens:
        return True, "picks up the user's last message"
    last_topics = message_topics(last) | {
        canonical_slot(request.persona.items[index].slot)
        for index in mentioned_item_indices(request.persona.items, last)
    }
    if message_topics(request.reply) & last_topics:
        return True, "stays on the topic of the user's last message"
    return False, "does not follow from the user's last message"


def is_engaging(request: ResponseRequest) -> Verdict:
    """Moves the conversation on: a question or an invitation to say more."""
    if "?" in request.reply or _INVITATION_RE.search(request.reply):
        return True, "invites the user to continue"
    return False, "gives the user nothing to answer"


def is_informative(request: ResponseRequest) -> Verdict:
    """Adds something: not an echo, not flattery, not a repeat of an earlier reply."""
    if is_flattery_heavy(request.reply):
        return False, "mostly praise"
    for earlier in assistant_replies(request.history):
        if near_duplicate(request.reply, earlier):
            return False, "repeats an earlier reply"
    said = user_messages(request.history)
    reply_tokens = content_tokens(request.reply)
    last_tokens = content_tokens(said[-1]) if said else set()
    if not reply_tokens:
        return False, "says almost nothing"
    if last_tokens:
        new_tokens = reply_tokens - last_tokens
        if len(new_tokens) < 2 or len(new_tokens) < 0.3 * len(reply_tokens):
            return False, "echoes the user's words"
    return True, "adds something new"


RESPONSE_CRITERIA: tuple[tuple[str, Callable[[ResponseRequest], Verdict]], ...] = (
    ("natural", is_natural),
    ("relevant", is_relevant),
    ("logical", is_logical),
    ("engaging", is_engaging),
    ("informative", is_informative),
)


@dataclass(frozen=True)
class CriterionResult:
    name: str
    ok: bool
    reason: str


def judge_with_reasons(request: ResponseRequest) -> list[CriterionResult]:
    """Every criterion's verdict and reason, in RESPONSE_CRITERIA order."""
    return [CriterionResult(name, *criterion(request)) for name, criterion in RESPONSE_CRITERIA]


class EmbeddedResponseJudge:
    """The five criteria as transparent rules; 1 only if all pass."""

    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        return [int(all(result.ok for result in judge_with_reasons(request))) for request in requests]

    def judge_with_reasons(self, request: ResponseRequest) -> list[CriterionResult]:
        return judge_with_reasons(request)
