"""The LLM client's on-disk answer cache: one JSON line per answer, keyed by everything that decides
the answer (endpoint, model, messages, sampling settings), so a rerun never pays for an answer twice."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger("rlpa_jax.dialogue.llm")  # one logger for the client and its parts


def cache_key(base_url: str, model: str, messages: Sequence[Mapping[str, Any]], temperature: float,
              max_tokens: int, json_mode: bool) -> str:
    """sha256 over everything that decides the answer (the endpoint too: two servers may serve one
    model name differently); float() so 0 and 0.0 share a key."""
    payload = {
        "base_url": base_url,
        "model": model,
        "messages": [dict(message) for message in messages],
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "json_mode": bool(json_mode),
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only JSONL of {"key", "content"} lines, read once at start.

    Writes go through one lock (threads and event loops alike), so concurrent
    coroutines never interleave lines. A torn or corrupt line is skipped with a
    warning naming the file and line, and later writes start on a fresh line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._starts_mid_line = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        self._starts_mid_line = bool(text) and not text.endswith("\n")
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            entry = parse_cache_line(line)
            if entry is None:
                logger.warning(
                    "skipping corrupt LLM cache line %s:%d (expected a JSON object with string 'key' and 'content')",
                    self.path, line_number,
                )
                continue
            key, content = entry
            self._entries[key] = content
        logger.debug("loaded %d cached LLM answers from %s", len(self._entries), self.path)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def put(self, key: str, content: str) -> None:
        line = json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._entries.get(key) == content:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as cache_file:
                if self._starts_mid_line:
                    cache_file.write("\n")
                    self._starts_mid_line = False
                cache_file.write(line)
            self._entries[key] = content


def parse_cache_line(line: str) -> tuple[str, str] | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    key, content = entry.get("key"), entry.get("content")
    if not isinstance(key, str) or not isinstance(content, str):
        return None
    return key, content
