"""The LLM client's on-disk answer cache: one JSON line per answer, keyed by everything that decides
the answer (endpoint, model, messages, sampling settings), so a rerun never pays for an answer twice.

Several processes (a multi-host run) never share a file they write: process k of several appends to
`<stem>.process<k><suffix>` next to the configured `cache_path` (one writer per file, so no lock
across hosts or network file systems is needed), and every process reads the configured file and
all its `.process*` siblings at start, so answers cached by any earlier run, of one process or of
several, are reused. A sibling's last line may be torn while its writer runs; it is skipped quietly.

Opening reads the files line by line into an index of 16 bytes per answer (no text is kept) and
answers are read back from the file when asked for, so memory does not grow with the answers'
size: docs/PERF.md measures 340k answers.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

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


# A location packs the line's byte offset and the file's number: up to 2**20 files of 16 TiB each.
FILE_BITS = 20
FILE_NUMBERS = 1 << FILE_BITS
FILE_MASK = FILE_NUMBERS - 1
RECENT_LIMIT = 1 << 16  # answers put before they join the sorted arrays (~100 B each in the dict)


class ResponseCache:
    """Append-only JSONL of {"key", "content"} lines, indexed once at start, answers read on demand.

    At the paper's scale a file holds ~340k answers per episode, so the object keeps no text: an
    index from each key's 64-bit fingerprint to where its line starts (file, byte offset), 16 bytes
    per answer in sorted arrays plus a dict of the answers put since (merged into the arrays as it
    grows). `get` reads the line back and checks its key, so two keys sharing a fingerprint cost a
    cache miss (a new request), never a wrong answer. Later lines win over earlier ones of a key.

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
        self._starts_mid_line = False
        # Files this cache reads, its own last; an index location names one by its position here.
        self._files = [other for other in cache_files(self.configured_path) if other != self.path] + [self.path]
        if len(self._files) > FILE_NUMBERS:
            raise ValueError(f"{self.configured_path}: {len(self._files)} cache files next to it; at most "
                             f"{FILE_NUMBERS} are read (one per process)")
        fingerprints, locations = array.array("Q"), array.array("Q")
        for number, other in enumerate(self._files):
            self._index_file(other, number, own=other == self.path, fingerprints=fingerprints, locations=locations)
        self._fingerprints, self._locations = sorted_index(fingerprints, locations)
        self._recent: dict[int, int] = {}  # fingerprint -> location of answers put since the last merge
        self._count = len(self._fingerprints)

    def _index_file(self, path: Path, number: int, own: bool, fingerprints: array.array,
                    locations: array.array) -> None:
        if not path.exists():
            return
        found, offset, raw = 0, 0, b""
        with path.open("rb") as cache_file:
            line_number = 0
            for raw in cache_file:  # one line at a time: the file is never held whole
                line_number += 1
                start, offset = offset, offset + len(raw)
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                entry = parse_cache_line(line)
                if entry is None:
                    # Another process may be writing its last line right now.
                    torn = not own and not raw.endswith(b"\n")
                    (logger.debug if torn else logger.warning)(
                        "skipping corrupt LLM cache line %s:%d (expected a JSON object with string 'key' and 'content')",
                        path, line_number,
                    )
                    continue
                fingerprints.append(fingerprint(entry[0]))
                locations.append(start << FILE_BITS | number)
                found += 1
            if own:
                self._starts_mid_line = bool(raw) and not raw.endswith(b"\n")
        logger.debug("indexed %d cached LLM answers in %s", found, path)

    def __len__(self) -> int:
        return self._count

    def _location(self, key_print: int) -> int | None:
        location = self._recent.get(key_print)
        if location is not None:
            return location
        at = int(np.searchsorted(self._fingerprints, np.uint64(key_print)))
        if at < len(self._fingerprints) and int(self._fingerprints[at]) == key_print:
            return int(self._locations[at])
        return None

    def get(self, key: str) -> str | None:
        location = self._location(fingerprint(key))
        if location is None:
            return None
        path, offset = self._files[location & FILE_MASK], location >> FILE_BITS
        try:
            line = read_line(path, offset)
        except OSError as error:
            logger.warning("cannot read LLM cache %s at byte %d (%s): answering as a miss", path, offset, error)
            return None
        entry = parse_cache_line(line)
        if entry is None:
            logger.warning("LLM cache %s changed since it was indexed (no answer at byte %d): answering as a miss",
                           path, offset)
            return None
        return entry[1] if entry[0] == key else None  # another key with the same fingerprint: a miss

    def put(self, key: str, content: str) -> None:
        line = (json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self.get(key) == content:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = b"\n" + line if self._starts_mid_line else line
            # O_APPEND: the offset after the write is the end of this line, whoever else appends.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                self._starts_mid_line = True  # until the whole line is written
                written = 0
                while written < len(data):
                    written += os.write(descriptor, data[written:])
                self._starts_mid_line = False
                end = os.lseek(descriptor, 0, os.SEEK_CUR)
            finally:
                os.close(descriptor)
            key_print = fingerprint(key)
            if self._location(key_print) is None:
                self._count += 1
            self._recent[key_print] = (end - len(line)) << FILE_BITS | (len(self._files) - 1)
            if len(self._recent) >= RECENT_LIMIT:
                self._merge_recent()

    def _merge_recent(self) -> None:
        fingerprints = np.concatenate([self._fingerprints, np.fromiter(self._recent, np.uint64, len(self._recent))])
        locations = np.concatenate([self._locations, np.fromiter(self._recent.values(), np.uint64, len(self._recent))])
        self._fingerprints, self._locations = sorted_index(fingerprints, locations)
        self._recent = {}


def fingerprint(key: str) -> int:
    """64 bits of the key's hash: the index holds these, not the keys (64 hex characters each)."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sorted_index(fingerprints, locations) -> tuple[np.ndarray, np.ndarray]:
    """(fingerprints, locations) sorted by fingerprint, one entry per fingerprint: its last one in
    the given order (a later line of a key replaces an earlier one)."""
    fingerprints = np.asarray(fingerprints, dtype=np.uint64)
    locations = np.asarray(locations, dtype=np.uint64)
    order = np.argsort(fingerprints, kind="stable")
    fingerprints, locations = fingerprints[order], locations[order]
    last = np.ones(len(fingerprints), dtype=bool)
    last[:-1] = fingerprints[:-1] != fingerprints[1:]
    return fingerprints[last], locations[last]


def read_line(path: Path, offset: int, chunk: int = 4096) -> str:
    """The line of `path` starting at byte `offset` (to its newline or the end of the file)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while True:
            part = os.pread(descriptor, chunk, offset)
            end = part.find(b"\n")
            if end >= 0 or not part:
                parts.append(part if end < 0 else part[:end])
                break
            parts.append(part)
            offset += len(part)
    finally:
        os.close(descriptor)
    return b"".join(parts).decode("utf-8", errors="replace")


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
