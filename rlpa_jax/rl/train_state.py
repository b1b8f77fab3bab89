"""The state of a PPO run: what one iteration reads and returns, and what a checkpoint holds.

`TrainState` is a pytree of the arrays (actor and critic with their optimizer states, the frozen
reference) carrying two plain numbers beside them: the iterations done and the KL coefficient
(adaptive KL moves it). The numbers are static fields: they travel in the checkpoint's JSON meta
("iteration", "kl_coef"), not as arrays. A run whose advantage estimator needs no critic (grpo)
holds none: no parameters, no optimizer state, nothing in its checkpoints.

On disk the arrays are the dict {"actor": {"params", "opt_state"}, "reference": ..., and "critic"
when there is one}: the layout every earlier checkpoint has (runtime/checkpoint.py reads the actor
out of it for evaluation and export).
"""

from __future__ import annotations

import dataclasses

import jax

from rlpa_jax.model.qwen2 import Params, Qwen2Config, critic_params_from_policy, init_params
from rlpa_jax.runtime import parallel
from rlpa_jax.training.updater import Trainable, Updater


@dataclasses.dataclass(frozen=True)
class TrainState:
    actor: Trainable
    critic: Trainable | None  # None: the advantage estimator trains no critic
    reference: Params  # frozen: the KL anchor
    iteration: int = dataclasses.field(metadata=dict(static=True))  # iterations done (the checkpoint's step)
    kl_coef: float = dataclasses.field(metadata=dict(static=True))

    def checkpoint_tree(self) -> dict:
        """The arrays as a checkpoint stores them (no critic entry when there is no critic)."""
        tree = {"actor": self.actor, "reference": self.reference}
        return (tree | {"critic": self.critic}) if self.critic is not None else tree

    @classmethod
    def from_checkpoint(cls, tree: dict, iteration: int, kl_coef: float) -> "TrainState":
        """The state from a restored checkpoint tree (checkpoint_tree's layout) and its meta's numbers."""
        return cls(tree["actor"], tree.get("critic"), tree["reference"], iteration, kl_coef)


jax.tree_util.register_dataclass(TrainState)


def initial_state(actor: Params, model_config: Qwen2Config, actor_updater: Updater, critic_updater: Updater | None,
                  kl_coef: float, reference: Params | None = None) -> TrainState:
    """The state a run starts from: the policy (placed on the mesh), its copy as the reference
    (or `reference`: the same weights already held elsewhere, placed alike) and, with a critic
    updater, a critic made of the policy's backbone and a zero value head."""
    critic = None
    if critic_updater is not None:
        critic = parallel.shard(critic_params_from_policy(actor, model_config), critic_updater.param_shardings)
    if reference is None:
        reference = jax.tree.map(lambda x: x.copy(), actor)
    return TrainState(actor_updater.init(actor), None if critic is None else critic_updater.init(critic), reference,
                      iteration=0, kl_coef=kl_coef)


def abstract_state(model_config: Qwen2Config, actor_updater: Updater, critic_updater: Updater | None,
                   kl_coef: float) -> TrainState:
    """The state as shapes, dtypes and shardings (no memory, no SFT, no weights loaded): to restore
    into, or to compile for."""

    def shapes() -> TrainState:
        actor = init_params(model_config, jax.random.key(0))
        critic = None
        if critic_updater is not None:
            params = critic_params_from_policy(actor, model_config)
            critic = Trainable(params, critic_updater.optimizer.init(params))
        return TrainState(Trainable(actor, actor_updater.optimizer.init(actor)), critic, actor, 0, kl_coef)

    template = jax.eval_shape(shapes)
    actor_sh = actor_updater.param_shardings
    critic_sh = None if critic_updater is None else Trainable(
        critic_updater.param_shardings, critic_updater.opt_state_shardings(template.critic.params))
    shardings = dataclasses.replace(
        template, actor=Trainable(actor_sh, actor_updater.opt_state_shardings(template.actor.params)),
        critic=critic_sh, reference=actor_sh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), template, shardings)
