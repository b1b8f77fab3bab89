"""Supervised warm start alone: scripted teacher dialogues -> SFT -> an orbax checkpoint of the policy.

    python launch/sft.py                                     # embedded default (configs/tiny.yaml), CPU
    python launch/sft.py --config configs/tiny.yaml sft.steps=100 sft.batch_size=8

Installed as a package (README "Install as a package"), `rlpa-sft` takes the same arguments.

Positional arguments are dotted overrides of the YAML config (key.path=value). The run builds the
model, tokenizer and personas exactly as launch/train.py does (rlpa_jax/app/build.py), runs the same
warm start as a PPO run (offline/sft.warm_start), reports the share of well-formed greedy turns on
held-out personas, and saves {"actor": params} under <output_dir>/<name>/sft (per-step metrics in
sft_history.jsonl); `model.init_checkpoint=<output_dir>/<name>/sft` starts PPO from it.
Runs as several processes too (README "Several hosts"): every process trains on the same examples,
all save the checkpoint together, process 0 writes the history and prints the summary.
"""

from __future__ import annotations

import argparse
import json

from rlpa_jax.app import cli, jobs
from rlpa_jax.runtime import multihost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(parser, "sft.steps=100")
    parser.add_argument("--fresh", action="store_true",
                        help="move an earlier SFT run in the run directory aside (to <run_dir>.<date>), "
                             "then start anew")
    args = parser.parse_args(argv)
    config = cli.start_with_config("sft.py", args.config, args.overrides, job="sft", print_config=args.print_config)
    summary = cli.run_or_exit("sft.py", lambda: jobs.sft(config, "fresh" if args.fresh else "new"), (FileNotFoundError, ValueError, KeyError))
    if multihost.is_main_process():  # every process ran the same job
        print(json.dumps(summary, indent=2))
        print(f"checkpoint: {config.run_dir / 'sft'}")
    return 0

