"""The local LLM backend against transformers `generate`, at 1, 4 and 16 concurrent chat requests.

Three ways to answer N chat requests that arrive at once, all greedy, the same prompts and
max_tokens, on one Hugging Face Qwen2 folder (default: the fetched Qwen2.5-Coder-0.5B-Instruct,
`make real-model`):

- local: the in-process backend (dialogue/llm/local.py): the N requests go to the model's
  micro-batcher together and share generation calls;
- serve: launch/serve.py on 127.0.0.1, N client threads posting /v1/chat/completions at once;
- generate: transformers `generate` (float32, torch on CPU), one request at a time in arrival
  order, as a simple server would: a request's latency includes its wait for the ones before it.

Every method first answers one untimed round at each concurrency (JAX compiles there), then
`--repeats` timed rounds. Reports the median completion tokens per second over a round (with the
min-max spread over rounds) and the request latency p50/p90 of the median round, plus the CPU model
and the load average at the start and end (measure only on a quiet machine, load below 1):

    .venv/bin/python benchmarks/local_backend.py                          # 1, 4, 16 requests, 64 tokens
    .venv/bin/python benchmarks/local_backend.py --concurrency 1 4 --max-tokens 32 --methods local generate
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from rlpa_jax.app import fetch
from rlpa_jax.dialogue.llm.local import LocalRequest, load_model
from rlpa_jax.generation.sampler import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the capital of France", "how a hash map works", "why the sky is blue", "a haiku about rain",
          "Python list comprehensions", "what a prime number is", "the rules of chess castling",
          "how to boil an egg", "what TCP does", "the water cycle", "a binary search", "photosynthesis",
          "a good name for a cat", "how vaccines work", "the Pythagorean theorem", "what JSON is"]


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in two sentences."}] for i in range(n)]


def local_round(model, messages, max_tokens: int) -> tuple[list[float], int]:
    """(latency of each request, completion tokens) with all of them submitted at once."""
    done: list[float] = [0.0] * len(messages)
    start = time.perf_counter()
    futures = model.batcher.submit([LocalRequest(m, SamplingParams(max_new_tokens=max_tokens, temperature=0.0))
                                    for m in messages])
    for i, future in enumerate(futures):
        future.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter() - start))
    replies = [future.result() for future in futures]
    return done, sum(reply.completion_tokens for reply in replies)


def serve_round(url: str, model: str, messages, max_tokens: int) -> tuple[list[float], int]:
    def post(message) -> tuple[float, int]:
        body = json.dumps({"model": model, "messages": message, "max_tokens": max_tokens, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            usage = json.load(response)["usage"]
        return time.perf_counter() - start, usage["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(messages)) as pool:
        results = list(pool.map(post, messages))
    return [r[0] for r in results], sum(r[1] for r in results)


def generate_round(model, tokenizer, messages, max_tokens: int) -> tuple[list[float], int]:
    import torch  # only this method needs torch

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    latencies, tokens, start = [], 0, time.perf_counter()
    for message in messages:
        ids = tokenizer.apply_chat_template(message, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id or stop)
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - start)
    return latencies, tokens


def start_server(folder: Path, max_tokens: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve.py"), "--checkpoint", str(folder),
                                    "--port", "0", "--max-tokens", str(max_tokens)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    while not (found := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", log_path.read_text())):
        if process.poll() is not None:
            raise RuntimeError(f"launch/serve.py did not start:\n{log_path.read_text()}")
        time.sleep(0.2)
    return process, found.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a Qwen2 HF folder (default: the fetched 0.5B)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["local", "serve", "generate"],
                        choices=["local", "serve", "generate"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method and concurrency")
    args = parser.parse_args(argv)
    folder = (args.checkpoint or fetch.default_model_dir()).expanduser().resolve()
    load_at_start = os.getloadavg()[0]
    rows = []

    def measure(method: str, answer) -> None:
        for n in args.concurrency:
            answer(chats(n))  # untimed: compiles this batch shape
            rounds = [answer(chats(n)) for _ in range(args.repeats)]
            rates = [tokens / max(latencies) for latencies, tokens in rounds]
            median = int(np.argsort(rates)[len(rates) // 2])
            rows.append((method, n, rates[median], min(rates), max(rates),
                         *np.percentile(rounds[median][0], [50, 90])))
            print(f"{method:9s} {n:3d} requests: {rates[median]:7.1f} tokens/s "
                  f"({min(rates):.1f}-{max(rates):.1f})", flush=True)

    if "local" in args.methods:
        model = load_model(folder)
        measure("local", lambda messages: local_round(model, messages, args.max_tokens))
        del model
    if "serve" in args.methods:
        with tempfile.TemporaryDirectory() as scratch:
            process, url = start_server(folder, args.max_tokens, Path(scratch) / "serve.log")
            try:
                measure("serve", lambda messages: serve_round(url, folder.name, messages, args.max_tokens))
            finally:
                process.terminate()  # SIGTERM: this script may run in the background, where SIGINT is ignored
                process.wait(timeout=60)
    if "generate" in args.methods:
        import torch
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        measure("generate", lambda messages: generate_round(hf_model, tokenizer, messages, args.max_tokens))

    print(f"\n{folder.name}, greedy, max_tokens {args.max_tokens}, {args.repeats} timed rounds each; "
          f"CPU {cpu_model()}, {os.cpu_count()} cores; load average {load_at_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end\n")
    print("| method | concurrent requests | tokens/s median (min-max) | latency p50 (s) | latency p90 (s) |")
    print("|---|---|---|---|---|")
    for method, n, rate, low, high, p50, p90 in rows:
        print(f"| {method} | {n} | {rate:.1f} ({low:.1f}-{high:.1f}) | {p50:.2f} | {p90:.2f} |")
    generate = {n: rate for method, n, rate, *_ in rows if method == "generate"}
    for method, n, rate, *_ in rows:
        if method != "generate" and n in generate:
            print(f"{method} / generate at {n} requests: {rate / generate[n]:.2f}x")
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
