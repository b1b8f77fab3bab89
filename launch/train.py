"""Train a policy with RLPA.

    python launch/train.py [arguments]      # installed: rlpa-train [arguments]

The program is rlpa_jax/app/commands/train.py (its --help lists the arguments); this file runs it
from a checkout.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: restart once with glibc keeping big blocks (before the heavy imports)

import sys

from rlpa_jax.app.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
