"""The LLM endpoint sections of the config: one role's model (an OpenAI-compatible endpoint, or a
local Hugging Face checkpoint run in process), the shared top-level default, and the rule by which
a role inherits every field it leaves unset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rlpa_jax.config.options import count, http_url, non_negative, option, positive, section


@dataclass(frozen=True)
class LLMSection:
    """One role's model: `backend: openai` (the default) calls an OpenAI-compatible endpoint
    (OpenAI, DeepSeek, vLLM, SGLang, launch/serve.py) with the key from the env var `api_key_env`;
    `backend: local` samples the Hugging Face Qwen2 folder `checkpoint` in process (no HTTP; roles
    on one folder share its weights). A field left unset (null) inherits from the section above it
    (LLM_PARENTS: user.llm and judges.llm from llm; both judges and eval.judge from judges.llm)."""

    backend: Literal["openai", "local"] | None = option(
        None, doc="openai: an OpenAI-compatible endpoint (base_url); local: the Hugging Face folder `checkpoint` "
                  "sampled in process")
    checkpoint: str | None = option(None, doc="backend local: the Hugging Face Qwen2 folder (config.json, weights, "
                                              "tokenizer)")
    base_url: str | None = option(None, http_url, doc="backend openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str | None = option(None, doc="the model name sent with each request")
    api_key_env: str | None = option(None, doc="the environment variable that holds the API key")
    # backend local: the most of them in one generation call
    max_concurrency: int | None = option(None, count, doc="this role's requests in flight at once")
    # Null: 0.0 (greedy) and 512 (the simulated user: 160). The official RLPA code sends neither, so
    # the API's defaults apply there (OpenAI: temperature 1).
    temperature: float | None = option(None, non_negative, doc="sampling temperature of this role's requests; "
                                                               "null: 0 (greedy)")
    max_tokens: int | None = option(None, count, doc="completion tokens per request; null: 512 (the simulated "
                                                     "user: 160)")
    timeout_s: float | None = option(None, positive, doc="seconds one request may take")
    max_retries: int | None = option(None, non_negative, doc="retries of a failed request (with backoff)")
    cache_path: str | None = option(None, doc="JSONL answer cache: a rerun never pays for the same request twice; null: no cache")
    # Shared by every role on the same endpoint (base_url + model).
    rpm: float | None = option(None, positive, doc="the endpoint's requests per minute; null: no limit")
    tpm: float | None = option(None, positive, doc="the endpoint's tokens per minute; null: no limit")
    price_input_per_mtok: float | None = option(None, non_negative, doc="USD per million prompt tokens (cost "
                                                                        "metrics)")
    price_output_per_mtok: float | None = option(None, non_negative, doc="USD per million completion tokens (cost "
                                                                         "metrics)")


@dataclass(frozen=True)
class SharedLLMSection(LLMSection):
    """The top-level `llm` section every role inherits from; no base_url (or checkpoint) by default,
    so a role that talks to an LLM must be given one (here, or in its own section)."""

    backend: Literal["openai", "local"] | None = "openai"
    model: str | None = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int | None = option(32, count)
    timeout_s: float | None = option(60.0, positive)
    max_retries: int | None = option(4, non_negative)


@dataclass(frozen=True)
class LLMRoleSection:
    """A role's own endpoint section (judges.profile, judges.response, eval.judge)."""

    llm: LLMSection = section(LLMSection, doc="the role's endpoint; unset fields inherit the judges' or llm's")


def inherited(section: LLMSection, parent: LLMSection) -> LLMSection:
    """`section` with every unset field taken from `parent`."""
    return dataclasses.replace(section, **{f.name: getattr(parent, f.name) for f in dataclasses.fields(LLMSection)
                                           if getattr(section, f.name) is None})


# LLM sections: each role's endpoint inherits, field by field, from the section above it

# child -> parent, parents listed before their children
LLM_PARENTS = {"user.llm": "llm", "judges.llm": "llm", "judges.profile.llm": "judges.llm",
               "judges.response.llm": "judges.llm", "eval.judge.llm": "judges.llm"}
# The roles that call an LLM, with their sections (metrics are named llm/<role>/...).
LLM_ROLES = {"user": "user.llm", "profile_judge": "judges.profile.llm", "response_judge": "judges.response.llm",
             "eval_judge": "eval.judge.llm"}


def section_at(config, key: str):
    for name in key.split("."):
        config = getattr(config, name)
    return config


def replaced_at(config, key: str, section):
    """`config` with the section at dotted `key` replaced by `section` (each section on the way a new copy)."""
    name, _, rest = key.partition(".")
    return dataclasses.replace(config, **{name: replaced_at(getattr(config, name), rest, section) if rest else section})


def with_inherited_llm_sections(config):
    """`config` with every role's unset LLM fields filled from its parents (a new config; the input
    is left as it is), so each section is the endpoint its role really uses (and the run's saved
    config.yaml says so)."""
    for child, parent in LLM_PARENTS.items():  # parents first: a child inherits what they inherited
        config = replaced_at(config, child, inherited(section_at(config, child), section_at(config, parent)))
    return config
