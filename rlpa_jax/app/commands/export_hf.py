"""Export a trained policy to a Hugging Face directory (loads with AutoModelForCausalLM).

    python launch/export_hf.py --checkpoint runs/tiny/checkpoints --output exported/
    python launch/export_hf.py --checkpoint runs/tiny/checkpoints --step 40 --dtype bfloat16 --output out/

Installed as a package (README "Install as a package"), `rlpa-export` takes the same arguments.

The checkpoint's meta names the model config, the tokenizer directory and the system prompt;
--tokenizer and --system-prompt override them. The folder prompts the policy as training did: its
chat template puts the training system prompt first when a conversation has none, and
rlpa_format.json records the prompt and the <profile>/<response> turn format
(rlpa_jax/dialogue/policy_format.py). --dtype bfloat16 halves the weights' size.
Runs as several processes too (README "Several hosts"): all restore the checkpoint together, each
its own shards, and process 0 writes the directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlpa_jax.app import cli, jobs
from rlpa_jax.runtime import multihost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory, its checkpoints/ or sft/ (orbax steps)")
    parser.add_argument("--output", type=Path, required=True, help="directory to write the HF model to")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory to copy files from")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the weights' dtype (config.json says the same)")
    parser.add_argument("--system-prompt", default=None,
                        help="a prompt under configs/prompts/ (without .txt; default: the checkpoint's own)")
    args = parser.parse_args(argv)
    cli.start("export_hf.py")
    cli.agree_or_exit("export_hf.py", {"arguments": vars(args)})
    out = cli.run_or_exit("export_hf.py", lambda: jobs.export_policy(args.checkpoint, args.output, args.step,
                                                                      args.tokenizer, args.dtype,
                                                                      args.system_prompt),
                          (FileNotFoundError, KeyError, ValueError), status=2)
    if multihost.is_main_process():  # the one that wrote it
        print(f"exported to {out}")
    return 0

