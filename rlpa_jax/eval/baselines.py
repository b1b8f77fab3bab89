"""Prompting baselines for the ALOE comparison: wrappers that change how a base policy is asked.

Each wrapper is itself a Policy (name + batched `respond`) around a base policy, and only
changes what the base is shown:

- Base:        the base policy unchanged.
- Reminder:    the system prompt also reminds the model, every turn, to use what the user has
               revealed about themselves (configs/prompts/baseline_reminder.txt).
- SelfCritic:  two batched calls per turn: the base drafts a reply, then a critique-and-revise
               call sees the transcript and the draft and writes "Revised reply: ..."; the user
               sees the revision (configs/prompts/baseline_self_critic.txt).
- FewShotCoT:  the system prompt holds worked examples that first write "Thoughts: ..." about the
               user, then "Reply: ..."; the user sees only the reply (baseline_cot.txt).
- RAG:         the history is cut to the last `keep_exchanges` exchanges plus the new user
               message; the `top_k` older exchanges most similar to that message (TF-IDF cosine,
               numpy) go into the system prompt as relevant earlier context (baseline_rag.txt).

BASELINES, at the bottom, maps each launch/eval.py --baseline name to its builder, so a new
baseline is a wrapper and one entry there.

The baselines are meant for plain chat policies (two_part=False), where the prompted model
replies in free text. How a wrapper reaches the base's system prompt is the hook below.

Hook (what a base policy must offer, checked when a wrapper is built):
    system_prompt: str                                    the base's own system prompt
    with_system_prompt(text) -> Policy                    the same policy under another prompt
and optionally, to keep per-conversation prompts (RAG) in one batch:
    async respond_with_system_prompts(histories, system_prompts) -> list[PolicyTurn]
Without the optional method, conversations are grouped by prompt and each group goes through
`with_system_prompt(prompt).respond(group)`, the groups running concurrently.

With several processes (eval/protocol.py) each process's wrapper sees only its own conversations
and calls its base exactly as a one-process run would (an empty batch included); the base decides
who plays which (`share`), which the protocol finds through the wrappers' `base`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.eval.policies import Policy, PolicyTurn
from rlpa_jax.eval.retrieval import cosine_scores, top_k_indices

# Markers the prompt files tell the model to use; each starts a line of the model's output.
COT_THOUGHTS_MARKER = "Thoughts:"
COT_REPLY_MARKER = "Reply:"
CRITIQUE_MARKER = "Critique:"
REVISION_MARKER = "Revised reply:"

# Section labels of the critique request; baseline_self_critic.txt describes these two parts.
CONVERSATION_LABEL = "[Conversation so far]"
DRAFT_LABEL = "[Draft reply to the user's last message]"
# How SelfCritic's PolicyTurn.text keeps both raw outputs for inspection.
RAW_DRAFT_LABEL = "[draft]"
RAW_REVISION_LABEL = "[revision]"

RAG_PLACEHOLDER = "{retrieved_exchanges}"



# ---------------------------------------------------------------------------
# The hook into base policies


@runtime_checkable
class PromptablePolicy(Protocol):
    """A Policy whose system prompt a wrapper can read and replace."""

    name: str
    system_prompt: str

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]: ...

    def with_system_prompt(self, system_prompt: str) -> Policy: ...


def require_promptable(base: object, wrapper: str) -> PromptablePolicy:
    """`base` if it offers the hook, else a TypeError naming what is missing."""
    missing = [
        attribute
        for attribute, ok in (
            ("name", isinstance(getattr(base, "name", None), str)),
            ("system_prompt", isinstance(getattr(base, "system_prompt", None), str)),
            ("respond", callable(getattr(base, "respond", None))),
            ("with_system_prompt", callable(getattr(base, "with_system_prompt", None))),
        )
        if not ok
    ]
    if missing:
        raise TypeError(
            f"{wrapper} needs a base policy with name: str, system_prompt: str, "
            f"async respond(histories) and with_system_prompt(text) -> Policy "
            f"(see rlpa_jax/eval/baselines.py); {type(base).__name__} lacks {', '.join(missing)}"
        )
    return base  # type: ignore[return-value]


async def respond_with_system_prompts(
    base: PromptablePolicy, histories: Sequence[Sequence[Message]], system_prompts: Sequence[str]
) -> list[PolicyTurn]:
    """One turn per conversation, conversation i answered under system_prompts[i]."""
    if len(histories) != len(system_prompts):
        raise ValueError(f"{len(histories)} histories but {len(system_prompts)} system prompts; need one each")
    batched = getattr(base, "respond_with_system_prompts", None)
    if callable(batched):
        # Called with no conversations too: with several processes our model's sampler calls are
        # collectives that every process makes (eval/protocol.py), whatever its share holds.
        return list(await batched(histories, system_prompts))
    if not histories:
        return []
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(system_prompts):
        groups.setdefault(prompt, []).append(index)
    answers = await asyncio.gather(
        *(base.with_system_prompt(prompt).respond([histories[i] for i in indices])
          for prompt, indices in groups.items())
    )
    turns: list[PolicyTurn | None] = [None] * len(histories)
    for indices, group_turns in zip(groups.values(), answers):
        if len(group_turns) != len(indices):
            raise ValueError(f"base policy {base.name!r} answered {len(group_turns)} of {len(indices)} conversations")
        for index, turn in zip(indices, group_turns):
            turns[index] = turn
    return turns  # type: ignore[return-value]


def extend_system_prompt(system_prompt: str, addition: str) -> str:
    """The base prompt, a blank line, then the addition (either may be empty)."""
    return "\n\n".join(part for part in (system_prompt.strip(), addition.strip()) if part)


# ---------------------------------------------------------------------------
# Reading marked model output


def _line_start_positions(text: str, marker: str) -> list[re.Match[str]]:
    return list(re.finditer(rf"(?im)^[ \t]*{re.escape(marker)}", text))


def reply_after_marker(text: str, reply_marker: str, preamble_marker: str) -> str:
    """The user-facing part of a "<preamble_marker> ... <reply_marker> ..." answer.

    With a reply marker at the start of a line: everything after the first one (a model that
    runs on past its reply keeps the reply it wrote first). Without it, a
    leading preamble (text opening with preamble_marker) up to the first blank line is dropped,
    so reasoning never reaches the user; otherwise the whole text is the reply.
    """
    matches = _line_start_positions(text, reply_marker)
    if matches:
        return text[matches[0].end():].strip()
    stripped = text.strip()
    if stripped.lower().startswith(preamble_marker.lower()):
        _, _, rest = stripped.partition("\n\n")
        return rest.strip()
    return stripped


def replace_response(turn: PolicyTurn, response: str, text: str | None = None) -> PolicyTurn:
    """The turn with another visible reply (and raw text); profile and error are kept."""
    return dataclasses.replace(turn, response=response, text=turn.text if text is None else text)


# ---------------------------------------------------------------------------
# Conversation structure


@dataclass(frozen=True)
class Exchange:
    """A user message and the assistant reply that followed it."""

    number: int  # 1-based position among the conversation's exchanges
    start: int  # index of the user message in the history
    user: str
    assistant: str


def exchanges_of(history: Sequence[Message]) -> list[Exchange]:
    """Every user message directly answered by an assistant message, in order."""
    found: list[Exchange] = []
    for index in range(len(history) - 1):
        if history[index].role == "user" and history[index + 1].role == "assistant":
            found.append(Exchange(len(found) + 1, index, history[index].content, history[index + 1].content))
    return found


def require_user_last(history: Sequence[Message], conversation: int) -> str:
    """The message being answered; a history must end with the user's turn."""
    if not history or history[-1].role != "user":
        last = history[-1].role if history else "nothing"
        raise ValueError(
            f"histories[{conversation}] ends with {last}; a policy answers a history ending with a user message")
    return history[-1].content


