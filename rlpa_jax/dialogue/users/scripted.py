"""The scripted user: embedded, seeded and deterministic, speaking from sentence templates.

It reveals its profile gradually (a hard per-turn budget of ceil(15% of its items)), prefers
what the assistant just talked about, complains about repetition and flattery, and announces
the most telling change when it switches persona mid-dialogue.
"""

from __future__ import annotations

import math
import random
import re
from typing import Sequence

from rlpa_jax.dialogue.chat import Message
from rlpa_jax.dialogue.matching import canonical_slot, slot_keyword_stems, value_tokens
from rlpa_jax.dialogue.personas.base import Persona
from rlpa_jax.dialogue.profile import ProfileItem, normalize_text
from rlpa_jax.dialogue.text import is_flattery_heavy, near_duplicate, stemmed_words, visible_reply_text
from rlpa_jax.dialogue.users.base import (
    MAX_SENTENCES,
    OPENING_MESSAGE,
    StatefulUser,
    UserState,
    item_key,
    switch_if_due,
)

REVEAL_FRACTION = 0.15

REVEAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Age": ("I'm {value} years old.", "I turned {value} not long ago."),
    "Interests": (
        "I'm really into {value}.",
        "In my free time I enjoy {value}.",
        "Lately I spend a lot of time on {value}.",
    ),
    "Education Background": ("Education-wise, my background is {value}.", "My educational background is {value}."),
    "Personality Traits": ("People say I'm {value}.", "I'd describe myself as {value}."),
    "Occupation": ("I work as {a_value}.", "I'm {a_value} by profession.", "For work, I'm {a_value}."),
    "Marital Status": ("I'm {value}.", "Relationship-wise, I'm {value}."),
    "Family Background": ("A bit about my family: {value}.", "Family-wise, {value}."),
    "Location": ("I live in {value}.", "I'm based in {value}."),
    "Other Information": ("One more thing about me: {value}.", "Something else about me: {value}."),
}
AGE_TEXT_TEMPLATES = ("Age-wise, I'm {value}.",)
GENDER_SENTENCES = {"female": "I'm a woman.", "male": "I'm a man."}
FREE_FORM_TEMPLATES = ("My {slot} is {value}.",)
NO_ARTICLE_OCCUPATIONS = {"retired", "unemployed", "self employed", "between jobs"}

SWITCH_TEMPLATES: dict[str, str] = {
    "Occupation": "Actually, I've switched jobs \u2014 I work as {a_value} now.",
    "Location": "Actually, I've moved \u2014 I live in {value} now.",
    "Interests": "Actually, these days I'm more into {value}.",
    "Marital Status": "Actually, things have changed \u2014 I'm {value} now.",
}
SWITCH_DEFAULT = "Actually, something has changed \u2014 my {slot} is {value} now."
SWITCH_SLOT_PRIORITY = ("Occupation", "Location", "Interests", "Marital Status")

REPETITION_COMPLAINTS = ("You already said that.", "You're repeating yourself.", "Didn't you just say that?")
FLATTERY_COMPLAINTS = (
    "No need to flatter me.",
    "That's a lot of praise for not much.",
    "You don't have to butter me up.",
)
ACKNOWLEDGEMENTS = ("Sure.", "Good question.", "Oh, okay.")
FILLERS = (
    "Hmm, not sure what else to add.",
    "Sure, that makes sense.",
    "Okay, good to know.",
    "Ha, fair enough.",
    "Thanks, I'll think about that.",
    "Interesting, go on.",
)


def reveal_budget(num_items: int, fraction: float = REVEAL_FRACTION) -> int:
    """Most new items one message may reveal: ceil(fraction * items), at least 1."""
    # round() first: 0.15 * 20 is 3.0000000000000004 in floating point, not 3.
    return max(1, math.ceil(round(fraction * num_items, 9)))


def clean_value(value: str) -> str:
    return value.strip().rstrip(".!?;,").strip()


def with_article(value: str) -> str:
    """'nurse' -> 'a nurse', 'engineer' -> 'an engineer'; kept when an article or no-article word."""
    lowered = value.lower()
    if lowered.startswith(("a ", "an ", "the ")) or normalize_text(value) in NO_ARTICLE_OCCUPATIONS:
        return value
    return ("an " if lowered[:1] in "aeiou" else "a ") + value


def reveal_sentence(item: ProfileItem, rng: random.Random) -> str:
    """One brief first-person sentence stating `item`."""
    value = clean_value(item.value)
    slot = canonical_slot(item.slot)
    if slot == "Gender" and normalize_text(value) in ("female", "woman", "f"):
        return GENDER_SENTENCES["female"]
    if slot == "Gender" and normalize_text(value) in ("male", "man", "m"):
        return GENDER_SENTENCES["male"]
    if slot == "Gender":
        return f"I identify as {value}."
    if slot == "Occupation" and normalize_text(value) in NO_ARTICLE_OCCUPATIONS:
        return f"I'm {value}."
    if slot == "Age":
        templates = REVEAL_TEMPLATES["Age"] if re.fullmatch(r"\d{1,3}", value) else AGE_TEXT_TEMPLATES
    else:
        templates = REVEAL_TEMPLATES.get(slot, FREE_FORM_TEMPLATES)
    template = templates[rng.randrange(len(templates))]
    return template.format(value=value, a_value=with_article(value), slot=item.slot.strip().lower())


