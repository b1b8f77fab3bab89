"""Evaluate a policy with the ALOE protocol: per-turn alignment level AL(k), AVG, N-IR and N-R2.

    python launch/eval.py --policy runs/tiny/checkpoints --setting vanilla --users 8
    python launch/eval.py --policy hf:/models/rlpa-3b --setting long_term --config configs/qwen2.5-3b-8gpu.yaml
    python launch/eval.py --policy openai:qwen2.5-3b-instruct --base-url http://127.0.0.1:8000/v1 \\
        --baseline reminder --setting conflict --compare runs/eval/rlpa_conflict.json

--policy is an orbax checkpoint directory (a run's checkpoints/ or sft/, or the run directory),
hf:<directory> (a local Hugging Face Qwen2 checkpoint) or openai:<model> (any OpenAI-compatible
server at --base-url). The config (default configs/tiny.yaml) supplies the personas (data), the
simulated user (user) and the judges (judges); positional key.path=value arguments override it.
Prints a per-turn table, writes <output>/<name>_<setting>.json and a PNG of the AL curves (with
every --compare result on the same figure); long_term also writes a profile-score PNG.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = ("vanilla", "extended", "conflict", "long_term")
BASELINES = ("base", "reminder", "self_critic", "cot", "rag")


class UsageError(ValueError):
    """A command-line choice that cannot work; the message says what would."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True,
                        help="checkpoint directory, hf:<directory> or openai:<model>")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint for openai:<model>")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the key for openai:<model>")
    parser.add_argument("--setting", default="vanilla", choices=SETTINGS)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--baseline", default=None, choices=BASELINES,
                        help="wrap the policy in a prompting baseline (rlpa_jax/eval/baselines.py)")
    parser.add_argument("--turns", type=int, default=None, help="dialogue length (default: 10; 70 for long_term)")
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
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. judges.kind=llm")
    return parser.parse_args(argv)


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "policy"


def build_policy(args: argparse.Namespace, config):
    """The policy named by --policy (and wrapped by --baseline)."""
    from rlpa_jax.eval.policies import ChatPolicy, JaxPolicy

    two_part = args.format == "two_part"
    max_new_tokens = args.max_new_tokens or config.rollout.max_new_tokens
    if args.policy.startswith("openai:"):
        from rlpa_jax.config import LLMSection
        from rlpa_jax.dialogue.chat import load_prompt
        from rlpa_jax.rl.setup import llm_client

        model = args.policy.removeprefix("openai:")
        if not model or not args.base_url:
            raise UsageError("--policy openai:<model> needs a model name and --base-url http://host:port/v1")
        client = llm_client(LLMSection(base_url=args.base_url, model=model, api_key_env=args.api_key_env))
        prompt = load_prompt(args.system_prompt or config.rollout.system_prompt)
        policy = ChatPolicy(client, prompt, args.name or model, two_part, max_tokens=max_new_tokens)
    else:
        jax_options = dict(name=args.name, prompt_name=args.system_prompt, max_new_tokens=max_new_tokens,
                           temperature=args.temperature, two_part=two_part,
                           prompt_buckets=config.rollout.prompt_buckets,
                           max_prompt_tokens=config.rollout.max_prompt_tokens, max_batch_size=args.max_batch_size,
                           seed=config.seed if args.seed is None else args.seed)
        if args.policy.startswith("hf:"):
            jax_options["prompt_name"] = args.system_prompt or config.rollout.system_prompt
            policy = JaxPolicy.from_hf(args.policy.removeprefix("hf:"), **jax_options)
        else:
            policy = JaxPolicy.from_checkpoint(args.policy, args.step,
                                               fallback_prompt_name=config.rollout.system_prompt, **jax_options)
    if args.baseline:
        policy = wrap_baseline(args.baseline, policy)
    return policy


def wrap_baseline(kind: str, policy):
    try:
        from rlpa_jax.eval import baselines
    except ModuleNotFoundError as error:
        if error.name != "rlpa_jax.eval.baselines":
            raise
        raise UsageError(f"--baseline {kind}: rlpa_jax/eval/baselines.py does not exist yet; "
                         "run without --baseline to evaluate the policy as it is") from None
    return baselines.make_baseline(kind, policy)


def format_number(value, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(results: list[dict]) -> str:
    """Turns as rows and runs as columns (a 70-turn run stays readable), then the summary rows."""
    names = [f"{r['name']} [{r['setting']}]" for r in results]
    width = max(10, *(len(name) for name in names)) + 2
    lines = ["turn".ljust(8) + "".join(name.rjust(width) for name in names)]
    turns = max(len(r["al"]["AL"]) for r in results)
    for k in range(turns):
        cells = [format_number(r["al"]["AL"][k], 2) if k < len(r["al"]["AL"]) else "" for r in results]
        lines.append(f"AL({k + 1})".ljust(8) + "".join(cell.rjust(width) for cell in cells))
    lines.append("-" * (8 + width * len(results)))
    for key, digits in (("AVG", 2), ("N-IR", 3), ("N-R2", 3)):
        lines.append(key.ljust(8) + "".join(format_number(r["al"][key], digits).rjust(width) for r in results))
    lines.append("users".ljust(8) + "".join(str(r["al"].get("users", "?")).rjust(width) for r in results))
    lines.append("unscored".ljust(8) + "".join(str(sum(r["al"].get("unscored", []))).rjust(width) for r in results))
    for r in results:
        for check in r.get("profile_scores") or []:
            lines.append(f"{r['name']}: profile F1x100 at turn {check['turn']}: {format_number(check['score'], 2)} "
                         f"(ceiling {format_number(check.get('ceiling'), 2)}, "
                         f"items revealed {format_number(check.get('revealed_share'), 2)}%)")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace, config) -> int:
    from rlpa_jax.eval.plots import plot_al_curves, plot_profile_scores
    from rlpa_jax.eval.protocol import EvalResult, run_protocol
    from rlpa_jax.rl import setup

    compared = [EvalResult.load(path) for path in args.compare]  # fail early, before the long run
    policy = build_policy(args, config)
    pool = setup.build_personas(config, "eval")
    personas = pool
    if args.users is not None:
        if args.users < 1:
            raise UsageError(f"--users must be >= 1, got {args.users}")
        personas = pool[: args.users]
    user_sim = setup.build_user(config)
    profile_judge, response_judge = setup.build_judges(config)
    result = run_protocol(policy, personas, user_sim, response_judge, args.turns, args.setting, profile_judge,
                          config.seed if args.seed is None else args.seed, partner_pool=pool,
                          progress=not args.no_progress)

    stem = f"{file_slug(result.name)}_{args.setting}"
    json_path = result.save(args.output / f"{stem}.json")
    everything = [result, *compared]
    png_path = plot_al_curves(everything, args.output / f"{stem}.png")
    print(format_table([r.to_json() for r in everything]))
    print(f"result: {json_path}\nfigure: {png_path}")
    if any(r.profile_scores for r in everything):
        print(f"profile figure: {plot_profile_scores(everything, args.output / f'{stem}_profile.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rlpa_jax import cli

    cli.setup_logging()
    config = cli.load_config_or_exit("eval.py", args.config, args.overrides)
    cli.use_compilation_cache(config)
    from rlpa_jax.model.hf import CheckpointError

    try:
        return evaluate(args, config)
    except (UsageError, CheckpointError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"eval.py: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