def recent_history(history: Sequence[Message], exchanges: Sequence[Exchange], keep_exchanges: int) -> list[Message]:
    """The last keep_exchanges exchanges and the current user message."""
    if keep_exchanges <= 0 or not exchanges:
        return list(history[-1:])
    kept = exchanges[-keep_exchanges:]
    return list(history[kept[0].start:])


def transcript(history: Sequence[Message]) -> str:
    """The conversation as "User: ..." / "Assistant: ..." lines (visible replies only)."""
    speaker = {"user": "User", "assistant": "Assistant"}
    return "\n".join(f"{speaker.get(message.role, message.role)}: {message.content.strip()}" for message in history)


def format_exchange(exchange: Exchange) -> str:
    return f"[Exchange {exchange.number}]\nUser: {exchange.user.strip()}\nAssistant: {exchange.assistant.strip()}"


def retrieve(candidates: Sequence[Exchange], query: str, k: int) -> list[Exchange]:
    """The k candidates most similar to the query, in conversation order."""
    scores = cosine_scores([f"{exchange.user}\n{exchange.assistant}" for exchange in candidates], query)
    return [candidates[i] for i in sorted(top_k_indices(scores, k))]


# ---------------------------------------------------------------------------
# The wrappers


class Reminder:
    """The base policy with a standing reminder to use the user's revealed details."""

    def __init__(self, base: Policy, reminder: str | None = None) -> None:
        self.base = require_promptable(base, "Reminder")
        self.reminder = load_prompt("baseline_reminder") if reminder is None else reminder
        self.system_prompt = extend_system_prompt(self.base.system_prompt, self.reminder)
        self._reminded = self.base.with_system_prompt(self.system_prompt)
        self.name = f"reminder/{self.base.name}"

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        return list(await self._reminded.respond(histories))


