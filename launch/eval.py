"""Evaluate a policy with the ALOE protocol: per-turn alignment level AL(k), AVG, N-IR and N-R2.

    python launch/eval.py [arguments]      # installed: rlpa-eval [arguments]

The program is rlpa_jax/app/commands/eval.py (its --help lists the arguments); this file runs it
from a checkout.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: restart once with glibc keeping big blocks (before the heavy imports)

import sys

from rlpa_jax.app.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
