"""Fetch the real Qwen2.5-Coder-0.5B-Instruct and convert it into a Hugging Face folder.

    python launch/fetch_model.py [arguments]      # installed: rlpa-fetch-model [arguments]

The program is rlpa_jax/app/commands/fetch_model.py (its --help lists the arguments); this file runs it
from a checkout.
"""

from __future__ import annotations

import sys

from rlpa_jax.app.commands.fetch_model import main

if __name__ == "__main__":
    sys.exit(main())
