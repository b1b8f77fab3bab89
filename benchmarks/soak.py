"""A long training run that watches what grows: memory, checkpoints, logs, the LLM answer cache.

Runs `configs/tiny.yaml` through the normal entry points (`build.load_config`, `build.build_trainer`,
`Trainer.train`, under launch/train.py's host allocator) with a checkpoint after every iteration
and the per-iteration work shrunk by overrides (no SFT, 4 conversations x 2 samples, 3 rounds of
24 new tokens), so several hundred iterations fit in a quarter of an hour on 2 cores. After
each iteration it samples the process's resident memory (now and peak), Python's allocated
blocks, open file descriptors and threads, and on disk: the checkpoint directory (bytes and steps
kept, which must stay at `logging.max_to_keep`), metrics.jsonl, the tensorboard events, the LLM
answer cache and the rest of the run directory.

`--llm` makes the simulated user an LLM (user.kind=llm) answered by a 127.0.0.1 server
(tests/openai_server.py, answers a pure function of the request) with `llm.cache_path` in the run
directory, so the client's response cache is consulted and written every iteration. The judges
stay rule-based: the untrained policy writes no turn an LLM judge could score.

    nice -n 19 .venv/bin/python benchmarks/soak.py --llm                # 600 iterations, ~15-20 min on 2 shared cores
    nice -n 19 .venv/bin/python benchmarks/soak.py --iterations 100 --llm
    nice -n 19 .venv/bin/python benchmarks/soak.py --iterations 20 rollout.conversations=8   # more overrides

Prints a table every `--every` iterations and a verdict: the least-squares slope of RSS over the
second half of the run (MB per 100 iterations, +- its standard error; the first half holds
compilation and the allocator's warm-up), how much the peak RSS rose in that half, the slopes of
the checkpoints, the logs, the cache and the rest of the run directory,
and whether checkpoints stayed at max_to_keep. Exits 1 when checkpoints piled up or descriptors
or threads grew.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator

if __name__ == "__main__":
    host_allocator.ensure()  # as launch/train.py: the CPU allocator setting the real runs use

import argparse
import dataclasses
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
sys.path.insert(0, str(REPO / "tests"))  # the test server (--llm)

import numpy as np  # noqa: E402

from rlpa_jax.app import build, cli  # noqa: E402

# The embedded default with each iteration's work shrunk; the loop, checkpointing and logging
# are the normal ones.
SMALL_ITERATION = ["sft.enabled=false", "rollout.conversations=4", "rollout.samples_per_prompt=2",
                   "rollout.max_rounds=3", "rollout.max_new_tokens=24", "rollout.eval_conversations=4",
                   "ppo.train_batch_size=8", "ppo.micro_batch_size=8", "ppo.epochs=1",
                   "logging.checkpoint_every=1", "logging.export_hf=false", "logging.progress_bar=false"]
USER_SENTENCES = ("I work as a nurse.", "I love hiking on weekends.", "I live in a small town by the sea.",
                  "My favourite food is ramen.", "I have two cats.", "I am learning the guitar.")
MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Sample:
    iteration: int
    seconds: float
    rss_mb: float
    peak_rss_mb: float
    checkpoint_mb: float
    steps_kept: int
    metrics_kb: float
    tensorboard_kb: float
    cache_kb: float
    other_kb: float  # the run directory less checkpoints, logs and the cache
    fds: int
    threads: int
    compiles: int  # the sampler's compiled programs (metrics' sampler_compiles)
    python_blocks: int  # memory blocks Python's allocator holds (sys.getallocatedblocks): objects leaking show here


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def steps_kept(checkpoints: Path) -> int:
    return sum(1 for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()) if checkpoints.is_dir() else 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, per 100 of x."""
    return slope_with_error(xs, ys)[0]


