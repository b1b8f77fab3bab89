"""Simulated users behind one batched async interface.

The host-side rollout keeps B conversations in flight and asks the simulator for the next
user message of all of them at once:

    states = [user.start(persona, seed) for persona, seed in ...]
    first = await user.respond(states, [[] for _ in states])     # cold start: "Hello"
    ...
    replies = await user.respond(states, histories)              # None = that one failed

respond() advances each state in place: the turn index (the user's messages so far, read from
the history), the revealed items and the RNG.

- ScriptedUser: embedded, seeded and deterministic. It reveals its profile gradually (a hard
  per-turn budget of ceil(15% of its items)), prefers what the assistant just talked about,
  complains about repetition and flattery, and can switch to another persona mid-dialogue
  (the preference-conflict setting).
- LLMUser: an OpenAI-compatible model role-plays the persona (configs/prompts/user_roleplay.txt);
  the conversation is sent with roles flipped and only the policy's <response> text shown.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.dialogue.judges import (
    canonical_slot,
    fill_template,
    is_flattery_heavy,
    mentioned_item_indices,
    near_duplicate,
    sentences,
    slot_keyword_stems,
    stemmed_words,
    value_tokens,
    visible_reply_text,
)
from rlpa_jax.dialogue.llm import LLMCallError, LLMClient
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.profile import ProfileItem, normalize_text

OPENING_MESSAGE = "Hello"  # the ALOE protocol's cold start: no profile information
MAX_SENTENCES = 3
REVEAL_FRACTION = 0.15


@dataclass
class UserState:
    """One simulated user's side of one conversation (mutated by respond())."""

    persona: Persona  # the persona played now (the switch target once switched)
    seed: int
    rng: random.Random
    turn: int = 0  # messages this user has sent, the opening included (the next one's index)
    revealed: set[int] = field(default_factory=set)  # indices into persona.items
    switch_turn: int | None = None  # the message index from which switch_persona is played
    switch_persona: Persona | None = None
    switched: bool = False
    original_persona: Persona | None = None


@runtime_checkable
class UserSimulator(Protocol):
    def start(
        self,
        persona: Persona,
        seed: int,
        switch_turn: int | None = None,
        switch_persona: Persona | None = None,
    ) -> UserState: ...

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]: ...


def new_user_state(
    persona: Persona, seed: int, switch_turn: int | None = None, switch_persona: Persona | None = None
) -> UserState:
    if (switch_turn is None) != (switch_persona is None):
        raise ValueError(
            "users.start: give both switch_turn and switch_persona (preference conflict) or neither; "
            f"got switch_turn={switch_turn!r}, switch_persona={'set' if switch_persona else None}"
        )
    if switch_turn is not None and switch_turn < 1:
        raise ValueError(f"users.start: switch_turn must be >= 1 (0 is the cold-start greeting), got {switch_turn}")
    return UserState(
        persona=persona,
        seed=seed,
        rng=random.Random(seed),
        switch_turn=switch_turn,
        switch_persona=switch_persona,
        original_persona=persona,
    )


def revealed_items(state: UserState) -> list[ProfileItem]:
    """Items of the current persona revealed so far (the ceiling for long-term profile scores)."""
    return [state.persona.items[index] for index in sorted(state.revealed)]


def reveal_budget(num_items: int, fraction: float = REVEAL_FRACTION) -> int:
    """Most new items one message may reveal: ceil(fraction * items), at least 1."""
    # round() first: 0.15 * 20 is 3.0000000000000004 in floating point, not 3.
    return max(1, math.ceil(round(fraction * num_items, 9)))


def sync_turn(state: UserState, history: Sequence[Message]) -> None:
    """The turn index is the number of messages this user has already sent in `history`, so a
    caller that writes the opening itself (or replays a history) keeps the index right."""
    state.turn = sum(1 for message in history if message.role == "user")


def has_assistant_message(history: Sequence[Message]) -> bool:
    return any(message.role == "assistant" for message in history)


def last_assistant_reply(history: Sequence[Message]) -> str:
    for message in reversed(history):
        if message.role == "assistant":
            return visible_reply_text(message.content)
    return ""


def item_key(item: ProfileItem) -> tuple[str, str]:
    return canonical_slot(item.slot), normalize_text(item.value)


def switch_if_due(state: UserState) -> bool:
    """Move to the switch persona when its turn has come; True on the turn it happens.

    Items the new persona shares with the old one stay revealed.
    """
    if state.switched or state.switch_turn is None or state.switch_persona is None:
        return False
    if state.turn < state.switch_turn:
        return False
    old_revealed = {item_key(state.persona.items[index]) for index in state.revealed}
    state.persona = state.switch_persona
    state.revealed = {index for index, item in enumerate(state.persona.items) if item_key(item) in old_revealed}
    state.switched = True
    return True


