"""Export a trained policy to a Hugging Face directory (loads with AutoModelForCausalLM).

    python launch/export_hf.py [arguments]      # installed: rlpa-export [arguments]

The program is rlpa_jax/app/commands/export_hf.py (its --help lists the arguments); this file runs it
from a checkout.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: restart once with glibc keeping big blocks (before the heavy imports)

import sys

from rlpa_jax.app.commands.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
