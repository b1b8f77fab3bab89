"""Train a policy with RLPA.

    python launch/train.py                                   # embedded default (configs/tiny.yaml), CPU
    python launch/train.py --config configs/qwen2.5-3b-8gpu.yaml ppo.actor_lr=1e-6
    python launch/train.py --config configs/tiny.yaml --resume    # continue the run from its last checkpoint
    python launch/train.py --fresh                           # move the earlier runs/tiny aside, start anew

Installed as a package (README "Install as a package"), `rlpa-train` takes the same arguments.

Positional arguments are dotted overrides of the YAML config (key.path=value). A new run never
writes into a run directory (output_dir/name) that holds an earlier run: it stops and names the
choices (--resume, another name=..., --fresh). See rlpa_jax/app/run_dir.py.
"""

from __future__ import annotations

import argparse
import json

from rlpa_jax.app import build, cli
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.rl.trainer import TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(parser, "ppo.actor_lr=1e-6")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", dest="start", action="store_const", const="resume",
                       help="continue the run in the run directory from its latest checkpoint")
    start.add_argument("--resume-if-present", dest="start", action="store_const", const="resume_if_present",
                       help="resume when the run directory has a checkpoint, else start a new run")
    start.add_argument("--fresh", dest="start", action="store_const", const="fresh",
                       help="move an earlier run in the run directory aside (to <run_dir>.<date>), then start anew")
    args = parser.parse_args(argv)
    start_mode = args.start or "new"
    config = cli.start_with_config("train.py", args.config, args.overrides, {"start": start_mode},
                                   print_config=args.print_config)

    def train() -> dict:
        trainer = build.build_trainer(config, start_mode)  # run directory checked, every part built
        cli.check_writable(config.run_dir, needed_bytes=trainer.checkpoint_bytes())
        return trainer.train()

    # A full or read-only disk or a path the user cannot write ends in one line naming it, and the
    # last good checkpoint stays (orbax writes each step to a temporary directory, then renames it).
    # A run directory that does not suit the start (RunDirectoryError) is a ValueError.
    summary = cli.run_or_exit("train.py", train, (TrainingDiverged, CheckpointError, FileNotFoundError, ValueError))
    print(json.dumps(summary, indent=2))
    print(f"run directory: {config.run_dir}")
    return 0

