"""Supervised warm start alone: scripted teacher dialogues -> SFT -> an orbax checkpoint of the policy.

    python launch/sft.py                                     # embedded default (configs/tiny.yaml), CPU
    python launch/sft.py --config configs/tiny.yaml sft.steps=100 sft.batch_size=8

Positional arguments are dotted overrides of the YAML config (key.path=value). The run builds the
model, tokenizer and personas exactly as launch/train.py does (rl/setup.py), lets the ScriptedUser
talk with the teacher for rollout.max_rounds turns per persona, fine-tunes on those turns with the
rollout's system prompt, reports the share of well-formed greedy turns on held-out personas, and
saves {"actor": params} under <output_dir>/<name>/sft (per-step metrics in sft_history.jsonl).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HELD_OUT_HISTORIES = 16  # greedy turns checked for well-formedness after training

log = logging.getLogger("sft")


def held_out_histories(config, teacher, setup, count: int) -> list:
    """One history per evaluation persona, at turns spread over the dialogue."""
    personas = setup.build_personas(config, "eval")[:count]
    dialogues = teacher.scripted_dialogues(personas, config.rollout.max_rounds, seed=config.seed + 1)
    return [dialogue[index % len(dialogue)][0] for index, dialogue in enumerate(dialogues)]


def run_sft(config) -> dict:
    """Build, fine-tune, check and save; returns a summary of the run."""
    import numpy as np

    from rlpa_jax.checkpoint import Checkpointer, model_config_to_meta
    from rlpa_jax.dialogue.chat import load_prompt
    from rlpa_jax.offline import sft, teacher
    from rlpa_jax.rl import setup
    from rlpa_jax.rl.step import param_shardings

    rollout = config.rollout
    mesh = setup.build_mesh(config)
    tokenizer = setup.build_tokenizer(config)
    model_config = setup.model_config(config)
    params = setup.build_policy(config, model_config, mesh)
    system_prompt = load_prompt(rollout.system_prompt)

    started = time.perf_counter()
    personas = setup.build_personas(config, "train")[: config.sft.num_dialogues]
    dialogues = teacher.scripted_dialogues(personas, rollout.max_rounds, seed=config.seed)
    examples = sft.build_sft_examples(dialogues, tokenizer, rollout.max_prompt_tokens + rollout.max_new_tokens,
                                      system_prompt=system_prompt)
    target_lengths = examples["loss_mask"].sum(axis=1)
    too_long = float(np.mean(target_lengths > rollout.max_new_tokens))
    log.info("%d examples from %d dialogues, padded to %d tokens; target tokens median %d, max %d",
             len(target_lengths), len(dialogues), examples["tokens"].shape[1], np.median(target_lengths),
             target_lengths.max())
    if too_long:
        log.warning("%.0f%% of teacher turns are longer than rollout.max_new_tokens=%d: the sampler will cut them",
                    100 * too_long, rollout.max_new_tokens)
    data_s = time.perf_counter() - started

    started = time.perf_counter()
    params, history = sft.train_sft(params, model_config, examples, config.sft, config.seed, mesh=mesh,
                                    param_shardings=param_shardings(model_config, mesh),
                                    progress=config.logging.progress_bar)
    train_s = time.perf_counter() - started

    histories = held_out_histories(config, teacher, setup, HELD_OUT_HISTORIES)
    well_formed = sft.generation_quality(params, model_config, tokenizer, histories, rollout.max_new_tokens,
                                         system_prompt)

    run_dir = config.run_dir
    summary = {
        "examples": int(len(target_lengths)),
        "steps": config.sft.steps,
        "batch_size": config.sft.batch_size,
        "first_loss": history[0]["loss"],
        "final_loss": float(np.mean([record["loss"] for record in history[-10:]])),
        "well_formed_greedy": well_formed,
        "targets_over_max_new_tokens": too_long,
        "data_s": round(data_s, 1),
        "train_s": round(train_s, 1),
    }
    meta = {"model_config": model_config_to_meta(model_config),
            "tokenizer_dir": str(setup.tokenizer_dir(config).absolute()),
            "system_prompt": rollout.system_prompt, "sft": summary}
    checkpointer = Checkpointer(run_dir / "sft", max_to_keep=1)
    checkpointer.save(config.sft.steps, {"actor": params}, meta)
    checkpointer.close()
    with (run_dir / "sft_history.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=100")
    args = parser.parse_args(argv)
    from rlpa_jax import cli

    cli.setup_logging()
    config = cli.load_config_or_exit("sft.py", args.config, args.overrides)
    cli.use_compilation_cache(config)
    try:
        summary = run_sft(config)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"sft.py: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(f"checkpoint: {config.run_dir / 'sft'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
