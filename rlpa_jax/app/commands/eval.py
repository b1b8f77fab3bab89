"""Evaluate a policy with the ALOE protocol: per-turn alignment level AL(k), AVG, N-IR and N-R2.

    python launch/eval.py --policy runs/tiny/checkpoints --setting vanilla --users 8
    python launch/eval.py --policy hf:/models/rlpa-3b --setting long_term --config configs/qwen2.5-3b-8gpu.yaml
    python launch/eval.py --policy openai:qwen2.5-3b-instruct --base-url http://127.0.0.1:8000/v1 \\
        --baseline reminder --setting conflict --compare runs/eval/rlpa_conflict.json

Installed as a package (README "Install as a package"), `rlpa-eval` takes the same arguments.

--policy is an orbax checkpoint directory (a run's checkpoints/ or sft/, or the run directory),
hf:<directory> (a local Hugging Face Qwen2 checkpoint) or openai:<model> (any OpenAI-compatible
server at --base-url). The config (default configs/tiny.yaml) supplies the personas (data), the
simulated user (user) and the judges (judges.kind, on the evaluation's endpoint eval.judge.llm);
positional key.path=value arguments override it. Per-role LLM calls, latency, tokens and cost
go to <output>/<name>_<setting>_llm.json.
Prints a per-turn table, writes <output>/<name>_<setting>.json and a PNG of the AL curves (with
every --compare result on the same figure); long_term also writes a profile-score PNG.

Our model samples on the config's mesh (mesh.*, in rollout.layout, as launch/train.py does). Started
as several processes (jax.distributed, README "Several hosts"; the same command on every host),
each process plays only its share of the users: for our model those whose sampler rows land on its
devices (every sampler call is a global program that every process makes, in the same order, each
filling and reading back only its own rows), for openai:<model> a contiguous block. Each makes the
simulated-user and judge calls of its own users only; the transcripts are exchanged at the end, so
the result equals a one-process run's (exactly while every dialogue lasts; a sampled, temperature
> 0 evaluation whose user fails mid-run draws differently afterwards). rollout.prefix_cache is
off then (the same tokens). Process 0 alone prints and writes the JSON, the figures and the LLM
usage (each process's own, and their sums).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlpa_jax.app import build, cli, eval_policy
from rlpa_jax.dialogue import users
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.usage import LLMMeter, processes_metrics, progress_postfix
from rlpa_jax.eval.baselines import BASELINES
from rlpa_jax.eval.plots import plot_al_curves, plot_profile_scores
from rlpa_jax.eval.protocol import run_protocol
from rlpa_jax.eval.report import file_slug, format_table
from rlpa_jax.eval.result import EvalResult
from rlpa_jax.eval.settings import EVAL_SETTINGS
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.runtime import multihost


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="checkpoint directory, hf:<directory> or openai:<model> "
                                         "(required unless --print-config)")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint for openai:<model>")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the key for openai:<model>")
    parser.add_argument("--setting", default="vanilla", choices=list(EVAL_SETTINGS),
                        help="; ".join(f"{name}: {setting.description}" for name, setting in EVAL_SETTINGS.items()))
    parser.add_argument("--baseline", default=None, choices=list(BASELINES),
                        help="wrap the policy in a prompting baseline (rlpa_jax/eval/baselines.py)")
    parser.add_argument("--turns", type=int, default=None,
                        help="dialogue length (default: the setting's, " + ", ".join(
                            f"{name} {setting.turns}" for name, setting in EVAL_SETTINGS.items()) + ")")
    parser.add_argument("--users", type=int, default=None, help="evaluate the first N personas (default: all)")
    parser.add_argument("--output", type=Path, default=Path("runs/eval"), help="directory for the JSON and PNGs")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="earlier result JSONs to show alongside")
    parser.add_argument("--name", default=None, help="name of this run in tables, legends and file names")
    parser.add_argument("--system-prompt", default=None,
                        help="prompt name under configs/prompts/ "
                             "(default: the checkpoint's, else rollout.system_prompt)")
    parser.add_argument("--format", default="two_part", choices=("two_part", "plain"),
                        help="two_part: <profile>/<response> turns (only the response is shown); plain: chat text")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the protocol's default)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="our model: conversations per sampler call (default: all in one call)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_config_arguments(parser, "judges.kind=llm")
    args = parser.parse_args(argv)
    if args.policy is None and not args.print_config:  # printing the config needs no policy
        parser.error("the following arguments are required: --policy")
    return args


def evaluate(args: argparse.Namespace, config) -> int:
    compared = [EvalResult.load(path) for path in args.compare]  # fail early, before the long run
    if args.users is not None and args.users < 1:
        raise ValueError(f"--users must be >= 1, got {args.users}")
    spec = eval_policy.PolicySpec(args.policy, args.base_url, args.api_key_env, args.format == "two_part",
                                  args.max_new_tokens, args.name, args.system_prompt, args.temperature,
                                  args.max_batch_size, args.seed, args.step, args.baseline)
    policy = eval_policy.build_eval_policy(spec, config)
    pool = build.build_personas(config, "eval")
    personas = pool[: args.users] if args.users is not None else pool
    user_sim = users.build_user(config.user)
    profile_judge, response_judge = build.build_eval_judges(config)  # on eval.judge.llm (the paper: GPT-4o)
    stages = {"user": user_sim, "eval_judge": response_judge, "eval_profile_judge": profile_judge}
    meter = LLMMeter({role: stage.client for role, stage in stages.items()
                      if isinstance(getattr(stage, "client", None), LLMClient)})
    result = run_protocol(policy, personas, user_sim, response_judge, args.turns, args.setting, profile_judge,
                          config.seed if args.seed is None else args.seed, partner_pool=pool,
                          progress=not args.no_progress)

    # Every process's LLM usage (a collective, before process 0 alone goes on to write).
    every_llm = multihost.allgather_json(meter.totals()) if meter.clients else []
    if not multihost.is_main_process():
        return 0
    stem = f"{file_slug(result.name)}_{args.setting}"
    json_path = result.save(args.output / f"{stem}.json")
    everything = [result, *compared]
    png_path = plot_al_curves(everything, args.output / f"{stem}.png")
    print(format_table(everything))
    print(f"result: {json_path}\nfigure: {png_path}")
    if meter.clients:
        llm_totals = every_llm[0] if len(every_llm) == 1 else processes_metrics(every_llm)
        llm_path = write_json(args.output / f"{stem}_llm.json", llm_totals)
        print(f"LLM: {progress_postfix(llm_totals, meter.clients)} (per role: {llm_path})")
    if any(r.profile_scores for r in everything):
        print(f"profile figure: {plot_profile_scores(everything, args.output / f'{stem}_profile.png')}")
    return 0


def write_json(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arguments = {k: v for k, v in vars(args).items() if k not in ("config", "overrides")}
    config = cli.start_with_config("eval.py", args.config, args.overrides, arguments, job="eval",
                                   print_config=args.print_config)
    return cli.run_or_exit("eval.py", lambda: evaluate(args, config),
                           (CheckpointError, FileNotFoundError, KeyError, ValueError), status=2)

