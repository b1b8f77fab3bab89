"""The policy an ALOE evaluation runs (launch/eval.py's --policy and its flags), built from the
config: an orbax checkpoint directory, hf:<folder or .gguf> or openai:<model> behind an
OpenAI-compatible endpoint, optionally wrapped in a prompting baseline."""

from __future__ import annotations

import dataclasses

from rlpa_jax.app.build import build_mesh
from rlpa_jax.config.llm_sections import LLMSection
from rlpa_jax.config.tree import TrainConfig
from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.llm.client import client_from_section
from rlpa_jax.eval import baselines
from rlpa_jax.eval.policies import ChatPolicy, JaxPolicy, Policy


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """The policy an ALOE evaluation runs (launch/eval.py's flags): `source` is an orbax checkpoint
    directory, hf:<directory> or openai:<model>; None settings fall back to the config."""

    source: str
    base_url: str | None = None  # openai:<model> only
    api_key_env: str = "OPENAI_API_KEY"
    two_part: bool = True  # <profile>/<response> turns; False: plain chat text
    max_new_tokens: int | None = None
    name: str | None = None
    system_prompt: str | None = None
    temperature: float = 0.0
    max_batch_size: int | None = None
    seed: int | None = None
    step: int | None = None
    baseline: str | None = None  # a prompting baseline around the policy (eval/baselines.py)


def build_eval_policy(spec: PolicySpec, config: TrainConfig) -> Policy:
    max_new_tokens = spec.max_new_tokens or config.rollout.max_new_tokens
    if spec.source.startswith("openai:"):
        model = spec.source.removeprefix("openai:")
        if not model or not spec.base_url:
            raise ValueError("--policy openai:<model> needs a model name and --base-url http://host:port/v1")
        client = client_from_section(LLMSection(base_url=spec.base_url, model=model, api_key_env=spec.api_key_env,
                                                max_concurrency=32), "--base-url")
        prompt = load_prompt(spec.system_prompt or config.rollout.system_prompt)
        policy = ChatPolicy(client, prompt, spec.name or model, spec.two_part, max_tokens=max_new_tokens)
    else:
        options = dict(name=spec.name, prompt_name=spec.system_prompt, max_new_tokens=max_new_tokens,
                       temperature=spec.temperature, two_part=spec.two_part, prompt_buckets=config.rollout.prompt_buckets,
                       max_prompt_tokens=config.rollout.max_prompt_tokens, max_batch_size=spec.max_batch_size,
                       seed=config.seed if spec.seed is None else spec.seed, generator_kind=config.rollout.generator,
                       prefix_cache=config.rollout.prefix_cache,
                       # On the config's mesh, in the rollout's sampling layout, as launch/train.py
                       # samples: a call's rows split over every device (of every process).
                       mesh=build_mesh(config), layout=config.rollout.layout)
        if spec.source.startswith("hf:"):
            options["prompt_name"] = spec.system_prompt or config.rollout.system_prompt
            policy = JaxPolicy.from_hf(spec.source.removeprefix("hf:"), **options)
        else:
            policy = JaxPolicy.from_checkpoint(spec.source, spec.step, fallback_prompt_name=config.rollout.system_prompt,
                                               **options)
    return baselines.make_baseline(spec.baseline, policy) if spec.baseline else policy