def slope_with_error(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs per 100 of x, and its standard error (0 under 4 points)."""
    if len(xs) < 2:
        return 0.0, 0.0
    if len(xs) < 4:
        return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0]) * 100, 0.0
    coefficients, covariance = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1, cov=True)
    return float(coefficients[0]) * 100, float(np.sqrt(covariance[0, 0])) * 100


def user_reply(request: dict):
    """The simulated user's answer, a pure function of the conversation so far."""
    from openai_server import Reply

    text = "".join(str(m.get("content", "")) for m in request.get("messages") or [])
    return Reply(content=USER_SENTENCES[sum(text.encode()) % len(USER_SENTENCES)])


class Watcher:
    """Samples the process and the run directory after every iteration (Trainer.on_iteration_end)."""

    def __init__(self, run_dir: Path, cache_path: Path | None, server=None) -> None:
        self.run_dir, self.cache_path, self.server = run_dir, cache_path, server
        self.start = time.perf_counter()
        self.samples: list[Sample] = []

    def __call__(self, iteration: int, metrics: dict) -> None:
        if self.server is not None:  # the test server records every request; the soak measures the trainer
            for record in (self.server.requests, self.server.request_headers, self.server.arrivals,
                           self.server.accepted):
                record.clear()
        self.samples.append(self.sample(iteration + 1, int(metrics.get("sampler_compiles", 0))))

    def sample(self, iteration: int, compiles: int) -> Sample:
        checkpoints = self.run_dir / "checkpoints"
        metrics, tensorboard = self.run_dir / "metrics.jsonl", self.run_dir / "tensorboard"
        cache = tree_bytes(self.cache_path) if self.cache_path else 0
        logs = tree_bytes(metrics) + tree_bytes(tensorboard)
        other = tree_bytes(self.run_dir) - tree_bytes(checkpoints) - logs - cache
        return Sample(iteration, time.perf_counter() - self.start, rss_mb(), peak_rss_mb(),
                      tree_bytes(checkpoints) / MB, steps_kept(checkpoints), tree_bytes(metrics) / 1024,
                      tree_bytes(tensorboard) / 1024, cache / 1024, other / 1024, len(os.listdir("/proc/self/fd")),
                      threading.active_count(), compiles, sys.getallocatedblocks())


def table(samples: list[Sample], every: int) -> list[str]:
    head = ("iter", "s", "RSS MB", "peak MB", "ckpt MB", "steps", "metrics KB", "tb KB", "cache KB", "other KB",
            "fds", "threads", "compiles", "py blocks")
    rows = [s for s in samples if s.iteration % every == 0 or s is samples[0] or s is samples[-1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        lines.append(f"| {s.iteration} | {s.seconds:.0f} | {s.rss_mb:.1f} | {s.peak_rss_mb:.1f} | "
                     f"{s.checkpoint_mb:.2f} | {s.steps_kept} | {s.metrics_kb:.1f} | {s.tensorboard_kb:.1f} | "
                     f"{s.cache_kb:.1f} | {s.other_kb:.1f} | {s.fds} | {s.threads} | {s.compiles} | "
                     f"{s.python_blocks} |")
    return lines


def verdict(samples: list[Sample], max_to_keep: int) -> tuple[list[str], bool]:
    second = samples[len(samples) // 2:]
    xs = [s.iteration for s in second]
    rss, rss_error = slope_with_error(xs, [s.rss_mb for s in second])
    checkpoint = slope_per_100(xs, [s.checkpoint_mb for s in second])
    other = slope_per_100(xs, [s.other_kb for s in second])
    metrics = slope_per_100(xs, [s.metrics_kb for s in second])
    cache = slope_per_100(xs, [s.cache_kb for s in second])
    blocks, blocks_error = slope_with_error(xs, [s.python_blocks for s in second])
    most_kept = max(s.steps_kept for s in samples)
    fds_grew = second[-1].fds > second[0].fds
    threads_grew = second[-1].threads > second[0].threads
    lines = [f"second half (iterations {xs[0]}-{xs[-1]}), slopes per 100 iterations:",
             f"  RSS {rss:+.1f} +- {rss_error:.1f} MB (from {second[0].rss_mb:.1f} to {second[-1].rss_mb:.1f} MB, "
             f"between {min(s.rss_mb for s in second):.1f} and {max(s.rss_mb for s in second):.1f})",
             f"  peak RSS {second[0].peak_rss_mb:.1f} -> {second[-1].peak_rss_mb:.1f} MB "
             f"({second[-1].peak_rss_mb - second[0].peak_rss_mb:+.1f} MB over the second half)",
             f"  Python's allocated blocks {blocks:+.0f} +- {blocks_error:.0f} ({second[0].python_blocks} -> "
             f"{second[-1].python_blocks})",
             f"  checkpoints {checkpoint:+.3f} MB; steps kept at most {most_kept} (logging.max_to_keep={max_to_keep})",
             f"  metrics.jsonl {metrics:+.1f} KB (append-only log), LLM cache {cache:+.1f} KB, "
             f"rest of the run directory {other:+.1f} KB",
             f"  open descriptors {second[0].fds} -> {second[-1].fds}, threads {second[0].threads} -> "
             f"{second[-1].threads}"]
    ok = most_kept <= max_to_keep and not fds_grew and not threads_grew
    lines.append("PASS" if ok else "FAIL: checkpoints beyond max_to_keep, or descriptors or threads grew")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--every", type=int, default=20, help="print a table row every this many iterations")
    parser.add_argument("--llm", action="store_true", help="the simulated user is an LLM (127.0.0.1) with a cache")
    parser.add_argument("--output-dir", type=Path, default=None, help="keep the run here (default: a temporary dir)")
    parser.add_argument("overrides", nargs="*", help="more dotted config overrides")
    args = parser.parse_args(argv)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    server = None
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        overrides = [f"output_dir={output_dir}", "name=soak", f"ppo.iterations={args.iterations}", *SMALL_ITERATION]
        cache_path = None
        if args.llm:
            from openai_server import OpenAIServer

            server = OpenAIServer(user_reply).start()
            cache_path = output_dir / "soak" / "llm_cache.jsonl"
            overrides += ["user.kind=llm", f"llm.base_url={server.base_url}", "llm.model=soak-user",
                          f"llm.cache_path={cache_path}"]
        config = build.load_config(None, overrides + list(args.overrides))
        cli.use_compilation_cache(config)
        trainer = build.build_trainer(config)
        watcher = Watcher(config.run_dir, cache_path, server)
        trainer.on_iteration_end.append(watcher)
        try:
            trainer.train()
        finally:
            if server is not None:
                server.close()
        lines, ok = verdict(watcher.samples, config.logging.max_to_keep)
        print("\n".join(table(watcher.samples, args.every)))
        print("\n".join(lines))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
