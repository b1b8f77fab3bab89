"""Supervised warm start alone: scripted teacher dialogues -> SFT -> an orbax checkpoint of the policy.

    python launch/sft.py [arguments]      # installed: rlpa-sft [arguments]

The program is rlpa_jax/app/commands/sft.py (its --help lists the arguments); this file runs it
from a checkout.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: restart once with glibc keeping big blocks (before the heavy imports)

import sys

from rlpa_jax.app.commands.sft import main

if __name__ == "__main__":
    sys.exit(main())
