"""The stand-alone offline jobs the launch scripts run: build from a config, train, check, save.

    summary = jobs.sft(config)              # launch/sft.py: the SFT warm start alone
    summary = jobs.dpo(config)              # launch/dpo.py: DPO on scripted preference pairs (config.dpo)
    path = jobs.export_policy(checkpoint, output)  # launch/export_hf.py: a checkpoint's policy for HF

Each builds the world exactly as a PPO run does (rlpa_jax/app/build.py), saves {"actor": params} as an
orbax checkpoint under <output_dir>/<name>/<job> (its metadata names the model config, tokenizer
and system prompt, so `model.init_checkpoint` can start PPO from it) and writes its per-step
records to <job>_history.jsonl.

Several processes (README "Several hosts"): every process runs the same job on the same data
(offline/sft.py and offline/dpo.py say why it is built, not exchanged), the sampler calls and
log-prob passes in the same order; the checkpoint is saved (and restored, for --init and the
export) by all of them together; process 0 alone writes the history and the HF export. The held-
out judge calls of DPO, which may go to an LLM, are split over the processes and exchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from rlpa_jax.app import build
from rlpa_jax.app.run_dir import prepare_run_dir
from rlpa_jax.config.tree import MeshConfig, RolloutConfig, TrainConfig
from rlpa_jax.dialogue import judges
from rlpa_jax.dialogue.chat import load_prompt, parse_turn
from rlpa_jax.dialogue.judges import ResponseRequest
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.dialogue.policy_format import add_policy_format
from rlpa_jax.offline import dpo as dpo_training
from rlpa_jax.offline import sft as sft_training
from rlpa_jax.offline import teacher
from rlpa_jax.runtime import checkpoint, multihost, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, checkpoint_directory, export_checkpoint, read_meta
from rlpa_jax.runtime.parallel import param_shardings

log = logging.getLogger(__name__)

HELD_OUT_HISTORIES = 16  # evaluation personas whose greedy turns are checked after training


def save_policy(config: TrainConfig, job: str, params, meta: dict, history: list[dict]) -> None:
    checkpointer = Checkpointer(config.run_dir / job, max_to_keep=1)
    checkpointer.save(len(history), {"actor": params}, meta)
    checkpointer.close()
    if not multihost.is_main_process():  # the checkpoint is saved by every process, the history once
        return
    with (config.run_dir / f"{job}_history.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)


def policy_meta(config: TrainConfig, model_config) -> dict:
    return checkpoint.policy_meta(model_config, build.tokenizer_dir(config), config.rollout.system_prompt)


# --------------------------------------------------------------------------------------------- SFT


def sft(config: TrainConfig, start: str = "new") -> dict:
    """The SFT warm start alone (offline/sft.warm_start, as the trainer runs it), a check of the
    greedy turns on held-out personas, and a checkpoint; returns a summary of the run. `start`:
    new or fresh (app/run_dir.py), checked before anything runs."""
    prepare_run_dir(config.run_dir, start, "sft")
    rollout = config.rollout
    mesh = build.build_mesh(config)
    build.check_rows_split(mesh, config, "sft.batch_size", config.sft.batch_size, "each SFT step's examples")
    tokenizer = build.build_tokenizer(config)
    model_config = build.model_config(config)
    params = build.build_policy(config, model_config, mesh)

    started = time.perf_counter()
    params, history, examples = sft_training.warm_start(params, model_config, tokenizer,
                                                        build.build_personas(config, "train"), config, mesh,
                                                        param_shardings(model_config, mesh))
    train_s = time.perf_counter() - started
    target_lengths = examples["loss_mask"].sum(axis=1)
    too_long = float(np.mean(target_lengths > rollout.max_new_tokens))
    log.info("%d examples, padded to %d tokens; target tokens median %d, max %d", len(target_lengths),
             examples["tokens"].shape[1], np.median(target_lengths), target_lengths.max())
    if too_long:
        log.warning("%.0f%% of teacher turns are longer than rollout.max_new_tokens=%d: the sampler will cut them",
                    100 * too_long, rollout.max_new_tokens)

    # One history per evaluation persona, at turns spread over the dialogue.
    personas = build.build_personas(config, "eval")[:HELD_OUT_HISTORIES]
    dialogues = teacher.scripted_dialogues(personas, rollout.max_rounds, seed=config.seed + 1)
    histories = [dialogue[index % len(dialogue)][0] for index, dialogue in enumerate(dialogues)]
    texts = sft_training.greedy_turns(synced_engine(config, model_config, tokenizer, mesh, params), tokenizer,
                                      histories, rollout.max_new_tokens, load_prompt(rollout.system_prompt))
    summary = {
        "examples": int(len(target_lengths)),
        "steps": config.sft.steps,
        "batch_size": config.sft.batch_size,
        "first_loss": history[0]["loss"],
        "final_loss": float(np.mean([record["loss"] for record in history[-10:]])),
        "well_formed_greedy": sft_training.well_formed_share(texts),
        "targets_over_max_new_tokens": too_long,
        "train_s": round(train_s, 1),
    }
    save_policy(config, "sft", params, policy_meta(config, model_config) | {"sft": summary}, history)
    return summary


# --------------------------------------------------------------------------------------------- DPO


def warn_on_system_prompt_change(config: TrainConfig) -> None:
    """DPO should keep the prompt the starting checkpoint was trained with; say so when it does not."""
    directory = checkpoint_directory(config.model.init_checkpoint)
    trained_with = Checkpointer(directory, max_to_keep=None).restore_meta().get("system_prompt")
    if trained_with not in (None, config.rollout.system_prompt):
        log.warning("%s was trained with system prompt %r; this run uses rollout.system_prompt=%r",
                    directory, trained_with, config.rollout.system_prompt)


def synced_engine(config: TrainConfig, model_config, tokenizer, mesh, params):
    """The run's generation engine holding `params` (a stand-alone job's greedy check)."""
    engine = build.build_engine(config, model_config, tokenizer, mesh)
    engine.sync(params)
    return engine


def judged_greedy_turns(config: TrainConfig, params, model_config, tokenizer, mesh, held_out, system_prompt) -> dict:
    """Well-formed share and response-judge pass rate of greedy turns after held-out histories."""
    personas = [persona for persona, _ in held_out]
    histories = [history for _, history in held_out]
    engine = synced_engine(config, model_config, tokenizer, mesh, params)
    texts = sft_training.greedy_turns(engine, tokenizer, histories, config.rollout.max_new_tokens, system_prompt)
    parsed = [parse_turn(text) for text in texts]
    formed = [index for index, turn in enumerate(parsed) if turn.well_formed]
    _, response_judge = judges.build_judges(config.judges)
    requests = [ResponseRequest(personas[i], histories[i], parsed[i].response) for i in formed]
    verdicts = judged_by_every_process(response_judge, requests)
    # A malformed turn or an unscored one (None) does not pass.
    return {"well_formed_greedy": len(formed) / len(texts),
            "response_pass_greedy": sum(v == 1 for v in verdicts) / len(texts)}


def judged_by_every_process(response_judge, requests: list[ResponseRequest]) -> list:
    """The judge's verdict on every request, each judged once: process k judges requests k, k + n,
    ... (n processes; an LLM judge is not asked n times) and the verdicts are exchanged (a
    collective). With one process: the judge's verdicts on all of them."""
    index, count = multihost.process_index(), multihost.process_count()
    mine = requests[index::count]
    verdicts = run_sync(response_judge.judge(mine)) if mine else []
    every = multihost.allgather_objects(verdicts)
    return [every[i % count][i // count] for i in range(len(requests))]


def dpo(config: TrainConfig, start: str = "new") -> dict:
    """Build (or restore with model.init_checkpoint), train with config.dpo, check and save; returns a
    summary. `start`: new or fresh (app/run_dir.py), checked before anything runs."""
    prepare_run_dir(config.run_dir, start, "dpo")
    rollout, settings = config.rollout, config.dpo
    mesh = build.build_mesh(config)
    build.check_rows_split(mesh, config, "dpo.batch_size", settings.batch_size, "each DPO step's preference pairs")
    model_config = build.model_config(config)
    system_prompt = load_prompt(rollout.system_prompt)
    if config.model.init_checkpoint is not None:
        warn_on_system_prompt_change(config)
    # With model.init_checkpoint (--init) these are the checkpoint's policy and tokenizer.
    tokenizer = build.build_tokenizer(config)
    params = build.build_policy(config, model_config, mesh)

    started = time.perf_counter()
    max_length = rollout.max_prompt_tokens + rollout.max_new_tokens
    personas = build.build_personas(config, "train")[: settings.num_dialogues]
    pairs = dpo_training.preference_pairs(personas, rollout.max_rounds, seed=config.seed)
    examples = dpo_training.build_dpo_examples(pairs, tokenizer, max_length, system_prompt=system_prompt)
    eval_personas = build.build_personas(config, "eval")[:HELD_OUT_HISTORIES]
    held_out_pairs = dpo_training.preference_pairs(eval_personas, rollout.max_rounds, seed=config.seed + 1)
    held_out_examples = dpo_training.build_dpo_examples(held_out_pairs, tokenizer, max_length,
                                                        system_prompt=system_prompt)
    # One history per evaluation persona, at turns spread over the dialogue.
    turns = rollout.max_rounds
    held_out_histories = [(persona, held_out_pairs[index * turns + index % turns][0])
                          for index, persona in enumerate(eval_personas)]
    log.info("%d preference pairs from %d dialogues, padded to %d tokens", len(pairs), len(personas),
             examples["tokens"].shape[1])
    # The reference is the starting policy; score the held-out pairs before training donates it.
    held_out_reference = dpo_training.preference_logps(params, model_config, held_out_examples, settings.batch_size,
                                                       mesh)
    data_s = time.perf_counter() - started

    started = time.perf_counter()
    params, history = dpo_training.train_dpo(params, model_config, examples, settings, config.seed, mesh=mesh,
                                             param_shardings=param_shardings(model_config, mesh),
                                             progress=config.logging.progress_bar)
    train_s = time.perf_counter() - started
    held_out_policy = dpo_training.preference_logps(params, model_config, held_out_examples, settings.batch_size, mesh)
    generation = judged_greedy_turns(config, params, model_config, tokenizer, mesh, held_out_histories, system_prompt)

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
        "held_out_reward_accuracy": dpo_training.reward_accuracy(held_out_policy, held_out_reference),
        **generation,
        "data_s": round(data_s, 1),
        "train_s": round(train_s, 1),
    }
    meta = policy_meta(config, model_config) | {"dpo_settings": dataclasses.asdict(settings), "dpo": summary}
    save_policy(config, "dpo", params, meta, history)
    return summary


# --------------------------------------------------------------------------------------------- export


def export_policy(checkpoint: Path, output: Path, step: int | None = None, tokenizer: Path | None = None,
                  dtype: str = "float32", system_prompt: str | None = None) -> Path:
    """A checkpoint's policy as a Hugging Face directory (checkpoint.export_checkpoint) that prompts
    it as training did (dialogue/policy_format.py: the chat template and rlpa_format.json). The
    system prompt is configs/prompts/<system_prompt>.txt, else the one the checkpoint's meta names,
    else rollout.system_prompt's default (said in the log). The policy is restored FSDP-sharded
    over every device of every process (no device holds it all, the processes read their own
    shards together); the export gathers each tensor in turn and process 0 alone writes."""
    directory = checkpoint_directory(checkpoint)
    prompt_name = system_prompt or read_meta(directory, step).get("system_prompt")
    if prompt_name is None:
        prompt_name = RolloutConfig().system_prompt
        log.warning("%s: the checkpoint's meta names no system prompt; the export uses %r (--system-prompt "
                    "names another)", directory, prompt_name)
    prompt = load_prompt(prompt_name)  # a missing prompt fails before the export starts
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    exported = export_checkpoint(directory, output, step, tokenizer, dtype,
                                 shardings_for=lambda model_config: param_shardings(model_config, mesh))
    return add_policy_format(exported, prompt, prompt_name)
