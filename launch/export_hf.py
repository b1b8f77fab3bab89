"""Export a trained policy to a Hugging Face directory (loads with AutoModelForCausalLM).

    python launch/export_hf.py --checkpoint runs/tiny/checkpoints --output exported/
    python launch/export_hf.py --checkpoint runs/tiny/checkpoints --step 40 --dtype bfloat16 --output out/

The checkpoint's meta names the model config and tokenizer directory; --tokenizer overrides it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlpa_jax import cli
from rlpa_jax.checkpoint import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory, its checkpoints/ or sft/ (orbax steps)")
    parser.add_argument("--output", type=Path, required=True, help="directory to write the HF model to")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory to copy files from")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    cli.start("export_hf.py")
    cli.agree_or_exit("export_hf.py", {"arguments": vars(args)})
    cli.single_process_only("export_hf.py", "it reads a checkpoint and writes one directory: run it on one host")
    out = cli.run_or_exit("export_hf.py", lambda: export_checkpoint(args.checkpoint, args.output, args.step,
                                                                     args.tokenizer, args.dtype),
                          (FileNotFoundError, KeyError, ValueError), status=2)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