class SelfCritic:
    """Draft with the base, then one critique-and-revise call; the user sees the revision.

    Both passes are batched over conversations, so a turn costs two batched calls. A revision
    with no usable reply (empty after its marker) falls back to the draft, which is a valid reply.
    PolicyTurn.text keeps both raw outputs, labelled, for inspection. A failed call (a turn with
    `error`) leaves the turn failed, so the protocol leaves it unscored: a failed draft is not
    sent for revision, and a failed revision fails the turn.
    """

    def __init__(self, base: Policy, critic_prompt: str | None = None) -> None:
        self.base = require_promptable(base, "SelfCritic")
        self.critic_prompt = load_prompt("baseline_self_critic") if critic_prompt is None else critic_prompt
        self.name = f"self_critic/{self.base.name}"

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        for index, history in enumerate(histories):
            require_user_last(history, index)
        drafts = list(await self.base.respond(histories))
        to_revise = [index for index, draft in enumerate(drafts) if draft.error is None]
        requests = [[Message(role="user", content=critique_request(histories[index], drafts[index].response))]
                    for index in to_revise]
        revisions = await respond_with_system_prompts(self.base, requests, [self.critic_prompt] * len(requests))
        turns = list(drafts)
        for index, revision in zip(to_revise, revisions):
            turns[index] = revised_turn(drafts[index], revision)
        return turns


def critique_request(history: Sequence[Message], draft: str) -> str:
    """The critique pass's user message: the whole transcript and the draft, labelled."""
    return f"{CONVERSATION_LABEL}\n{transcript(history)}\n\n{DRAFT_LABEL}\n{draft.strip()}"


def revised_turn(draft: PolicyTurn, revision: PolicyTurn) -> PolicyTurn:
    """The final turn: the revision's reply (the draft's if empty); both raw outputs in text."""
    text = f"{RAW_DRAFT_LABEL}\n{draft.text}\n\n{RAW_REVISION_LABEL}\n{revision.text}"
    if revision.error is not None:
        error = f"self-critic revision failed: {revision.error}"
        return dataclasses.replace(draft, text=text, response="", error=error)
    revised = reply_after_marker(revision.response, REVISION_MARKER, CRITIQUE_MARKER)
    return replace_response(draft, revised or draft.response, text=text)


