"""The LLM judges: an OpenAI-compatible model counts profile matches or gives the 0/1 verdict.

Both judges share one base: the client, the prompt template (configs/prompts/<name>.txt), and
re-asking only the requests whose output held no usable \\boxed{} answer. Policy replies,
inferred profiles and the conversation are untrusted data and reach the model only inside
fences they cannot close.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.dialogue.judges.base import ProfilePairs, ResponseRequest
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.prompts import check_placeholders, fence, fill_template, last_boxed
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.profile import ProfileItem, format_profile
from rlpa_jax.dialogue.text import visible_reply_text

T = TypeVar("T")


def verdict_text(text: str) -> str | None:
    """The last \\boxed{} value, or the whole answer when it is one bare number: small models
    (Qwen2.5-Coder-0.5B as judge, docs/RESULTS.md) often answer just "1", which says the same."""
    bare = text.strip()
    return bare if re.fullmatch(r"\d+", bare) else last_boxed(text)


def parse_binary_verdict(text: str) -> int | None:
    value = verdict_text(text)
    return int(value) if value in ("0", "1") else None


def parse_match_count(text: str, max_matches: int) -> int | None:
    """An integer count from the last \\boxed{} (or a bare number); None (re-asked, then left
    unscored) when there is none or it is more than can match: clamping a wild count would hand
    out the maximum reward."""
    value = verdict_text(text)
    if value is None or not re.fullmatch(r"\d+", value) or int(value) > max_matches:
        return None
    return int(value)


def render_history(history: Sequence[Message], speakers: tuple[str, str] = ("User", "Assistant")) -> str:
    """One "Speaker: text" line per message (the assistant's only as its visible reply); `speakers`
    names the user and the assistant."""
    lines = []
    for message in history:
        speaker = speakers[0] if message.role == "user" else speakers[1]
        text = message.content if message.role == "user" else visible_reply_text(message.content)
        lines.append(f"{speaker}: {text}")
    return "\n".join(lines) if lines else "(no messages yet)"


@dataclass
class JudgeStats:
    requests: int = 0
    unparsable: int = 0  # outputs with no usable \boxed{} (retried)
    failed: int = 0  # samples left unscored (None)


class LLMJudge:
    """What both LLM judges share: the client, the prompt, re-asking on unparsable output, stats."""

    prompt_name = ""  # configs/prompts/<prompt_name>.txt: the default prompt, named in errors
    required_fields: set[str] = set()  # placeholders every prompt for this judge must have
    optional_fields: set[str] = set()  # placeholders a prompt may use

    def __init__(
        self,
        client: LLMClient,
        prompt: str | None = None,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
        prompt_name: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"judges.{type(self).__name__}: max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.prompt_name = prompt_name or self.prompt_name
        self.prompt = prompt if prompt is not None else load_prompt(self.prompt_name)
        self.fields = check_placeholders(self.prompt, self.prompt_name, self.required_fields | self.optional_fields,
                                         self.required_fields)
        self.max_attempts = max_attempts
        self.retry_temperature = retry_temperature
        self.stats = JudgeStats()
        self.last_problem: str | None = None  # why the latest unscored sample has no score

    def prompt_messages(self, attempt: int, **fields: str) -> list[dict]:
        """The prompt filled with `fields` as one user message; the attempt number makes a
        retried request differ from the one whose answer did not parse."""
        text = fill_template(self.prompt, self.prompt_name, **fields, attempt=str(attempt))
        return [{"role": "user", "content": text}]

    async def ask_until_parsed(
        self,
        build_messages: Sequence[Callable[[int], list[dict]]],
        parse: Sequence[Callable[[str], T | None]],
    ) -> list[T | None]:
        """Send every request concurrently; re-ask (new nonce, higher temperature) only those whose
        output did not parse, at most `max_attempts` times in all. Transport failures -> None."""
        results: list[T | None] = [None] * len(build_messages)
        pending = list(range(len(build_messages)))
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            options = {} if attempt == 1 else {"temperature": self.retry_temperature}
            batch = [build_messages[index](attempt) for index in pending]
            self.stats.requests += len(batch)
            outputs = await self.client.complete_many(batch, **options)
            still_pending = []
            for index, output in zip(pending, outputs):
                if isinstance(output, LLMCallError) or isinstance(output, BaseException):
                    self.last_problem = str(output)
                    continue
                value = parse[index](output)
                if value is None:
                    self.stats.unparsable += 1
                    self.last_problem = f"no usable verdict after {attempt} attempt(s); last answer: {output[:200]!r}"
                    still_pending.append(index)
                else:
                    results[index] = value
            pending = still_pending
        self.stats.failed += sum(1 for value in results if value is None)
        return results


class LLMProfileJudge(LLMJudge):
    """Counts matches with an LLM; the inferred profile is fenced untrusted data."""

    prompt_name = "profile_judge"
    required_fields = {"inferred_profile", "true_profile", "max_matches", "attempt"}

    def build_messages(
        self, inferred: Sequence[ProfileItem], true: Sequence[ProfileItem], attempt: int
    ) -> list[dict]:
        return self.prompt_messages(
            attempt,
            inferred_profile=fence("INFERRED_PROFILE", format_profile(inferred)),
            true_profile=fence("TRUE_PROFILE", format_profile(true)),
            max_matches=str(min(len(inferred), len(true))),
        )

    async def count_matches(self, pairs: ProfilePairs) -> list[int | None]:
        # An empty side has 0 matches by definition: no request for it.
        results: list[int | None] = [0] * len(pairs)
        asked = [index for index, (inferred, true) in enumerate(pairs) if inferred and true]
        builders = [
            (lambda attempt, pair=pairs[index]: self.build_messages(pair[0], pair[1], attempt)) for index in asked
        ]
        parsers = [
            (lambda text, limit=min(len(pairs[index][0]), len(pairs[index][1])): parse_match_count(text, limit))
            for index in asked
        ]
        answers = await self.ask_until_parsed(builders, parsers)
        for index, answer in zip(asked, answers):
            results[index] = answer
        return results


class LLMResponseJudge(LLMJudge):
    """0/1 verdict from an LLM; the reply and the conversation are fenced untrusted data."""

    prompt_name = "response_judge"
    required_fields = {"user_profile", "conversation", "reply", "attempt"}
    # With {last_message} the prompt is the paper's role-play: the judge is the user, so the
    # user's newest message stands apart and the conversation is written from the user's side.
    optional_fields = {"last_message"}

    def __init__(self, client: LLMClient, prompt: str | None = None, max_attempts: int = 3,
                 retry_temperature: float = 0.7, max_history_messages: int = 20,
                 prompt_name: str | None = None) -> None:
        super().__init__(client, prompt, max_attempts, retry_temperature, prompt_name)
        self.max_history_messages = max_history_messages

    def build_messages(self, request: ResponseRequest, attempt: int) -> list[dict]:
        history = list(request.history)[-self.max_history_messages :]
        profile = request.persona.profile_text
        if request.persona.personality_text:
            profile = f"{profile}\n{request.persona.personality_text}"
        fields = dict(user_profile=fence("USER_PROFILE", profile), reply=fence("REPLY", request.reply))
        if "last_message" in self.fields:
            last = history.pop().content if history and history[-1].role == "user" else ""
            fields["last_message"] = fence("LAST_MESSAGE", last)
            fields["conversation"] = fence("CONVERSATION", render_history(history, speakers=("You", "Them")))
        else:
            fields["conversation"] = fence("CONVERSATION", render_history(history))
        return self.prompt_messages(attempt, **fields)

    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        builders = [(lambda attempt, request=request: self.build_messages(request, attempt)) for request in requests]
        parsers = [parse_binary_verdict] * len(requests)
        return await self.ask_until_parsed(builders, parsers)
