"""The PPO actor and critic losses over an Experience micro-batch, for training.updater.Updater."""

from __future__ import annotations

from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.rl import ppo
from rlpa_jax.rl.experience import Experience
from rlpa_jax.training.forwards import response_logprobs, response_logprobs_and_entropy, response_values
from rlpa_jax.training.losses import LossTerms, masked_sum
from rlpa_jax.training.updater import LossFn


def actor_loss_fn(config: Qwen2Config, clip_eps: float, entropy_coef: float) -> LossFn:
    def loss(params: Params, batch: Experience) -> LossTerms:
        length = batch.response_mask.shape[-1]
        if not entropy_coef:
            logprobs = response_logprobs(params, config, batch.tokens, batch.attention_mask, length)
            return ppo.policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, clip_eps)
        logprobs, entropy = response_logprobs_and_entropy(params, config, batch.tokens, batch.attention_mask, length)
        terms = ppo.policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, clip_eps)
        # The entropy is a bonus: subtracting it from the loss pushes it up.
        return terms._replace(total=terms.total - entropy_coef * masked_sum(entropy, batch.response_mask))
    return loss


def critic_loss_fn(config: Qwen2Config, value_clip_eps: float) -> LossFn:
    def loss(params: Params, batch: Experience) -> LossTerms:
        length = batch.response_mask.shape[-1]
        values = response_values(params, config, batch.tokens, batch.attention_mask, length)
        return ppo.value_loss(values, batch.old_values, batch.returns, batch.response_mask, value_clip_eps)
    return loss


def response_tokens(batch: Experience):
    """The units PPO's losses average over (Updater's loss_mask)."""
    return batch.response_mask
