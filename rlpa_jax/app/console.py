"""The installed console commands (pyproject.toml [project.scripts]): rlpa-train, rlpa-eval,
rlpa-sft, rlpa-dpo, rlpa-export and rlpa-serve, each the main of its rlpa_jax/app/commands module.

glibc reads its allocator tunables when a process starts, so each command first restarts itself
with them (runtime/host_allocator.py, CPU only), and only then imports its module, which brings in
jax: the order launch/<name>.py keeps by calling host_allocator.ensure() above its imports. That
restart-then-import is why this is the one module that imports inside functions (tests/test_layers.py
allows it here, for rlpa_jax.app.commands only). rlpa-fetch-model does no XLA work and starts
rlpa_jax.app.commands.fetch_model:main directly, as launch/fetch_model.py does.
"""

from __future__ import annotations

from rlpa_jax.runtime import host_allocator


def train() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import train as command
    return command.main()


def evaluate() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import eval as command
    return command.main()


def sft() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import sft as command
    return command.main()


def dpo() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import dpo as command
    return command.main()


def export() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import export_hf as command
    return command.main()


def serve() -> int:
    host_allocator.ensure()
    from rlpa_jax.app.commands import serve as command
    return command.main()
