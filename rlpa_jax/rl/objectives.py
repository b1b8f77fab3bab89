"""The PPO actor and critic losses over an Experience micro-batch, for training.updater.Updater.

Both check the batch's layout with chex before the forward (shapes and dtypes only, so under jit
the check runs once, while tracing); rl/ppo.py's losses check the per-token fields against it.
"""

from __future__ import annotations

import chex
import jax

from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.rl import ppo
from rlpa_jax.rl.experience import Experience
from rlpa_jax.training.forwards import response_logprobs, response_logprobs_and_entropy, response_values
from rlpa_jax.training.losses import LossTerms, masked_sum
from rlpa_jax.training.updater import LossFn


def check_sequences(batch: Experience, where: str) -> None:
    """tokens (integer) and attention_mask are (rows, P + R), response_mask (rows, R): the layout the
    forwards read the response positions from."""
    chex.assert_rank([batch.tokens, batch.attention_mask, batch.response_mask], 2,
                     custom_message=f"rl/objectives.py {where}: tokens, attention_mask and response_mask "
                                    "are (rows, length)")
    chex.assert_equal_shape([batch.tokens, batch.attention_mask],
                            custom_message=f"rl/objectives.py {where}: tokens and attention_mask share one shape")
    chex.assert_equal_shape_prefix([batch.tokens, batch.response_mask], 1,
                                   custom_message=f"rl/objectives.py {where}: response_mask has a row per sequence")
    chex.assert_type(batch.tokens, int, custom_message=f"rl/objectives.py {where}: tokens are integer ids")


def actor_loss_fn(config: Qwen2Config, clip_eps: float, entropy_coef: float,
                  kl_estimator: ppo.KLEstimator = "k1") -> LossFn:
    """The clipped policy loss, plus what the batch asks for by the fields it carries:

    - `old_logprobs` None (the trainer skipped the actor's scoring forward: every row is updated
      once, at the parameters it was sampled with): the old log-probs are the loss forward's own,
      stop_gradient'ed, so the ratio is exactly 1 and the gradient is the one recomputed old
      log-probs would give; `approx_kl` and `clip_fraction` are then 0, as they are on-policy.
    - `reference_logprobs` (with `kl_coef` per row; `ppo.kl_penalty=loss`, or a skipped forward
      that still has to measure the KL): the loss adds kl_coef * KL(policy || reference) per
      response token, `kl_estimator` per token, averaged like the policy loss, and logs the mean
      KL per token as `loss_kl`.
    """
    def loss(params: Params, batch: Experience) -> LossTerms:
        check_sequences(batch, "actor loss")
        length = batch.response_mask.shape[-1]
        if entropy_coef:
            logprobs, entropy = response_logprobs_and_entropy(params, config, batch.tokens, batch.attention_mask, length)
        else:
            logprobs = response_logprobs(params, config, batch.tokens, batch.attention_mask, length)
        old_logprobs = jax.lax.stop_gradient(logprobs) if batch.old_logprobs is None else batch.old_logprobs
        terms = ppo.policy_loss(logprobs, old_logprobs, batch.advantages, batch.response_mask, clip_eps)
        if batch.reference_logprobs is not None:
            weighted, kl = ppo.reference_kl_loss(logprobs, batch.reference_logprobs, batch.kl_coef,
                                                 batch.response_mask, kl_estimator)
            terms = terms._replace(total=terms.total + weighted, sums=terms.sums | {"kl": kl})
        if entropy_coef:
            # The entropy is a bonus: subtracting it from the loss pushes it up.
            terms = terms._replace(total=terms.total - entropy_coef * masked_sum(entropy, batch.response_mask))
        return terms
    return loss


def critic_loss_fn(config: Qwen2Config, value_clip_eps: float) -> LossFn:
    def loss(params: Params, batch: Experience) -> LossTerms:
        check_sequences(batch, "critic loss")
        length = batch.response_mask.shape[-1]
        values = response_values(params, config, batch.tokens, batch.attention_mask, length)
        return ppo.value_loss(values, batch.old_values, batch.returns, batch.response_mask, value_clip_eps)
    return loss


def response_tokens(batch: Experience):
    """The units PPO's losses average over (Updater's loss_mask)."""
    return batch.response_mask
