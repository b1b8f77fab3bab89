"""What the start-up memory check compiles for a training run (rl/memory_check.py): an iteration's
largest programs, lowered (never run) for abstract arguments with the run's shapes and shardings,
each with what stays resident beside it and the settings that shrink it."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from rlpa_jax.config.tree import PPOConfig, RolloutConfig
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams, bucket
from rlpa_jax.model.qwen2 import Qwen2Config
from rlpa_jax.rl import memory_check
from rlpa_jax.rl.experience import FIELD_AXES, RESPONSE, ROW, Experience, ExperienceBuilder
from rlpa_jax.rl.train_state import TrainState
from rlpa_jax.runtime import parallel
from rlpa_jax.training.updater import Updater


@dataclasses.dataclass(frozen=True)
class SamplerSetup:
    """The rollout's sampler as the memory check lowers it."""

    engine: GenerationEngine  # its sampler, the actor's layout while sampling, its rows per device
    sampling: SamplingParams
    # rollout.prefix_cache on the `conversation` schedule: prompt caches live across turns.
    keeps_prompt_caches: bool


def iteration_programs(rollout: RolloutConfig, ppo: PPOConfig, mesh: Mesh, model_config: Qwen2Config,
                       state: TrainState, sampler: SamplerSetup, build_experience: ExperienceBuilder,
                       actor_updater: Updater, critic_updater: Updater | None) -> list[memory_check.Program]:
    """A run's largest programs, lowered for `state` (abstract: shapes, dtypes, shardings): a
    sampler call at the longest prompt bucket, the weight sync's programs (where the sampler reads
    a copy), a scoring chunk and the actor's (and, with a critic updater, the critic's)
    micro-batch step at the widest packed row."""
    r, p = rollout, ppo
    resident = memory_check.per_device_bytes(state)  # no critic in a state without one
    actor = state.actor.params
    prompt = bucket(r.max_prompt_tokens, r.prompt_buckets)
    calls = math.ceil(r.conversations / r.pipeline_groups)
    prompts = (-(-calls // sampler.engine.placement.row_multiple) * sampler.engine.placement.row_multiple, prompt)
    sampler_params = sampler.engine.layout.abstract(actor)  # per-layer copy, or the actor's own (training)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    # A resharded copy is the program's argument while the training state stays resident.
    beside_sampler = resident if sampler_params is not actor else resident - memory_check.per_device_bytes(actor)
    if sampler.keeps_prompt_caches:
        # rollout.prefix_cache: every pipeline group keeps its last prompt cache across turns, and
        # a call's new one is made while its group's old one is still held: groups + 1 caches.
        beside_sampler += memory_check.kept_prompt_cache_bytes(model_config, mesh, prompts[0], prompt,
                                                               r.pipeline_groups + 1)
    programs = [memory_check.Program(
        "sampler", sampler.engine.lower(actor, memory_check.rows(mesh, prompts, np.int32),
                                       memory_check.rows(mesh, prompts, np.bool_), key, sampler.sampling),
        beside_sampler,
        "Lower rollout.conversations / raise rollout.pipeline_groups (rows per sampler call), lower "
        "rollout.max_prompt_tokens or rollout.max_new_tokens, or set rollout.layout=tensor on a tensor mesh.")]
    # The weight sync (generation/layout.py) writes the copy a program at a time while the training
    # state stays resident; at its last program all of the copy but that program's part is held.
    copy_bytes = memory_check.per_device_bytes(sampler_params) if sampler_params is not actor else 0
    for sync in sampler.engine.layout.lower_sync(actor):
        programs.append(memory_check.Program(
            f"weight sync ({sync.name})", sync.lowered,
            resident - memory_check.per_device_bytes(sync.arguments) + copy_bytes
            - memory_check.per_device_bytes(sync.outputs),
            "Set rollout.layout=tensor on a tensor mesh (a smaller copy), or rollout.layout=training (no copy)."))
    width = (p.micro_batch_size, prompt + r.max_new_tokens)
    response = (p.micro_batch_size, r.max_new_tokens)
    tokens, mask = memory_check.rows(mesh, width, np.int32), memory_check.rows(mesh, width, np.bool_)
    programs.append(memory_check.Program(
        "scoring forward", build_experience.forwards.lower(actor, tokens, mask, r.max_new_tokens),
        resident - memory_check.per_device_bytes(actor), "Lower ppo.micro_batch_size (rows per scoring chunk)."))
    update_fields = set(build_experience.update_fields)
    actor_fields = {"old_logprobs", "advantages", "reference_logprobs", "kl_coef"} & update_fields
    updaters = [("actor", actor_updater, state.actor, actor_fields)]
    if critic_updater is not None:
        updaters.append(("critic", critic_updater, state.critic, {"old_values", "returns"}))
    shapes = {RESPONSE: response, ROW: response[:1]}
    for name, updater, trainable, fields in updaters:
        micro = Experience(tokens=tokens, attention_mask=mask, response_mask=memory_check.rows(mesh, response, np.bool_),
                           **{f: memory_check.rows(mesh, shapes[FIELD_AXES[f]], np.float32) for f in fields})
        accumulate, _ = updater.lower(trainable, micro)
        programs.append(memory_check.Program(
            f"{name} micro-batch step", accumulate, resident - memory_check.per_device_bytes(trainable.params),
            "Lower ppo.micro_batch_size, or set model.remat=full (recompute activations in the backward)."))
    return programs
