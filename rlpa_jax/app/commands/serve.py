"""Serve a local Hugging Face Qwen2 folder as an OpenAI-compatible chat endpoint.

    python launch/serve.py --checkpoint runs/tiny/hf                  # a trained run's exported policy
    python launch/serve.py --checkpoint ~/models/qwen2.5-0.5b-instruct --port 8001 --max-batch 32

Installed as a package (README "Install as a package"), `rlpa-serve` takes the same arguments.

POST /v1/chat/completions, GET /v1/models, GET /v1/stats (generation calls, requests, mean batch
size) and GET /health, on --host:--port (127.0.0.1 by default: nothing outside this machine).
Concurrent requests are batched into shared generation calls (dialogue/llm/local.py's
MicroBatcher: those arriving while a call runs, or within --batch-window-ms of the oldest
waiting, go into the next call, one per sampling setting); each call's batch size is logged.
Request fields and errors: dialogue/llm/server.py. Any LLM role can use it as its endpoint:
`backend: openai`, `base_url: http://127.0.0.1:8000/v1`, `model:` the served name (--model-name,
default the folder's name). Single process: one device, no mesh.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from rlpa_jax.app import cli
from rlpa_jax.dialogue.llm.local import DEFAULT_WINDOW_S, load_model
from rlpa_jax.dialogue.llm.server import ChatServer
from rlpa_jax.model.hf import CheckpointError

log = logging.getLogger("serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a Hugging Face Qwen2 folder (config.json, *.safetensors, tokenizer), e.g. runs/<name>/hf")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    parser.add_argument("--model-name", default=None, help="the name clients send as `model` (default: folder name)")
    parser.add_argument("--max-batch", type=int, default=64, help="the most requests in one generation call")
    parser.add_argument("--batch-window-ms", type=float, default=DEFAULT_WINDOW_S * 1000,
                        help="how long an idle engine waits for company for the oldest request")
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens of a request that gives none")
    parser.add_argument("--seed", type=int, default=0, help="folded into every sampled call's key")
    args = parser.parse_args(argv)
    cli.start("serve.py")
    if args.max_batch < 1 or args.batch_window_ms < 0 or args.max_tokens < 1:
        print("serve.py: --max-batch and --max-tokens must be >= 1, --batch-window-ms >= 0", file=sys.stderr)
        return 2
    try:
        model = load_model(args.checkpoint, "--checkpoint", window_s=args.batch_window_ms / 1000,
                           max_batch_size=args.max_batch, seed=args.seed, log_level=logging.INFO)
    except CheckpointError as error:
        print(f"serve.py: {error}", file=sys.stderr)
        return 2
    server = ChatServer((args.host, args.port), model, args.model_name, args.max_tokens)
    host, port = server.server_address[:2]
    # The test (and scripts) read this line for the port when started with --port 0.
    log.info("serving %s as model %r on http://%s:%d/v1 (max batch %d)", model.path, server.model_name, host, port,
             args.max_batch)
    # SIGTERM (systemd, docker, kill) stops it as Ctrl-C does; a process started in the background
    # by a non-interactive shell ignores SIGINT from birth, so SIGTERM is the stop that always works.
    signal.signal(signal.SIGTERM, stop_serving)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        log.info("stopped after %s", model.batcher.stats() | {"recent_batch_sizes": "..."})
    return 0


def stop_serving(signum, frame) -> None:
    raise KeyboardInterrupt

