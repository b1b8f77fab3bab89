"""Prompt tokens prefilled with and without prefix (KV-cache) reuse across dialogue turns.

Counts, not timings: the PrefixSampler's counters say how many prompt tokens each call ran
through the model (the suffixes after the kept prefixes) against what a full prefill runs
(every prompt token), and the same in padded slots (rows x suffix block against rows x bucketed
prompt length). Two workloads on the embedded world (configs/tiny.yaml, built by the project's
builders, the SFT warm start included):

- rollout: `--iterations` PPO iterations (rollout and update) with rollout.max_rounds=10;
  with `--check`, each iteration's rollout is first rerun with full prefills on the same
  conversations, parameters and key, and must sample the same texts (exit status 1 otherwise);
- long_term: the ALOE protocol's 70-turn long-term setting (profile checks every 10 turns) with
  the warm-started policy as a greedy JaxPolicy, through the trainer's generation engine.

    .venv/bin/python benchmarks/prefix_reuse.py                     # ~10 min on 2 shared cores
    .venv/bin/python benchmarks/prefix_reuse.py --users 8 --iterations 1 --sft-steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections import Counter

import jax

from rlpa_jax.app.build import build_personas, build_trainer, load_config
from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.eval.policies import JaxPolicy
from rlpa_jax.eval.protocol import run_protocol
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.rl.rollout import Rollout


def row(label: str, counts: Counter) -> str:
    saved = 1 - counts["prefilled_tokens"] / max(counts["full_tokens"], 1)
    saved_slots = 1 - counts["prefilled_slots"] / max(counts["full_slots"], 1)
    return (f"| {label} | {counts['rows']} | {counts['reused_rows']} | {counts['full_tokens']} | "
            f"{counts['prefilled_tokens']} | {saved:.0%} | {counts['full_slots']} | {counts['prefilled_slots']} | "
            f"{saved_slots:.0%} |")


def full_prefill_engine(trainer) -> GenerationEngine:
    """The trainer's engine without the prefix cache (the same model, mesh, layout and buckets)."""
    engine = trainer.engine
    return GenerationEngine(engine.model_config, engine.stop_ids, engine.pad_id, mesh=engine.mesh,
                            layout=engine.layout.layout, prompt_buckets=engine.prompt_buckets)


def rollout_counts(trainer, params, iterations: int, check: bool) -> tuple[Counter, bool]:
    """Reuse counts over the rollouts of the first `iterations` iterations' conversations, and
    whether full prefills sampled the same texts."""
    config = trainer.config
    full_engine = full_prefill_engine(trainer)
    full_prefill = Rollout(trainer.parts.environment, full_engine, trainer.sampling, config.rollout.max_rounds,
                           config.rollout.pipeline_groups)
    trainer.engine.sync(params)
    full_engine.sync(params)
    same = True
    start = Counter(trainer.engine.prefix_sampler.counts)
    for iteration in range(iterations):
        key = jax.random.fold_in(jax.random.key(config.seed), iteration)  # the key trainer.iteration uses
        reused = trainer.rollout.run(trainer.conversations(iteration), key)
        if check:
            full = full_prefill.run(trainer.conversations(iteration), key)
            same &= [s.text for s in reused.samples] == [s.text for s in full.samples]
        print(f"rollout {iteration}: {len(reused.samples)} samples, prompt tokens {reused.stats['prompt_tokens']:.0f}, "
              f"prefilled {reused.stats['prefilled_tokens']:.0f}"
              + (f", same texts as full prefills: {same}" if check else ""), flush=True)
    return trainer.engine.prefix_sampler.counts - start, same


