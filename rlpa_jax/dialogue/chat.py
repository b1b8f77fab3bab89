"""The policy's turn format and chat prompts.

Every policy turn must be exactly

    <profile>
    - Slot: value
    </profile>

    <response>
    reply text
    </response>

parse_turn is strict about that shape (a malformed turn scores 0), while the profile block's
content is read leniently by parse_profile. render_messages builds the chat prompt for the next
turn; like the paper's code, only the most recent assistant message keeps its profile block so
the prompt does not grow with stale profiles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlpa_jax.config.options import PROMPTS_DIR
from rlpa_jax.dialogue.profile import ProfileItem, format_profile, parse_profile
from rlpa_jax.model.tokenizer import chat_token_ids

PROFILE_OPEN, PROFILE_CLOSE = "<profile>", "</profile>"
_TAGS = (PROFILE_OPEN, PROFILE_CLOSE, "<response>", "</response>")
# What a well-formed turn matches (with re.DOTALL), beside each tag appearing exactly once.
TURN_PATTERN = r"\A\s*<profile>(?P<profile>.*?)</profile>\s*<response>(?P<response>.*?)</response>\s*\Z"
_TURN = re.compile(TURN_PATTERN, re.DOTALL)
_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ParsedTurn:
    profile: list[ProfileItem] | None  # None when malformed
    response: str | None  # None when malformed
    well_formed: bool


MALFORMED = ParsedTurn(profile=None, response=None, well_formed=False)


def parse_turn(text: str) -> ParsedTurn:
    """Split a policy turn into profile items and reply; anything off the exact shape is malformed.
    Training reads every sampled turn with it; a user of an exported policy reads its decoded
    output with it too (README "Use the exported policy").

    Malformed: a missing or unclosed tag, a duplicated block, the response before the profile,
    any text outside the two blocks, or an empty response. An empty profile block is fine
    (profile=[]): early in a dialogue there may be nothing to infer yet.
    """
    if any(text.count(tag) != 1 for tag in _TAGS):
        return MALFORMED
    match = _TURN.match(text)
    if match is None:
        return MALFORMED
    response = match.group("response").strip()
    if not response:
        return MALFORMED
    return ParsedTurn(profile=parse_profile(match.group("profile")), response=response, well_formed=True)


def format_profile_block(profile_text: str) -> str:
    body = profile_text.strip()
    return f"<profile>\n{body}\n</profile>" if body else "<profile>\n</profile>"


def format_turn(profile: Sequence[ProfileItem], response: str) -> str:
    """The canonical turn text; parse_turn reads it back to the same profile and reply."""
    return f"{format_profile_block(format_profile(profile))}\n\n<response>\n{response.strip()}\n</response>"


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str  # for the assistant: the reply only
    profile_text: str | None = None  # assistant only: the profile block's content


def assistant_message(profile: Sequence[ProfileItem], response: str) -> Message:
    """The history entry for a policy turn (profile kept so the latest one can be shown)."""
    return Message(role="assistant", content=response.strip(), profile_text=format_profile(profile))


def _assistant_full_text(message: Message) -> str:
    if message.profile_text is None:
        return message.content
    return f"{format_profile_block(message.profile_text)}\n\n<response>\n{message.content.strip()}\n</response>"


def render_messages(system_prompt: str, history: Sequence[Message]) -> list[dict[str, str]]:
    """OpenAI/HF chat messages: the system prompt, then the history.

    Assistant messages show only their reply, except the most recent one, which shows its full
    <profile>/<response> text so the policy can update its latest profile instead of
    re-deriving it (an assistant message without profile_text shows its reply either way).
    """
    for index, message in enumerate(history):
        if message.role not in _ROLES:
            raise ValueError(f"history[{index}].role is {message.role!r}; expected one of {_ROLES}")
    assistant_indices = [i for i, message in enumerate(history) if message.role == "assistant"]
    latest_assistant = assistant_indices[-1] if assistant_indices else -1
    rendered = [{"role": "system", "content": system_prompt}]
    for index, message in enumerate(history):
        content = _assistant_full_text(message) if index == latest_assistant else message.content
        rendered.append({"role": message.role, "content": content})
    return rendered


def available_prompts() -> list[str]:
    return sorted(path.stem for path in PROMPTS_DIR.glob("*.txt"))


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def strip_prompt_comments(text: str, source: str) -> str:
    """`text` without its {# ... #} comments (they may span lines; prompt files open with one that
    says where the prompt comes from), surrounding whitespace stripped. A comment also takes the
    line break right after it. An unclosed {# or a stray #} fails naming `source` and the line, so
    a typo cannot leak a comment to a model or cut a prompt short."""
    kept, position = [], 0
    while True:
        start = text.find("{#", position)
        stray = text.find("#}", position, start if start >= 0 else len(text))
        if stray >= 0:
            raise ValueError(f"{source}: line {_line_of(text, stray)} has a #}} without an opening {{#")
        if start < 0:
            kept.append(text[position:])
            return "".join(kept).strip()
        end = text.find("#}", start + 2)
        if end < 0:
            raise ValueError(f"{source}: line {_line_of(text, start)} opens a {{# comment that is never closed with #}}")
        kept.append(text[position:start])
        position = end + 2 + (text.startswith("\n", end + 2))


def load_prompt(name: str) -> str:
    """The text of configs/prompts/<name>.txt without its {# ... #} comments, stripped."""
    path = PROMPTS_DIR / f"{name}.txt"
    if "/" in name or "\\" in name or not path.is_file():
        raise FileNotFoundError(
            f"prompt {name!r} not found: expected the file {path}; "
            f"prompts in {PROMPTS_DIR}: {', '.join(available_prompts()) or '(none)'}"
        )
    return strip_prompt_comments(path.read_text(encoding="utf-8"), str(path))


def drop_oldest_exchange(history: Sequence[Message]) -> list[Message]:
    """`history` without its first exchange: up to (not including) the next user message."""
    for index in range(1, len(history)):
        if history[index].role == "user":
            return list(history[index:])
    return list(history)


def prompt_token_ids(tokenizer, system_prompt: str, history: Sequence[Message], max_tokens: int | None = None) -> list[int]:
    """The policy prompt for the turn after `history` (chat template + generation prompt).

    While it is longer than `max_tokens`, the oldest exchanges are dropped; the system prompt and
    the last user message always stay, so the result can still exceed `max_tokens`.
    """
    history = list(history)
    while True:
        ids = chat_token_ids(tokenizer, render_messages(system_prompt, history), add_generation_prompt=True)
        shorter = drop_oldest_exchange(history)
        if max_tokens is None or len(ids) <= max_tokens or len(shorter) == len(history):
            return ids
        history = shorter
