"""Slot profiles from an LLM: LLMProfileExtractor fills the JSON slot template for each pair.

Replies are validated, invalid ones are sent back with the reason and asked again, and valid
results are cached to JSONL so a pool is converted once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.profile import ProfileItem, items_from_json_object, strip_json_fence


class ProfileExtractionError(RuntimeError):
    """Some pairs could not be converted after every attempt (their reasons are listed)."""


def slot_template_problems(decoded: object) -> list[str]:
    """What is wrong with a decoded JSON slot template (empty when it is valid).

    Valid: an object with non-empty string keys whose values are a string, a list of strings,
    or null, and at least one item in all.
    """
    if not isinstance(decoded, dict):
        return [f"expected a JSON object, got a JSON {type(decoded).__name__}"]
    problems = []
    for key, value in decoded.items():
        if not isinstance(key, str) or not key.strip():
            problems.append(f"key {key!r} must be a non-empty string")
        elif not (value is None or isinstance(value, str)
                  or (isinstance(value, list) and all(isinstance(element, str) for element in value))):
            problems.append(f"value of {key!r} must be a string, a list of strings or null")
    if not problems and not items_from_json_object(decoded):
        problems.append("the object holds no profile items (every value is empty or unknown)")
    return problems


def parse_slot_template(text: str) -> tuple[dict | None, str]:
    """(decoded object, "") for a valid slot template reply, else (None, what is wrong)."""
    try:
        decoded = json.loads(strip_json_fence(text))
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    problems = slot_template_problems(decoded)
    return (None, "; ".join(problems)) if problems else (decoded, "")


class LLMProfileExtractor:
    """Converts (profile, personality) pairs to slot profiles with an OpenAI-compatible model.

    Each reply must be a valid JSON slot template; an invalid one is sent back with the reason
    and asked again, at most `max_attempts` times per pair. Valid results are appended to a JSONL
    cache keyed by a hash of the prompt and the pair, so a pool is converted once and a rerun
    after a failure only asks for the missing pairs.
    """

    def __init__(self, client: LLMClient, cache_path: str | Path, *, max_attempts: int = 3,
                 prompt_name: str = "profile_extraction") -> None:
        if max_attempts < 1:
            raise ValueError(f"LLMProfileExtractor: max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.cache_path = Path(cache_path)
        self.max_attempts = max_attempts
        self.system_prompt = load_prompt(prompt_name)
        self._cache = self._load_cache()

    def _key(self, profile_text: str, personality_text: str) -> str:
        payload = json.dumps([self.system_prompt, profile_text, personality_text], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _load_cache(self) -> dict[str, dict]:
        cache: dict[str, dict] = {}
        if not self.cache_path.exists():
            return cache
        with self.cache_path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key, profile = record["key"], record["profile"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"{self.cache_path}:{line_number}: expected a JSON object with 'key' and 'profile' "
                        f"(delete the line to convert that pair again)"
                    ) from None
                if slot_template_problems(profile):
                    raise ValueError(f"{self.cache_path}:{line_number}: cached profile is not a valid slot template")
                cache[key] = profile
        return cache

    def _store(self, key: str, profile: dict) -> None:
        self._cache[key] = profile
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "profile": profile}, ensure_ascii=False) + "\n")

    def _first_messages(self, profile_text: str, personality_text: str) -> list[dict[str, str]]:
        user = f"Profile:\n{profile_text}\n\nPersonality:\n{personality_text}"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    async def extract_many(self, pairs: Sequence[tuple[str, str]]) -> list[list[ProfileItem]]:
        """The slot profile of every pair, in order; cached pairs cost no request.

        Raises ProfileExtractionError naming the pairs still invalid after max_attempts (the
        valid ones are cached by then, so a rerun asks only for those).
        """
        keys = [self._key(profile, personality) for profile, personality in pairs]
        conversations = {
            key: self._first_messages(*pair) for key, pair in zip(keys, pairs) if key not in self._cache
        }
        last_problem: dict[str, str] = {}
        for _attempt in range(self.max_attempts):
            if not conversations:
                break
            pending = list(conversations)
            replies = await self.client.complete_many([conversations[key] for key in pending], json_mode=True)
            for key, reply in zip(pending, replies):
                if isinstance(reply, LLMCallError):
                    last_problem[key] = f"request failed: {reply}"
                    continue
                decoded, problem = parse_slot_template(reply)
                if decoded is not None:
                    self._store(key, decoded)
                    del conversations[key]
                    continue
                last_problem[key] = problem
                # Showing the model its reply and what was wrong also changes the request, so a
                # response cache cannot hand back the same invalid answer.
                conversations[key] = conversations[key] + [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"That reply is invalid: {problem}. Answer again with only "
                                                f"the JSON object, using the keys of the template."},
                ]
        if conversations:
            failed = [index for index, key in enumerate(keys) if key in conversations]
            details = "; ".join(f"pair {index}: {last_problem[keys[index]]}" for index in failed[:5])
            raise ProfileExtractionError(
                f"{len(conversations)} pair(s) not converted after {self.max_attempts} attempt(s): {details}"
            )
        return [items_from_json_object(self._cache[key]) for key in keys]