def long_term_counts(trainer, params, users: int, turns: int, check: bool,
                     max_prompt_tokens: int) -> tuple[Counter, bool]:
    """Reuse counts over a greedy long-term evaluation, and whether full prefills gave the same dialogues."""
    config, environment = trainer.config, trainer.parts.environment
    personas = build_personas(config, "eval")[:users]
    results = []
    full_engine = full_prefill_engine(trainer)
    for engine in (trainer.engine, full_engine) if check else (trainer.engine,):
        engine.sync(params)
        policy = JaxPolicy(engine, environment.tokenizer, load_prompt(config.rollout.system_prompt), "warm-start",
                           config.rollout.max_new_tokens, 0.0, max_prompt_tokens=max_prompt_tokens)
        before = Counter(trainer.engine.prefix_sampler.counts)
        results.append(run_protocol(policy, personas, environment.user_sim, environment.response_judge, turns,
                                    "long_term", environment.profile_judge, seed=config.seed))
        if engine is trainer.engine:
            counts = trainer.engine.prefix_sampler.counts - before
        scores = [entry["score"] and round(entry["score"], 1) for entry in results[-1].profile_scores or []]
        print(f"long_term ({'reuse' if engine.keeps_prefixes else 'full prefill'}): profile scores {scores}", flush=True)
    same = len(results) == 1 or results[0].transcripts == results[1].transcripts
    return counts, same


HEADER = ("| workload | prompts | prompts continuing | prompt tokens (full prefill) | prefilled with reuse | saved "
          "| padded slots (full) | padded slots (reuse) | saved |\n|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=2, help="rollouts (each iteration's conversations)")
    parser.add_argument("--rounds", type=int, default=10, help="rollout.max_rounds")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--users", type=int, default=16, help="long-term evaluation dialogues")
    parser.add_argument("--turns", type=int, default=70)
    parser.add_argument("--untruncated", type=int, default=0, metavar="TOKENS",
                        help="also count both workloads with rollout.max_prompt_tokens raised to TOKENS")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the reruns with full prefills (same texts expected)")
    args = parser.parse_args()

    overrides = [f"rollout.max_rounds={args.rounds}", "rollout.prefix_cache=true",
                 f"output_dir={tempfile.mkdtemp(prefix='prefix_reuse_')}"]
    if args.sft_steps is not None:
        overrides.append(f"sft.steps={args.sft_steps}")
    config = load_config(args.config, overrides)
    trainer = build_trainer(config)
    state = trainer.initial_state()  # the SFT warm start; rollouts and evaluation sample this policy
    params = state.actor.params

    rollout, rollout_same = rollout_counts(trainer, params, args.iterations, args.check)
    long_term, long_term_same = long_term_counts(trainer, params, args.users, args.turns, args.check,
                                                 config.rollout.max_prompt_tokens)
    limit = config.rollout.max_prompt_tokens
    rows = [row(f"rollout: {config.rollout.conversations} conversations x {args.rounds} rounds x {args.iterations}, "
                f"max_prompt_tokens={limit}", rollout),
            row(f"long_term evaluation: {args.users} users x {args.turns} turns (greedy), max_prompt_tokens={limit}",
                long_term)]
    if args.untruncated:
        # The same policy with longer prompts allowed: histories are cut (oldest exchange first) later.
        config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, max_prompt_tokens=args.untruncated))
        trainer.config, trainer.parts.environment.max_prompt_tokens = config, args.untruncated
        rollout, _ = rollout_counts(trainer, params, args.iterations, False)
        long_term, _ = long_term_counts(trainer, params, args.users, args.turns, False, args.untruncated)
        rows += [row(f"rollout, as above, max_prompt_tokens={args.untruncated}", rollout),
                 row(f"long_term evaluation, as above, max_prompt_tokens={args.untruncated}", long_term)]
    print()
    print(HEADER)
    print("\n".join(rows))
    print(f"\nprefix sampler programs compiled: {trainer.engine.prefix_sampler.compile_count}")
    if not (rollout_same and long_term_same):
        print(f"MISMATCH: full prefills sampled other texts (rollout same: {rollout_same}, "
              f"long_term same: {long_term_same})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
