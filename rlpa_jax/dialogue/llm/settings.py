"""`LLMConfig`: where and how the LLM client calls one model (an OpenAI-compatible endpoint, or a
local Hugging Face checkpoint run in process), with the check of every field (the config tree's LLM
sections map onto it: dialogue/llm/client.py's client_from_section)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlpa_jax.dialogue.llm.limiter import RateLimits
from rlpa_jax.dialogue.llm.usage import Prices


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call one model: `base_url` + `model` on backend "openai"; the Hugging Face
    Qwen2 folder `checkpoint` on backend "local" (base_url unused, `model` only names it)."""

    base_url: str
    model: str
    backend: str = "openai"  # "openai" or "local"
    checkpoint: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 16
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    cache_path: str | None = None
    temperature: float = 0.0
    max_tokens: int = 512
    rpm: float | None = None  # requests per minute for the endpoint (base_url + model); None: no limit
    tpm: float | None = None  # tokens (prompt + completion) per minute; None: no limit
    price_input_per_mtok: float | None = None  # USD per million prompt tokens (for cost metrics)
    price_output_per_mtok: float | None = None  # USD per million completion tokens
    # What "per minute" means to the limiter (llm_limiter.py): tests shrink it to run in seconds.
    limit_window_s: float = 60.0

    @property
    def endpoint(self) -> str:
        """What serves the answers, as the cache and the rate limiter key them: the URL, or
        local:<the checkpoint folder's absolute path>."""
        return f"local:{Path(self.checkpoint).expanduser().resolve()}" if self.backend == "local" else self.base_url

    @property
    def limits(self) -> RateLimits:
        return RateLimits(self.rpm, self.tpm, self.limit_window_s)

    @property
    def prices(self) -> Prices:
        return Prices(self.price_input_per_mtok, self.price_output_per_mtok)

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            raise ValueError("invalid LLMConfig: " + "; ".join(problems))


def config_problems(config: LLMConfig) -> list[str]:
    """Every field of `config` that is out of range, with what would be accepted."""
    problems = []
    if config.backend not in ("openai", "local"):
        problems.append(f"backend={config.backend!r} must be 'openai' or 'local'")
    if config.backend == "local" and not config.checkpoint:
        problems.append("backend='local' needs checkpoint, a Hugging Face Qwen2 folder")
    if config.backend == "openai" and not config.base_url.startswith(("http://", "https://")):
        problems.append(f"base_url={config.base_url!r} must start with http:// or https://")
    if not config.model:
        problems.append("model must be a non-empty model name")
    if not config.api_key_env:
        problems.append("api_key_env must name an environment variable")
    if config.max_concurrency < 1:
        problems.append(f"max_concurrency={config.max_concurrency} must be >= 1")
    if config.timeout_s <= 0:
        problems.append(f"timeout_s={config.timeout_s} must be > 0")
    if config.max_retries < 0:
        problems.append(f"max_retries={config.max_retries} must be >= 0")
    if config.backoff_initial_s < 0 or config.backoff_max_s < 0:
        problems.append(
            f"backoff_initial_s={config.backoff_initial_s} and backoff_max_s={config.backoff_max_s} must be >= 0"
        )
    if config.max_tokens < 1:
        problems.append(f"max_tokens={config.max_tokens} must be >= 1")
    if config.temperature < 0:
        problems.append(f"temperature={config.temperature} must be >= 0")
    for name in ("rpm", "tpm"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            problems.append(f"{name}={value} must be > 0 (or None for no limit)")
    for name in ("price_input_per_mtok", "price_output_per_mtok"):
        value = getattr(config, name)
        if value is not None and value < 0:
            problems.append(f"{name}={value} must be >= 0")
    if config.limit_window_s <= 0:
        problems.append(f"limit_window_s={config.limit_window_s} must be > 0")
    return problems