class FewShotCoT:
    """Few-shot examples that reason about the user before replying; the reasoning is stripped."""

    def __init__(self, base: Policy, cot_prompt: str | None = None) -> None:
        self.base = require_promptable(base, "FewShotCoT")
        self.cot_prompt = load_prompt("baseline_cot") if cot_prompt is None else cot_prompt
        self.system_prompt = extend_system_prompt(self.base.system_prompt, self.cot_prompt)
        self._prompted = self.base.with_system_prompt(self.system_prompt)
        self.name = f"cot(fewshot)/{self.base.name}"

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        turns = await self._prompted.respond(histories)
        return [
            replace_response(turn, reply_after_marker(turn.response, COT_REPLY_MARKER, COT_THOUGHTS_MARKER))
            for turn in turns
        ]


class RAG:
    """Recent history only, plus the top-k older exchanges most similar to the new message.

    Candidates are the exchanges older than the kept window (the kept ones are already in view),
    so with keep_exchanges=2 the model sees earlier turns only through retrieval.
    """

    def __init__(self, base: Policy, top_k: int = 5, keep_exchanges: int = 2, rag_prompt: str | None = None) -> None:
        if top_k < 1 or keep_exchanges < 0:
            raise ValueError(
                f"RAG needs top_k >= 1 and keep_exchanges >= 0; got top_k={top_k}, keep_exchanges={keep_exchanges}")
        self.base = require_promptable(base, "RAG")
        self.top_k = top_k
        self.keep_exchanges = keep_exchanges
        self.rag_prompt = load_prompt("baseline_rag") if rag_prompt is None else rag_prompt
        if RAG_PLACEHOLDER not in self.rag_prompt:
            raise ValueError(f"the RAG prompt (configs/prompts/baseline_rag.txt) must contain {RAG_PLACEHOLDER}")
        self.name = f"rag(top{top_k})/{self.base.name}"

    def prepare(self, history: Sequence[Message], conversation: int = 0) -> tuple[str, list[Message], list[Exchange]]:
        """(system prompt, truncated history, retrieved exchanges) for one conversation."""
        query = require_user_last(history, conversation)
        exchanges = exchanges_of(history)
        older = exchanges[: len(exchanges) - self.keep_exchanges] if self.keep_exchanges else exchanges
        retrieved = retrieve(older, query, self.top_k)
        return self.system_prompt_for(retrieved), recent_history(history, exchanges, self.keep_exchanges), retrieved

    def system_prompt_for(self, retrieved: Sequence[Exchange]) -> str:
        if not retrieved:
            return self.base.system_prompt
        context = "\n\n".join(format_exchange(exchange) for exchange in retrieved)
        return extend_system_prompt(self.base.system_prompt, self.rag_prompt.replace(RAG_PLACEHOLDER, context))

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        prepared = [self.prepare(history, index) for index, history in enumerate(histories)]
        return await respond_with_system_prompts(
            self.base, [history for _, history, _ in prepared], [prompt for prompt, _, _ in prepared]
        )


def unchanged(base: Policy, **options: object) -> Policy:
    """The "base" baseline: the base policy itself."""
    if options:
        raise ValueError(f"baseline 'base' takes no options; got {sorted(options)}")
    return base


# Baseline name (launch/eval.py --baseline) -> builder(base policy, **options) -> Policy.
BASELINES: dict[str, Callable[..., Policy]] = {
    "base": unchanged,
    "reminder": Reminder,
    "self_critic": SelfCritic,
    "cot": FewShotCoT,
    "rag": RAG,
}


def make_baseline(kind: str, base: Policy, **kw: object) -> Policy:
    """The named prompting baseline around `base`; kw go to the wrapper (e.g. rag: top_k=5)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINES)} "
                         "(BASELINES in rlpa_jax/eval/baselines.py)")
    return BASELINES[kind](base, **kw)
