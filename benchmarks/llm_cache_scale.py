"""The LLM response cache (rlpa_jax/dialogue/llm/cache.py) at the paper's scale: ~340k answers.

The paper's setup makes about 340k LLM calls per episode (the simulated user and both judges), so a
run's `llm.cache_path` file gathers that many answers per episode. This writes such a file in the
cache's own format, keys from `cache_key` over realistic chat requests (a system prompt and a
conversation of `--prompt-bytes`; only the key's hash reaches the file) and answers of
`--answer-bytes` (spread +-50 %), then, each in a fresh process so nothing else is resident:

- open: the seconds `ResponseCache(path)` takes, the resident memory it adds (RSS after minus
  before) and the peak it reached while loading, and what Python allocations the object holds
  afterwards (tracemalloc, a separate run: tracing slows the load);
- get: microseconds per lookup, `--lookups` hits in random order and as many misses;
- put: microseconds per new answer appended to the loaded cache.

    nice -n 19 .venv/bin/python benchmarks/llm_cache_scale.py                    # 340k answers of ~400 B
    nice -n 19 .venv/bin/python benchmarks/llm_cache_scale.py --entries 100000 --answer-bytes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

from rlpa_jax.dialogue.llm.cache import ResponseCache, cache_key  # noqa: E402

WORDS = ("the", "user", "likes", "hiking", "and", "reads", "novels", "on", "weekends", "works", "as", "a", "nurse",
         "profile", "item", "matches", "answer", "yes", "no", "because", "response", "mentions", "their", "cats")
MB = 1024 * 1024


def text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def write_cache(path: Path, entries: int, prompt_bytes: int, answer_bytes: int, seed: int) -> list[str]:
    """A cache file of `entries` answers in ResponseCache's line format; returns the keys."""
    rng = random.Random(seed)
    system = text(rng, prompt_bytes // 2)  # one shared system prompt, as a role's requests have
    conversation = text(rng, prompt_bytes)
    keys = []
    with path.open("w", encoding="utf-8") as handle:
        for index in range(entries):
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": f"{index}: {conversation[:prompt_bytes // 2]}"}]
            key = cache_key("https://api.openai.com/v1", "gpt-4o-mini", messages, 0.0, 512, False)
            answer = text(rng, rng.randint(answer_bytes // 2, answer_bytes * 3 // 2))
            handle.write(json.dumps({"key": key, "content": answer}, ensure_ascii=False) + "\n")
            keys.append(key)
    return keys


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: Path, keys_path: Path, lookups: int, puts: int, trace: bool) -> dict:
    """Runs in a fresh process: open, look up and append, as `--child` prints it."""
    if trace:
        import tracemalloc

        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        cache = ResponseCache(path, process=0, processes=1)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"traced_held": held - before, "traced_peak": peak - before, "entries": len(cache)}
    before, peak_before = rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    cache = ResponseCache(path, process=0, processes=1)
    open_s = time.perf_counter() - start
    result = {"open_s": open_s, "rss_added": rss_bytes() - before, "peak_added": peak_rss_bytes() - peak_before,
              "entries": len(cache)}
    keys = keys_path.read_text().split()  # after the open, so that its peak is the cache's own
    random.Random(1).shuffle(keys)
    hits = keys[:lookups]
    start = time.perf_counter()
    found = sum(cache.get(key) is not None for key in hits)
    result["hit_us"] = (time.perf_counter() - start) / len(hits) * 1e6
    misses = [f"{index:064x}" for index in range(lookups)]
    start = time.perf_counter()
    wrong = sum(cache.get(key) is not None for key in misses)
    result["miss_us"] = (time.perf_counter() - start) / len(misses) * 1e6
    if found != len(hits) or wrong:
        raise SystemExit(f"lookups wrong: {found}/{len(hits)} hits found, {wrong} misses answered")
    start = time.perf_counter()
    for index in range(puts):
        cache.put(f"new-{index:059d}", "an answer of a few words " * 12)
    result["put_us"] = (time.perf_counter() - start) / max(puts, 1) * 1e6
    return result


def child(path: Path, keys_path: Path, lookups: int, puts: int, trace: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(path), str(keys_path), "--lookups", str(lookups),
               "--puts", str(puts)] + (["--trace"] if trace else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=340_000)
    parser.add_argument("--prompt-bytes", type=int, default=3000)
    parser.add_argument("--answer-bytes", type=int, default=400)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--puts", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, type=Path, metavar=("CACHE", "KEYS"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.lookups, args.puts, args.trace)))
        return 0

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as scratch:
        path, keys_path = Path(scratch) / "llm.jsonl", Path(scratch) / "keys.txt"
        start = time.perf_counter()
        keys = write_cache(path, args.entries, args.prompt_bytes, args.answer_bytes, seed=0)
        keys_path.write_text("\n".join(keys))
        print(f"wrote {args.entries} answers (prompts ~{args.prompt_bytes} B, answers ~{args.answer_bytes} B) "
              f"in {time.perf_counter() - start:.1f} s")
        size = path.stat().st_size
        timed = child(path, keys_path, min(args.lookups, args.entries), args.puts, trace=False)
        traced = child(path, keys_path, 0, 0, trace=True)
    rows = [("answers", f"{timed['entries']:,}"),
            ("file", f"{size / MB:.1f} MB ({size / args.entries:.0f} B per answer)"),
            ("open (load) time", f"{timed['open_s']:.2f} s"),
            ("RSS added by the open cache", f"{timed['rss_added'] / MB:.1f} MB"),
            ("peak RSS added while opening", f"{timed['peak_added'] / MB:.1f} MB"),
            ("Python allocations the cache holds (tracemalloc)",
             f"{traced['traced_held'] / MB:.1f} MB ({traced['traced_held'] / args.entries:.0f} B per answer)"),
            ("allocation peak while opening (tracemalloc)", f"{traced['traced_peak'] / MB:.1f} MB"),
            ("get, hit", f"{timed['hit_us']:.1f} us"),
            ("get, miss", f"{timed['miss_us']:.1f} us"),
            ("put (append a new answer)", f"{timed['put_us']:.1f} us")]
    print("| what | value |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
