"""Test-wide setup: 8 fake CPU devices, the persistent compilation cache, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens here at import.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def aloe_dir() -> Path:
    """The shared ALOE persona pool (never copied into the repo); tests skip when it is absent."""
    path = REPO.parent / "shared" / "data" / "aloe"
    if not path.is_dir():
        pytest.skip(f"ALOE data not found at {path}")
    return path
