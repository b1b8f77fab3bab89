"""DPO alone: scripted preference pairs (teacher turn over a misread turn) -> DPO -> an orbax checkpoint.

    python launch/dpo.py                                         # embedded default, from the random tiny model
    python launch/dpo.py --init runs/tiny/sft                    # from the SFT warm start (launch/sft.py)
    python launch/dpo.py --config configs/tiny.yaml --init runs/tiny/sft dpo.beta=0.2 dpo.steps=100

Positional arguments are dotted overrides: dpo.<key>=value sets a DPO setting (beta, steps,
learning_rate, batch_size, num_dialogues, warmup_steps, label_smoothing; offline/dpo.py
DPOSettings), anything else overrides the YAML config. The run builds the world as launch/sft.py
does (rl/setup.py); --init DIR is model.init_checkpoint=DIR: the policy starts from that run's
checkpoint (SFT, DPO or PPO) with the tokenizer it names. The ScriptedUser talks with the teacher for
rollout.max_rounds turns per persona, each teacher turn is paired with the same turn misread (the
user's values swapped for another persona's; a bland turn before anything is revealed) on the same
history, and DPO trains on those pairs with the rollout's system prompt. The summary reports the
reward accuracy on held-out personas' pairs and the share of greedy turns that are well formed and
pass the response judge; {"actor": params} is saved under <output_dir>/<name>/dpo (per-step
metrics in dpo_history.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlpa_jax.config import TrainConfig
    from rlpa_jax.offline.dpo import DPOSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HELD_OUT_PERSONAS = 16  # evaluation personas whose pairs and greedy turns are checked after training
DPO_SECTION = "dpo"  # overrides dpo.<key>=value set DPOSettings, not the config

log = logging.getLogger("dpo")


def split_overrides(overrides: list[str]) -> tuple[DPOSettings, list[str]]:
    """(DPOSettings from the dpo.* overrides, the remaining config overrides)."""
    from rlpa_jax.config import ConfigError, _parse_override, from_dict
    from rlpa_jax.offline.dpo import DPOSettings

    valid = sorted(field.name for field in dataclasses.fields(DPOSettings))
    values: dict = {}
    rest: list[str] = []
    for text in overrides:
        keys, value = _parse_override(text)
        if keys[0] != DPO_SECTION:
            rest.append(text)
            continue
        if len(keys) != 2 or keys[1] not in valid:
            raise ConfigError(f"override {text!r}: expected dpo.<key>=value with a key among {', '.join(valid)}")
        values[keys[1]] = value
    return from_dict(DPOSettings, values, where=DPO_SECTION), rest


def warn_on_system_prompt_change(config: TrainConfig) -> None:
    """DPO should keep the prompt the starting checkpoint was trained with; say so when it does not."""
    from rlpa_jax.checkpoint import Checkpointer, checkpoint_directory

    directory = checkpoint_directory(config.model.init_checkpoint)
    trained_with = Checkpointer(directory, max_to_keep=None).restore_meta().get("system_prompt")
    if trained_with not in (None, config.rollout.system_prompt):
        log.warning("%s was trained with system prompt %r; this run uses rollout.system_prompt=%r",
                    directory, trained_with, config.rollout.system_prompt)


def judged_greedy_turns(config: TrainConfig, params, model_config, tokenizer, held_out, system_prompt) -> dict:
    """Well-formed share and response-judge pass rate of greedy turns after held-out histories."""
    from rlpa_jax.dialogue.chat import parse_turn
    from rlpa_jax.dialogue.judges import ResponseRequest
    from rlpa_jax.dialogue.llm import run_sync
    from rlpa_jax.offline import sft
    from rlpa_jax.rl import setup

    personas = [persona for persona, _ in held_out]
    histories = [history for _, history in held_out]
    texts = sft.greedy_turns(params, model_config, tokenizer, histories, config.rollout.max_new_tokens,
                             system_prompt)
    parsed = [parse_turn(text) for text in texts]
    formed = [index for index, turn in enumerate(parsed) if turn.well_formed]
    _, response_judge = setup.build_judges(config)
    requests = [ResponseRequest(personas[i], histories[i], parsed[i].response) for i in formed]
    verdicts = run_sync(response_judge.judge(requests)) if requests else []
    # A malformed turn or an unscored one (None) does not pass.
    return {"well_formed_greedy": len(formed) / len(texts),
            "response_pass_greedy": sum(v == 1 for v in verdicts) / len(texts)}


def run_dpo(config: TrainConfig, settings: DPOSettings) -> dict:
    """Build (or restore), train, check and save; returns a summary of the run."""
    import numpy as np

    from rlpa_jax.checkpoint import Checkpointer, model_config_to_meta
    from rlpa_jax.dialogue.chat import load_prompt
    from rlpa_jax.offline import dpo
    from rlpa_jax.rl import setup
    from rlpa_jax.rl.step import param_shardings

    dpo.validate_settings(settings)
    rollout = config.rollout
    mesh = setup.build_mesh(config)
    model_config = setup.model_config(config)
    system_prompt = load_prompt(rollout.system_prompt)
    if config.model.init_checkpoint is not None:
        warn_on_system_prompt_change(config)
    # With model.init_checkpoint (--init) these are the checkpoint's policy and tokenizer.
    tokenizer_dir = setup.tokenizer_dir(config).absolute()
    tokenizer = setup.build_tokenizer(config)
    params = setup.build_policy(config, model_config, mesh)

    started = time.perf_counter()
    max_length = rollout.max_prompt_tokens + rollout.max_new_tokens
    personas = setup.build_personas(config, "train")[: settings.num_dialogues]
    pairs = dpo.preference_pairs(personas, rollout.max_rounds, seed=config.seed)
    examples = dpo.build_dpo_examples(pairs, tokenizer, max_length, system_prompt=system_prompt)
    eval_personas = setup.build_personas(config, "eval")[:HELD_OUT_PERSONAS]
    held_out_pairs = dpo.preference_pairs(eval_personas, rollout.max_rounds, seed=config.seed + 1)
    held_out_examples = dpo.build_dpo_examples(held_out_pairs, tokenizer, max_length, system_prompt=system_prompt)
    # One history per evaluation persona, at turns spread over the dialogue.
    turns = rollout.max_rounds
    held_out_histories = [(persona, held_out_pairs[index * turns + index % turns][0])
                          for index, persona in enumerate(eval_personas)]
    log.info("%d preference pairs from %d dialogues, padded to %d tokens", len(pairs), len(personas),
             examples["tokens"].shape[1])
    # The reference is the starting policy; score the held-out pairs before training donates it.
    held_out_reference = dpo.preference_logps(params, model_config, held_out_examples, settings.batch_size, mesh)
    data_s = time.perf_counter() - started

    started = time.perf_counter()
    params, history = dpo.train_dpo(params, model_config, examples, settings, config.seed, mesh=mesh,
                                    param_shardings=param_shardings(model_config, mesh),
                                    progress=config.logging.progress_bar)
    train_s = time.perf_counter() - started

    held_out_policy = dpo.preference_logps(params, model_config, held_out_examples, settings.batch_size, mesh)
    generation = judged_greedy_turns(config, params, model_config, tokenizer, held_out_histories, system_prompt)
    last = history[-10:]
    summary = {
        "pairs": len(pairs),
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "init": config.model.init_checkpoint,
        "first_loss": history[0]["loss"],
        "final_loss": float(np.mean([record["loss"] for record in last])),
        "final_reward_accuracy": float(np.mean([record["reward_accuracy"] for record in last])),
        "final_reward_margin": float(np.mean([record["reward_margin"] for record in last])),
        "held_out_reward_accuracy": dpo.reward_accuracy(held_out_policy, held_out_reference),
        **generation,
        "data_s": round(data_s, 1),
        "train_s": round(train_s, 1),
    }
    meta = {"model_config": model_config_to_meta(model_config), "tokenizer_dir": str(tokenizer_dir),
            "system_prompt": rollout.system_prompt, "dpo_settings": dataclasses.asdict(settings), "dpo": summary}
    run_dir = config.run_dir
    checkpointer = Checkpointer(run_dir / "dpo", max_to_keep=1)
    checkpointer.save(settings.steps, {"actor": params}, meta)
    checkpointer.close()
    with (run_dir / "dpo_history.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--init", default=None,
                        help="start from this run's policy and tokenizer, e.g. runs/tiny/sft "
                             "(sets model.init_checkpoint); default: the config's model")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2 rollout.max_rounds=3")
    args = parser.parse_args(argv)
    from rlpa_jax import cli
    from rlpa_jax.config import ConfigError, load_config

    cli.setup_logging()

    try:
        settings, overrides = split_overrides(args.overrides)
        if args.init is not None:
            overrides.append(f"model.init_checkpoint={args.init}")
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"dpo.py: {error}", file=sys.stderr)
        return 2

    cli.use_compilation_cache(config)
    try:
        summary = run_dpo(config, settings)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"dpo.py: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    print(f"checkpoint: {config.run_dir / 'dpo'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
