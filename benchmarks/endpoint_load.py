"""A rollout at the paper's endpoint load against a rate-limited 127.0.0.1 server.

The server (tests/openai_server.py) plays gpt-4o-mini for the simulated user and both judges: it
refuses a request with 429 + Retry-After once `--rpm` requests were accepted in the last 60 s,
and answers each accepted one after 0.5-2 s. Its answers are a pure function of the request, so
a rollout scored through it must give exactly the scores of the same rollout against an
unlimited, instant copy of the server (the reference): any sample scored differently, or left
unscored, is mis-scored.

The policy writes well-formed turns (random profile items and replies, drawn from the rollout's
sampling key), so every sample is judged by both judges: per turn, conversations x samples x 2
judge calls and one user call per conversation; the tiny random policy would write no judgeable
turn. The user and the judges are built from the config (`llm.*` with per-role sections), so
they share the endpoint's one limiter.

    .venv/bin/python benchmarks/endpoint_load.py                       # 64 x 4 samples, 3 turns, 600 RPM
    .venv/bin/python benchmarks/endpoint_load.py --rounds 10 --rpm 1200

Reports what the server saw: the most requests in any 60 s window (must be <= rpm), 429s,
throughput (accepted requests per minute between the first and the last arrival) as a share of
the budget, mis-scored samples, and per-role latency percentiles from the client's metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
sys.path.insert(0, str(REPO / "tests"))  # the test server

import jax  # noqa: E402
import numpy as np  # noqa: E402
from openai_server import OpenAIServer, RateLimit, Reply, peak_in_window  # noqa: E402

from rlpa_jax.app import build  # noqa: E402
from rlpa_jax.dialogue.chat import format_turn  # noqa: E402
from rlpa_jax.dialogue.llm.usage import LLMMeter  # noqa: E402
from rlpa_jax.dialogue.personas import synthetic_personas  # noqa: E402
from rlpa_jax.generation.engine import GenerationEngine  # noqa: E402
from rlpa_jax.generation.sampler import Generation, SamplingParams  # noqa: E402
from rlpa_jax.model.qwen2 import Qwen2Config  # noqa: E402
from rlpa_jax.model.tokenizer import stop_token_ids  # noqa: E402
from rlpa_jax.rl.environment import Environment, start_conversations  # noqa: E402
from rlpa_jax.rl.rollout import Rollout  # noqa: E402

USER_SENTENCES = ("I work as a nurse.", "I love hiking on weekends.", "I live in a small town by the sea.",
                  "My favourite food is ramen.", "I have two cats.", "I am learning the guitar.")
REPLIES = ("That sounds lovely. What do you enjoy most about it?", "Nice! How did you get into that?",
           "Interesting. Tell me more about your week.")


def digest(request: dict) -> int:
    text = json.dumps(request.get("messages"), sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def world_reply(request: dict) -> Reply:
    """The user and both judges, answering as a pure function of the request."""
    messages, h = request.get("messages") or [], digest(request)
    if messages and messages[0].get("role") == "system":  # the simulated user (system role-play prompt)
        return Reply(content=USER_SENTENCES[h % len(USER_SENTENCES)])
    return Reply(content=f"Judged. \\boxed{{{h % 2}}}")  # a profile match count or a 0/1 verdict


TURN_WRITER_CONFIG = Qwen2Config(vocab_size=512, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                 num_kv_heads=1)  # the engine's nominal model; TurnWriter samples instead


class TurnWriter:
    """A policy stand-in that writes well-formed turns: 1-3 profile items and a reply, drawn from
    the sampling key (so a rollout is reproducible), as the tokenizer's tokens plus a stop token."""

    compile_count = 0

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_id = stop_token_ids(tokenizer)[0]
        self.items = [item for persona in synthetic_personas(16, seed=99) for item in persona.items]

    def __call__(self, params, tokens, mask, key, sampling: SamplingParams) -> Generation:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
        rows = []
        for _ in range(tokens.shape[0] * sampling.num_samples):
            chosen = rng.choice(len(self.items), size=rng.integers(1, 4), replace=False)
            text = format_turn([self.items[i] for i in chosen], REPLIES[rng.integers(len(REPLIES))])
            rows.append(self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_id])
        width = max(map(len, rows))
        out = np.full((len(rows), width), self.pad_id, np.int32)
        for index, row in enumerate(rows):
            out[index, :len(row)] = row
        lengths = np.array([len(row) for row in rows], np.int32)
        written = np.arange(width)[None, :] < lengths[:, None]
        return Generation(out, np.zeros(out.shape, np.float32), written, lengths, np.int32(width))


