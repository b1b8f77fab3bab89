"""What every launch script does first: readable logs, the config (or a clear exit), the compile cache."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# The tokenizers library warns (and disables its threads) when a process forks after using them;
# the launch scripts never fork, so say so before it is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Libraries that log every file written or request sent at INFO.
CHATTY_LOGGERS = ("absl", "jax._src.xla_bridge", "matplotlib", "httpx", "openai")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def load_config_or_exit(program: str, path: Path | None, overrides: list[str]):
    """The validated config; a bad file or override prints the reason and exits with status 2."""
    from rlpa_jax.config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as error:
        print(f"{program}: {error}", file=sys.stderr)
        sys.exit(2)


def use_compilation_cache(config) -> None:
    """Persist compiled programs under the output directory unless the environment names a cache."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(config.output_dir) / ".jax_cache"))
