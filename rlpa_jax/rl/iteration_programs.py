"""What the start-up memory check compiles for a Trainer (rl/memory_check.py): an iteration's
largest programs, lowered (never run) for abstract arguments with the run's shapes and shardings,
each with what stays resident beside it and the settings that shrink it."""

from __future__ import annotations

import math

import jax
import numpy as np

from rlpa_jax.generation.sampler import bucket
from rlpa_jax.rl import memory_check
from rlpa_jax.rl.experience import FIELD_AXES, RESPONSE, ROW, Experience
from rlpa_jax.runtime import parallel


def iteration_programs(trainer) -> list[memory_check.Program]:
    """A rl.trainer.Trainer's largest programs, lowered for abstract arguments with its shapes and
    shardings: a sampler call at the longest prompt bucket, a scoring chunk and the actor's (and
    critic's) micro-batch step at the widest packed row."""
    r, p, mesh = trainer.config.rollout, trainer.config.ppo, trainer.mesh
    state = trainer.abstract_state()  # the critic too: the state holds one even when no estimator trains it
    resident = memory_check.per_device_bytes(state)
    actor = state["actor"].params
    prompt = bucket(r.max_prompt_tokens, r.prompt_buckets)
    calls = math.ceil(r.conversations / r.pipeline_groups)
    prompts = (-(-calls // trainer.row_multiple) * trainer.row_multiple, prompt)
    sampler_params = trainer.engine.layout.abstract(actor)  # per-layer copy, or the actor's own (training)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    # A resharded copy is the program's argument while the training state stays resident.
    beside_sampler = resident if sampler_params is not actor else resident - memory_check.per_device_bytes(actor)
    if trainer.engine.keeps_prefixes and trainer.pool is None:
        # rollout.prefix_cache: every pipeline group keeps its last prompt cache across turns, and
        # a call's new one is made while its group's old one is still held: groups + 1 caches.
        beside_sampler += memory_check.kept_prompt_cache_bytes(trainer.model_config, mesh, prompts[0], prompt,
                                                               r.pipeline_groups + 1)
    programs = [memory_check.Program(
        "sampler", trainer.engine.lower(actor, memory_check.rows(mesh, prompts, np.int32),
                                        memory_check.rows(mesh, prompts, np.bool_), key, trainer.sampling),
        beside_sampler,
        "Lower rollout.conversations / raise rollout.pipeline_groups (rows per sampler call), lower "
        "rollout.max_prompt_tokens or rollout.max_new_tokens, or set rollout.layout=tensor on a tensor mesh.")]
    width = (p.micro_batch_size, prompt + r.max_new_tokens)
    response = (p.micro_batch_size, r.max_new_tokens)
    tokens, mask = memory_check.rows(mesh, width, np.int32), memory_check.rows(mesh, width, np.bool_)
    programs.append(memory_check.Program(
        "scoring forward", trainer.build_experience.forwards.lower(actor, tokens, mask, r.max_new_tokens),
        resident - memory_check.per_device_bytes(actor), "Lower ppo.micro_batch_size (rows per scoring chunk)."))
    update_fields = set(trainer.build_experience.update_fields)
    actor_fields = {"old_logprobs", "advantages", "reference_logprobs", "kl_coef"} & update_fields
    updaters = [("actor", trainer.actor_updater, actor_fields)]
    if trainer.advantages.needs_critic:
        updaters.append(("critic", trainer.critic_updater, {"old_values", "returns"}))
    shapes = {RESPONSE: response, ROW: response[:1]}
    for name, updater, fields in updaters:
        micro = Experience(tokens=tokens, attention_mask=mask, response_mask=memory_check.rows(mesh, response, np.bool_),
                           **{f: memory_check.rows(mesh, shapes[FIELD_AXES[f]], np.float32) for f in fields})
        accumulate, _ = updater.lower(state[name], micro)
        programs.append(memory_check.Program(
            f"{name} micro-batch step", accumulate, resident - memory_check.per_device_bytes(state[name].params),
            "Lower ppo.micro_batch_size, or set model.remat=full (recompute activations in the backward)."))
    return programs
