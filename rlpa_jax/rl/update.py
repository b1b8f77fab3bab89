"""One iteration's optimizer steps on a TrainState: `ppo.epochs` passes over the experience in
length-grouped minibatches of `ppo.train_batch_size` rows, each one actor step and, when the state
holds a critic, one critic step."""

from __future__ import annotations

import dataclasses

import numpy as np

from rlpa_jax.config.tree import PPOConfig
from rlpa_jax.rl.experience import Experience, length_grouped_minibatches, prompt_lengths
from rlpa_jax.rl.train_state import TrainState
from rlpa_jax.runtime import multihost
from rlpa_jax.training.updater import Updater


def ppo_update(state: TrainState, experience: Experience, update_fields: tuple[str, ...], actor_updater: Updater,
               critic_updater: Updater | None, p: PPOConfig, seed: int) -> tuple[TrainState, dict[str, float]]:
    """The state after the updates, and each metric's mean over the minibatches (a non-finite
    one included: the caller decides what a diverged update means). `update_fields`: the fields
    the updates read (the experience builder's)."""
    iteration, size = state.iteration, p.train_batch_size
    rng = np.random.default_rng([seed, iteration, 1])
    lengths = prompt_lengths(experience)
    if experience.old_logprobs is None and (p.epochs > 1 or experience.rows > size):
        raise RuntimeError(f"iteration {iteration}: {experience.rows} rows x {p.epochs} epochs are more than one "
                           f"optimizer step of {size}, but the actor's scoring forward was skipped")
    update_rows = experience.only(*update_fields)
    actor, critic = state.actor, state.critic
    sums: dict[str, list[float]] = {}
    for _ in range(p.epochs):
        for rows in length_grouped_minibatches(lengths, size, rng):
            # Every minibatch has exactly train_batch_size rows (zero-mask padding); the updaters
            # cut each micro-batch to its own length buckets (one program per bucket pair in use).
            minibatch = update_rows.take(rows).padded_rows(size)
            actor, actor_metrics = actor_updater(actor, minibatch)
            if critic is not None:
                critic, critic_metrics = critic_updater(critic, minibatch)
                actor_metrics |= {f"critic_{k}": v for k, v in critic_metrics.items()}
            for k, v in multihost.fetch(actor_metrics).items():  # replicated scalars
                sums.setdefault(k, []).append(float(v))
    metrics = {k: float(np.mean(v)) for k, v in sums.items()}
    return dataclasses.replace(state, actor=actor, critic=critic), metrics
