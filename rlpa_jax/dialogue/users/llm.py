"""The LLM user: an OpenAI-compatible model role-plays the persona.

The prompt is configs/prompts/<user.prompt>.txt (plus its change note once the persona has
switched), and its placeholders decide how the conversation reaches the model:
- without {conversation} (user_roleplay): the prompt is the system message and the conversation
  follows as chat messages with roles flipped;
- with {conversation} (paper_user, as in the paper's code): one user message holds everything, the
  conversation written out from the persona's side ("You:" / "Them:") and fenced, and, with
  {last_message}, the assistant's newest message apart from it.
Either way the model sees only the policy's <response> text, and what the user revealed is read
back from the model's words.
"""

from __future__ import annotations

import re
from typing import Sequence

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.prompts import check_placeholders, fence, fill_template
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.matching import mentioned_item_indices
from rlpa_jax.dialogue.profile import format_profile
from rlpa_jax.dialogue.text import sentences, visible_reply_text
from rlpa_jax.dialogue.users.base import MAX_SENTENCES, OPENING_MESSAGE, StatefulUser, UserState, switch_if_due

CHANGE_NOTE_MARKER = "=== change note ==="
# What a role-play prompt may use: the persona as paragraphs ({profile}, {personality}) or as slot
# lines ({profile_items}, what the paper's simulator gets), the change note, and the conversation.
USER_PROMPT_FIELDS = {"profile", "personality", "profile_items", "change_note", "conversation", "last_message"}
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


def persona_side_transcript(history: Sequence[Message]) -> str:
    """The conversation as the persona remembers it: its own messages as "You:", the policy's
    (only the <response> text) as "Them:"."""
    lines = [f"{'You' if m.role == 'user' else 'Them'}: "
             f"{m.content if m.role == 'user' else visible_reply_text(m.content)}" for m in history]
    return "\n".join(lines) if lines else "(nothing yet)"


def clean_user_reply(text: str) -> str | None:
    """Strip a speaker label and wrapping quotes, keep at most MAX_SENTENCES; None if empty."""
    cleaned = _ROLE_PREFIX_RE.sub("", text.strip()).strip()
    if len(cleaned) >= 2 and cleaned[0] == cleaned[-1] and cleaned[0] in "\"'":
        cleaned = cleaned[1:-1].strip()
    kept = sentences(cleaned)[:MAX_SENTENCES]
    return " ".join(kept) if kept else None


class LLMUser(StatefulUser):
    """An OpenAI-compatible model role-plays the persona; one request per conversation."""

    def __init__(
        self,
        client: LLMClient,
        prompt: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = 160,
        opening: str = OPENING_MESSAGE,
        prompt_name: str = "user_roleplay",
    ) -> None:
        text = prompt if prompt is not None else load_prompt(prompt_name)
        self.template, self.change_note = split_roleplay_prompt(text)
        self.prompt_name = prompt_name
        self.fields = check_placeholders(self.template, prompt_name, USER_PROMPT_FIELDS, set())
        if not self.fields & {"profile", "profile_items"}:
            raise ValueError(f"configs/prompts/{prompt_name}.txt needs {{profile}} or {{profile_items}}: "
                             "the model must know whom it plays")
        if self.change_note and "change_note" not in self.fields:
            raise ValueError(f"configs/prompts/{prompt_name}.txt has a change note but no {{change_note}} to put it in")
        if "last_message" in self.fields and "conversation" not in self.fields:
            raise ValueError(f"configs/prompts/{prompt_name}.txt has {{last_message}} without {{conversation}}")
        self.client = client
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.opening = opening
        self.failures = 0

    def system_prompt(self, state: UserState, history: Sequence[Message] = ()) -> str:
        """The filled prompt; `history` fills {conversation} and {last_message} when it has them."""
        persona = state.persona
        earlier = list(history)
        last = ""
        if "last_message" in self.fields and earlier and earlier[-1].role == "assistant":
            last = visible_reply_text(earlier.pop().content)
        values = {
            "profile": persona.profile_text.strip(),
            "personality": persona.personality_text.strip() or "(no particular notes)",
            "profile_items": format_profile(persona.items),
            "change_note": self.change_note if state.switched else "",
            "conversation": fence("CONVERSATION", persona_side_transcript(earlier)),
            "last_message": fence("THEIR_MESSAGE", last),
        }
        text = fill_template(self.template, self.prompt_name, **{k: v for k, v in values.items() if k in self.fields})
        return re.sub(r"\n{3,}", "\n\n", text)

    def request_messages(self, state: UserState, history: Sequence[Message]) -> list[dict[str, str]]:
        """One user message holding everything, or the system prompt plus the flipped chat."""
        if "conversation" in self.fields:
            return [{"role": "user", "content": self.system_prompt(state, history)}]
        return flipped_messages(self.system_prompt(state), history)

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]:
        self.check_batch(states, histories)
        results: list[str | None] = [None] * len(states)
        asked: list[int] = []
        batch: list[list[dict[str, str]]] = []
        for index, (state, history) in enumerate(zip(states, histories)):
            opening = self.opening_if_cold_start(state, history)
            if opening is not None:
                results[index] = opening
                continue
            switch_if_due(state)
            asked.append(index)
            batch.append(self.request_messages(state, history))
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