# --------------------------------------------------------------------------------------
# Scripted user
# --------------------------------------------------------------------------------------

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


class ScriptedUser:
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

    def start(
        self,
        persona: Persona,
        seed: int,
        switch_turn: int | None = None,
        switch_persona: Persona | None = None,
    ) -> UserState:
        return new_user_state(persona, seed, switch_turn, switch_persona)

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]:
        if len(states) != len(histories):
            raise ValueError(f"users.ScriptedUser.respond: {len(states)} states but {len(histories)} histories")
        return [self.reply(state, history) for state, history in zip(states, histories)]

    def reply(self, state: UserState, history: Sequence[Message]) -> str:
        """The next user message for one conversation (advances `state`)."""
        sync_turn(state, history)
        if not has_assistant_message(history):
            state.turn += 1
            return self.opening
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


# --------------------------------------------------------------------------------------
# LLM user
# --------------------------------------------------------------------------------------

CHANGE_NOTE_MARKER = "=== change note ==="
_ROLE_PREFIX_RE = re.compile(r"^\s*(user|me|you|human)\s*:\s*", re.IGNORECASE)


def split_roleplay_prompt(text: str) -> tuple[str, str]:
    """(role-play template, change note); the note follows CHANGE_NOTE_MARKER on its own line."""
    if CHANGE_NOTE_MARKER not in text:
        return text.strip(), ""
    template, note = text.split(CHANGE_NOTE_MARKER, 1)
    return template.strip(), note.strip()


def flipped_messages(system_prompt: str, history: Sequence[Message]) -> list[dict[str, str]]:
    """The simulator's view: its own messages are 'assistant', the policy's are 'user' and show
    only the <response> text."""
    messages = [{"role": "system", "content": system_prompt}]
    for message in history:
        if message.role == "user":
            messages.append({"role": "assistant", "content": message.content})
        else:
            messages.append({"role": "user", "content": visible_reply_text(message.content)})
    return messages


def clean_user_reply(text: str) -> str | None:
    """Strip a speaker label and wrapping quotes, keep at most MAX_SENTENCES; None if empty."""
    cleaned = _ROLE_PREFIX_RE.sub("", text.strip()).strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    kept = sentences(cleaned)[:MAX_SENTENCES]
    return " ".join(kept) if kept else None


class LLMUser:
    """An OpenAI-compatible model role-plays the persona; one request per conversation."""

    def __init__(
        self,
        client: LLMClient,
        prompt: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = 160,
        opening: str = OPENING_MESSAGE,
    ) -> None:
        text = prompt if prompt is not None else load_prompt("user_roleplay")
        self.template, self.change_note = split_roleplay_prompt(text)
        self.client = client
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.opening = opening
        self.failures = 0

    def start(
        self,
        persona: Persona,
        seed: int,
        switch_turn: int | None = None,
        switch_persona: Persona | None = None,
    ) -> UserState:
        return new_user_state(persona, seed, switch_turn, switch_persona)

    def system_prompt(self, state: UserState) -> str:
        text = fill_template(
            self.template,
            "user_roleplay",
            profile=state.persona.profile_text.strip(),
            personality=state.persona.personality_text.strip() or "(no particular notes)",
            change_note=self.change_note if state.switched else "",
        )
        return re.sub(r"\n{3,}", "\n\n", text)

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]:
        if len(states) != len(histories):
            raise ValueError(f"users.LLMUser.respond: {len(states)} states but {len(histories)} histories")
        results: list[str | None] = [None] * len(states)
        asked: list[int] = []
        batch: list[list[dict[str, str]]] = []
        for index, (state, history) in enumerate(zip(states, histories)):
            sync_turn(state, history)
            if not has_assistant_message(history):
                state.turn += 1
                results[index] = self.opening
                continue
            switch_if_due(state)
            asked.append(index)
            batch.append(flipped_messages(self.system_prompt(state), history))
        if not batch:
            return results
        options = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        outputs = await self.client.complete_many(batch, **options)
        for index, output in zip(asked, outputs):
            reply = None if isinstance(output, (LLMCallError, BaseException)) else clean_user_reply(output)
            if reply is None:
                self.failures += 1
                continue
            state = states[index]
            state.turn += 1
            # The model decides what to say, so "revealed" is read back from its words.
            state.revealed |= mentioned_item_indices(state.persona.items, reply)
            results[index] = reply
        return results


__all__ = [
    "LLMUser",
    "OPENING_MESSAGE",
    "ScriptedUser",
    "UserSimulator",
    "UserState",
    "clean_user_reply",
    "flipped_messages",
    "reveal_budget",
    "revealed_items",
]