def switch_announcement(old: Persona, new: Persona) -> tuple[int, str] | None:
    """(index into new.items, sentence) for the most telling change, or None if nothing changed."""
    old_keys = {item_key(item) for item in old.items}
    changed = [index for index, item in enumerate(new.items) if item_key(item) not in old_keys]
    if not changed:
        return None

    def priority(index: int) -> int:
        slot = canonical_slot(new.items[index].slot)
        return SWITCH_SLOT_PRIORITY.index(slot) if slot in SWITCH_SLOT_PRIORITY else len(SWITCH_SLOT_PRIORITY)

    index = min(changed, key=lambda candidate: (priority(candidate), candidate))
    item = new.items[index]
    value = clean_value(item.value)
    template = SWITCH_TEMPLATES.get(canonical_slot(item.slot), SWITCH_DEFAULT)
    return index, template.format(value=value, a_value=with_article(value), slot=item.slot.strip().lower())


def relatedness(item: ProfileItem, assistant_text: str) -> int:
    """How much the assistant's words point at `item`: slot keywords plus (doubled) value words."""
    keyword_hits = len(stemmed_words(assistant_text) & slot_keyword_stems(item.slot))
    value_hits = len(value_tokens(assistant_text) & value_tokens(item.value))
    return keyword_hits + 2 * value_hits


def complaint_for(assistant_reply: str, earlier_replies: Sequence[str], rng: random.Random) -> str | None:
    """A short complaint when the assistant repeats itself or lays on the praise."""
    if any(near_duplicate(assistant_reply, earlier) for earlier in earlier_replies):
        return REPETITION_COMPLAINTS[rng.randrange(len(REPETITION_COMPLAINTS))]
    if is_flattery_heavy(assistant_reply):
        return FLATTERY_COMPLAINTS[rng.randrange(len(FLATTERY_COMPLAINTS))]
    return None


class ScriptedUser(StatefulUser):
    """Template-driven user that reveals its profile gradually and deterministically."""

    def __init__(
        self,
        reveal_fraction: float = REVEAL_FRACTION,
        unprompted_reveal_probability: float = 0.6,
        acknowledgement_probability: float = 0.3,
        opening: str = OPENING_MESSAGE,
    ) -> None:
        if not 0.0 < reveal_fraction <= 1.0:
            raise ValueError(f"users.ScriptedUser: reveal_fraction must be in (0, 1], got {reveal_fraction}")
        self.reveal_fraction = reveal_fraction
        self.unprompted_reveal_probability = unprompted_reveal_probability
        self.acknowledgement_probability = acknowledgement_probability
        self.opening = opening

    def reply(self, state: UserState, history: Sequence[Message]) -> str:
        """The next user message for one conversation (advances `state`)."""
        opening = self.opening_if_cold_start(state, history)
        if opening is not None:
            return opening
        previous_persona = state.persona
        just_switched = switch_if_due(state)
        replies = [visible_reply_text(message.content) for message in history if message.role == "assistant"]
        assistant_reply, earlier = replies[-1], replies[:-1]

        parts: list[str] = []
        complaint = complaint_for(assistant_reply, earlier, state.rng)
        if complaint:
            parts.append(complaint)
        budget = reveal_budget(len(state.persona.items), self.reveal_fraction)
        if just_switched:
            announcement = switch_announcement(previous_persona, state.persona)
            if announcement is not None:
                index, sentence = announcement
                state.revealed.add(index)
                parts.append(sentence)
                budget -= 1
        picks = self.choose_items(state, assistant_reply, min(budget, MAX_SENTENCES - len(parts)))
        if picks and len(parts) + len(picks) < MAX_SENTENCES and state.rng.random() < self.acknowledgement_probability:
            parts.append(ACKNOWLEDGEMENTS[state.rng.randrange(len(ACKNOWLEDGEMENTS))])
        for index in picks:
            state.revealed.add(index)
            parts.append(reveal_sentence(state.persona.items[index], state.rng))
        if not parts:
            parts.append(FILLERS[state.rng.randrange(len(FILLERS))])
        state.turn += 1
        return " ".join(parts)

    def choose_items(self, state: UserState, assistant_reply: str, limit: int) -> list[int]:
        """Unrevealed items to reveal now: related ones first (best first), else maybe one at random."""
        if limit <= 0:
            return []
        unrevealed = [index for index in range(len(state.persona.items)) if index not in state.revealed]
        if not unrevealed:
            return []
        scores = {index: relatedness(state.persona.items[index], assistant_reply) for index in unrevealed}
        related = [index for index in unrevealed if scores[index] > 0]
        if related:
            state.rng.shuffle(related)  # ties are broken by the seeded RNG, not by item order
            related.sort(key=lambda index: -scores[index])
            return related[:limit]
        if state.rng.random() < self.unprompted_reveal_probability:
            return [unrevealed[state.rng.randrange(len(unrevealed))]]
        return []