@dataclass
class LoadResult:
    samples: int
    requests: int  # requests the server received (accepted + refused)
    rejected: int  # 429s the server sent
    peak_in_window: int  # most requests received in any window
    throughput: float  # accepted requests per window between first and last arrival / limit
    mis_scored: int  # samples scored differently from the reference run, or unscored
    seconds: float
    llm: dict[str, float]

    def lines(self, limit: int, window_s: float) -> list[str]:
        roles = sorted({key.split("/")[1] for key in self.llm})
        out = [f"samples {self.samples}, requests {self.requests} in {self.seconds:.1f} s, 429s {self.rejected}",
               f"peak requests in any {window_s:g} s window: {self.peak_in_window} (limit {limit})",
               f"throughput: {self.throughput:.1%} of the budget; mis-scored samples: {self.mis_scored}"]
        for role in roles:
            m = {name: self.llm[f"llm/{role}/{name}"] for name in ("calls", "retries", "p50_s", "p90_s", "p99_s",
                                                                    "wait_s")}
            out.append(f"  {role:15s} calls {m['calls']:.0f} retries {m['retries']:.0f} latency p50/p90/p99 "
                       f"{m['p50_s']:.2f}/{m['p90_s']:.2f}/{m['p99_s']:.2f} s, "
                       f"limiter wait {m['wait_s']:.0f} s summed over calls")
        return out


def rollout_scores(environment: Environment, conversations: int, samples: int, rounds: int, groups: int,
                   seed: int = 0) -> dict[tuple[int, int, int], tuple[bool, float]]:
    """(conversation, turn, sample) -> (scored, reward) of one rollout of the TurnWriter policy."""
    personas = synthetic_personas(conversations, seed=seed)
    users = start_conversations(personas, environment.user_sim, list(range(conversations)))
    engine = GenerationEngine(TURN_WRITER_CONFIG, stop_token_ids(environment.tokenizer),
                              environment.tokenizer.pad_token_id, prompt_buckets=(256, 512, 1024, 2048, 4096))
    engine.sampler = TurnWriter(environment.tokenizer)  # in place of the model: no device work
    engine.sync(None)
    rollout = Rollout(environment, engine, SamplingParams(max_new_tokens=64, num_samples=samples), rounds, groups=groups)
    result = rollout.run(users, jax.random.key(seed))
    return {(s.conversation_id, s.turn, s.sample_index): (s.score.valid, s.reward) for s in result.samples}


def compare(scores: dict, reference: dict) -> int:
    """Samples unscored, scored differently from the reference, or missing from either run."""
    common = scores.keys() & reference.keys()
    differ = sum(1 for key in common if not scores[key][0] or scores[key] != reference[key])
    return differ + len(scores.keys() ^ reference.keys())


def run_load(make_environment, limit: int, window_s: float, latency_s: tuple[float, float], conversations: int,
             samples: int, rounds: int, groups: int) -> LoadResult:
    """The rollout twice: against an unlimited instant server (the reference scores), then against
    one that enforces `limit` requests per `window_s` and answers in `latency_s`.
    `make_environment(base_url, limit)` builds the environment whose LLM roles talk to that
    server, with that limit (None: unlimited) for their endpoint."""
    with OpenAIServer(world_reply) as reference_server:
        reference = rollout_scores(make_environment(reference_server.base_url, None), conversations, samples, rounds,
                                   groups)
    with OpenAIServer(world_reply, rate_limit=RateLimit(limit, window_s), latency_s=latency_s) as server:
        environment = make_environment(server.base_url, limit)
        meter = LLMMeter(environment.llm_clients())
        started = time.monotonic()
        scores = rollout_scores(environment, conversations, samples, rounds, groups)
        seconds = time.monotonic() - started
    span = max(server.arrivals) - min(server.arrivals)
    return LoadResult(samples=len(scores), requests=len(server.arrivals), rejected=server.rejected,
                      peak_in_window=peak_in_window(server.arrivals, window_s),
                      throughput=len(server.accepted) / (span / window_s * limit) if span > 0 else 0.0,
                      mis_scored=compare(scores, reference), seconds=seconds, llm=meter.totals())


def config_environment(base_url: str, rpm: int | None, output_dir: str) -> Environment:
    """User and judges from the config tree, all on one endpoint (gpt-4o-mini at `base_url`)."""
    config = build.load_config(None, [f"output_dir={output_dir}", "user.kind=llm", "judges.kind=llm",
                                      f"llm.base_url={base_url}", "llm.model=gpt-4o-mini", f"llm.rpm={rpm or 'null'}",
                                      "llm.max_concurrency=64", "llm.max_retries=6", "llm.timeout_s=30"])
    return build.build_environment(config, build.build_tokenizer(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4, help="rollout.pipeline_groups")
    parser.add_argument("--latency", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN_S", "MAX_S"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as output_dir:
        result = run_load(lambda url, rpm: config_environment(url, rpm, output_dir), args.rpm, 60.0,
                          tuple(args.latency), args.conversations, args.samples, args.rounds, args.groups)
    print("\n".join(result.lines(args.rpm, 60.0)))
    ok = result.peak_in_window <= args.rpm and result.mis_scored == 0 and result.throughput >= 0.9
    print("PASS" if ok else "FAIL: expected peak <= rpm, 0 mis-scored and throughput >= 90%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
