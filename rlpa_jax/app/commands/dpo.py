"""DPO alone: scripted preference pairs (teacher turn over a misread turn) -> DPO -> an orbax checkpoint.

    python launch/dpo.py                                         # embedded default, from the random tiny model
    python launch/dpo.py --init runs/tiny/sft                    # from the SFT warm start (launch/sft.py)
    python launch/dpo.py --config configs/tiny.yaml --init runs/tiny/sft dpo.beta=0.2 dpo.steps=100

Installed as a package (README "Install as a package"), `rlpa-dpo` takes the same arguments.

Positional arguments are dotted overrides of the YAML config; the DPO settings are its `dpo`
section (beta, steps, learning_rate, batch_size, num_dialogues, warmup_steps, label_smoothing;
config/tree.py DPOConfig), e.g. dpo.beta=0.2. The run builds the world as launch/sft.py
does (rlpa_jax/app/build.py); --init DIR is model.init_checkpoint=DIR: the policy starts from that
run's checkpoint (SFT, DPO or PPO) with the tokenizer it names. The ScriptedUser talks with the
teacher for rollout.max_rounds turns per persona, each teacher turn is paired with the same turn
misread (the user's values swapped for another persona's; a bland turn before anything is
revealed) on the same history, and DPO trains on those pairs with the rollout's system prompt
(rlpa_jax/app/jobs.py). The summary reports the reward accuracy on held-out personas' pairs and the
share of greedy turns that are well formed and pass the response judge; {"actor": params} is saved
under <output_dir>/<name>/dpo (per-step metrics in dpo_history.jsonl). Runs as several processes
too (README "Several hosts"): every process trains on the same pairs, the held-out judge calls are
split between them, all save the checkpoint together, process 0 writes the history and the summary.
"""

from __future__ import annotations

import argparse
import json

from rlpa_jax.app import cli, jobs
from rlpa_jax.runtime import multihost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(parser, "dpo.beta=0.2 rollout.max_rounds=3")
    parser.add_argument("--init", default=None,
                        help="start from this run's policy and tokenizer, e.g. runs/tiny/sft "
                             "(sets model.init_checkpoint); default: the config's model")
    parser.add_argument("--fresh", action="store_true",
                        help="move an earlier DPO run in the run directory aside (to <run_dir>.<date>), "
                             "then start anew")
    args = parser.parse_args(argv)
    init = [] if args.init is None else [f"model.init_checkpoint={args.init}"]
    config = cli.start_with_config("dpo.py", args.config, [*args.overrides, *init], job="dpo",
                                   print_config=args.print_config)
    summary = cli.run_or_exit("dpo.py", lambda: jobs.dpo(config, "fresh" if args.fresh else "new"), (FileNotFoundError, ValueError, KeyError))
    if multihost.is_main_process():  # every process ran the same job
        print(json.dumps(summary, indent=2))
        print(f"checkpoint: {config.run_dir / 'dpo'}")
    return 0

