"""The LLM client's on-disk answer cache: one JSON line per answer, keyed by everything that decides
the answer (endpoint, model, messages, sampling settings), so a rerun never pays for an answer twice.

Several processes (a multi-host run) never share a file they write: process k of several appends to
`<stem>.process<k><suffix>` next to the configured `cache_path` (one writer per file, so no lock
across hosts or network file systems is needed), and every process reads the configured file and
all its `.process*` siblings at start, so answers cached by any earlier run, of one process or of
several, are reused. A sibling's last line may be torn while its writer runs; it is skipped quietly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlpa_jax.runtime import multihost

logger = logging.getLogger("rlpa_jax.dialogue.llm.client")  # one logger for the client and its parts


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

    def __init__(self, path: str | os.PathLike[str], process: int | None = None, processes: int | None = None) -> None:
        self.configured_path = Path(path)
        process = multihost.process_index() if process is None else process
        processes = multihost.process_count() if processes is None else processes
        self.path = process_cache_path(self.configured_path, process, processes)  # the one file this process writes
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._starts_mid_line = False
        for other in cache_files(self.configured_path):
            if other != self.path:
                self._load(other, own=False)
        self._load(self.path, own=True)

    def _load(self, path: Path, own: bool) -> None:
        if not path.exists():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        if own:
            self._starts_mid_line = bool(text) and not text.endswith("\n")
        lines = text.splitlines()
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            entry = parse_cache_line(line)
            if entry is None:
                # Another process may be writing its last line right now.
                torn = not own and line_number == len(lines) and not text.endswith("\n")
                (logger.debug if torn else logger.warning)(
                    "skipping corrupt LLM cache line %s:%d (expected a JSON object with string 'key' and 'content')",
                    path, line_number,
                )
                continue
            key, content = entry
            self._entries[key] = content
        logger.debug("loaded %d cached LLM answers from %s", len(self._entries), path)

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


def process_cache_path(path: Path, process: int, processes: int) -> Path:
    """The file process `process` of `processes` appends to: `path` itself for a single process."""
    return path if processes == 1 else path.with_name(f"{path.stem}.process{process}{path.suffix}")


def cache_files(path: Path) -> list[Path]:
    """The configured cache file and every per-process file written next to it, in a fixed order."""
    siblings = sorted(path.parent.glob(f"{path.stem}.process*{path.suffix}")) if path.parent.is_dir() else []
    return [path, *[s for s in siblings if s.name[len(path.stem) + len(".process"):-len(path.suffix) or None].isdigit()]]


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
