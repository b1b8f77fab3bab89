"""The RL math of RLPA's multi-turn PPO: KL penalties, token rewards, advantages and losses.

Every function is pure and jittable, over padded (batch, response_length) arrays with a `mask`
(float or bool) of valid response tokens. Each turn of a dialogue is one PPO sample: the prompt
is the rendered history, the response is the policy's turn, and the turn's scalar reward
(profile F1 + strict response gate) lands on the last valid token, as in the paper's
OpenRLHF-based code.

Masks may be right-padded, left-padded or have holes: the advantage scans treat a row's valid
tokens, in order, as the trajectory and skip everything else, so the value after the last valid
token counts as 0 and padded positions get 0 advantage.

Losses return sums and counts (training.losses.LossTerms) instead of means, so accumulating
micro-batches and logging stay exact whatever the micro-batch split.

Each function checks the shapes (and, where a wrong one would be silently cast, the dtypes) of its
inputs with chex. The checks read shapes and dtypes only: under jit they run once, while tracing,
and add nothing to the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import chex
import jax
import jax.numpy as jnp

from rlpa_jax.training.losses import LossTerms, as_float, masked_mean

KLEstimator = Literal["k1", "k3"]
# Where the KL to the reference enters: a per-token penalty on the rewards (the paper, OpenRLHF)
# or a term of the actor loss (DeepSeekMath's GRPO, TRL).
KLPenalty = Literal["reward", "loss"]


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    """What an advantage estimator may use besides the batch (rl/advantages.py)."""

    gamma: float
    lam: float
    group_size: int  # samples per prompt: rows [g*n, (g+1)*n) are prompt g's
    kl_coef: float


# ----------------------------------------------------------------------------- masked reductions


def masked_var(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Unbiased (Bessel-corrected) variance over all valid positions, as trl/OpenRLHF compute it."""
    chex.assert_equal_shape([values, mask], custom_message="rl/ppo.py masked_var: values and mask share one shape")
    mask = as_float(mask)
    count = jnp.sum(mask)
    centered = (jnp.asarray(values, jnp.float32) - masked_mean(values, mask)) * mask
    # One valid value has no spread; dividing by max(n - 1, 1) keeps that case at 0, not NaN.
    return jnp.sum(centered**2) / jnp.maximum(count - 1.0, 1.0)


def whiten(values: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Masked whitening: (x - mean) / sqrt(var + eps) with statistics over valid tokens only.
    Padded positions come back as 0."""
    chex.assert_equal_shape([values, mask], custom_message="rl/ppo.py whiten: values and mask share one shape")
    mask = as_float(mask)
    values = jnp.asarray(values, jnp.float32)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(masked_var(values, mask) + eps)
    return whitened * mask


def last_token_mask(mask: jax.Array) -> jax.Array:
    """One-hot (batch, T) float mask of each row's last valid token; all zeros for empty rows."""
    chex.assert_rank(mask, 2, custom_message="rl/ppo.py last_token_mask: mask is (batch, T)")
    mask = as_float(mask)
    length = mask.shape[-1]
    last_index = length - 1 - jnp.argmax(mask[..., ::-1] > 0, axis=-1)
    return jax.nn.one_hot(last_index, length, dtype=jnp.float32) * mask


# ----------------------------------------------------------------------------- KL and rewards


def kl_penalty(
    logprobs: jax.Array, reference_logprobs: jax.Array, estimator: KLEstimator = "k1"
) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    Schulman's estimators with samples from the policy and log r = ref - logp:
    k1 = -log r (unbiased, can be negative), k3 = r - 1 - log r (unbiased, never negative).
    """
    chex.assert_equal_shape([logprobs, reference_logprobs],
                            custom_message="rl/ppo.py kl_penalty: logprobs and reference_logprobs share one shape")
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(reference_logprobs, jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return jnp.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"rl/ppo.py: KL estimator {estimator!r}; expected k1 or k3")


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float | jax.Array) -> jax.Array:
    """Dense rewards for one turn: the score (batch,) on the last valid token, minus kl_coef times
    the per-token KL (batch, T) on every token; zero on padding."""
    chex.assert_rank([scores, kl, mask], [1, 2, 2],
                     custom_message="rl/ppo.py token_rewards: scores is (batch,), kl and mask (batch, T)")
    chex.assert_equal_shape([kl, mask], custom_message="rl/ppo.py token_rewards: kl and mask share one shape")
    chex.assert_equal_shape_prefix([scores, mask], 1,
                                   custom_message="rl/ppo.py token_rewards: one score per row of mask")
    score_on_last = jnp.asarray(scores, jnp.float32)[:, None] * last_token_mask(mask)
    return score_on_last - kl_coef * kl


def adaptive_kl_coef(
    coef: float | jax.Array,
    observed_kl: float | jax.Array,
    target: float,
    horizon: float,
    n_steps: int | jax.Array,
) -> jax.Array:
    """One update of Ziegler et al.'s adaptive KL controller, as a pure state transition.

    The proportional error (observed / target - 1) is clipped to +-0.2 so one noisy batch cannot
    swing the coefficient; `n_steps / horizon` sets how fast it moves (n_steps = samples seen in
    this update, horizon = samples over which the error is meant to be corrected).
    """
    proportional_error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(coef, jnp.float32) * (1.0 + proportional_error * n_steps / horizon)


# ----------------------------------------------------------------------------- advantages


def gae_advantages(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation within one turn (the paper's setting): `(advantages,
    returns)` over the valid tokens of each row of (rows, T) arrays, one reverse scan over T.
    Returns are advantages + values; both are 0 on padding, and each turn is its own episode.

    The carry is (value, advantage) of the next *valid* token: a padded position leaves it as it
    is and gets 0 advantage, so padding anywhere (right, left, holes) is skipped and the value
    after a row's last valid token is 0.
    """
    chex.assert_rank([rewards, values, mask], 2, custom_message="rl/ppo.py gae_advantages: inputs are (rows, T)")
    chex.assert_equal_shape([rewards, values, mask],
                            custom_message="rl/ppo.py gae_advantages: rewards, values and mask share one shape")
    chex.assert_type([rewards, values], float, custom_message="rl/ppo.py gae_advantages: rewards and values are floats")
    mask = as_float(mask)
    rewards = jnp.asarray(rewards, jnp.float32) * mask
    values = jnp.asarray(values, jnp.float32) * mask

    def step(carry, token):
        next_value, next_advantage = carry
        reward, value, valid = token
        delta = reward + gamma * next_value - value
        advantage = (delta + gamma * lam * next_advantage) * valid
        carry = (
            jnp.where(valid > 0, value, next_value),
            jnp.where(valid > 0, advantage, next_advantage),
        )
        return carry, advantage

    rows = rewards.shape[0]
    init = (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    # Scan over time with rows as the vector dimension: (L, rows) slices.
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    returns = (advantages + values) * mask
    return advantages, returns


def group_advantages(scores: jax.Array, group_size: int, valid: jax.Array | None = None,
                     eps: float = 1e-6) -> jax.Array:
    """GRPO-style per-sample advantages: score minus its group's mean, over the group's std.

    Rows are prompt-major: rows [g*n, (g+1)*n) are the n samples of prompt g. Only `valid` rows
    (default: all) are group members: a sample a judge could not score gets 0 and leaves its
    group's statistics alone, so one failure never shifts the rows of later groups. The std is the
    unbiased one (as torch's default in GRPO implementations); a group whose members' scores are
    all equal, or with fewer than two members, gets 0 advantage.
    """
    chex.assert_rank(scores, 1, custom_message="rl/ppo.py group_advantages: scores is (rows,)")
    if valid is not None:
        chex.assert_equal_shape([scores, valid], custom_message="rl/ppo.py group_advantages: one valid flag per score")
    scores = jnp.asarray(scores, jnp.float32)
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"rl/ppo.py: group_size={group_size} must be >= 1 and divide the {scores.shape[0]} rows"
        )
    groups = scores.reshape(-1, group_size)
    members = jnp.ones_like(groups) if valid is None else as_float(valid).reshape(groups.shape)
    count = jnp.sum(members, axis=1, keepdims=True)
    mean = jnp.sum(groups * members, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    centered = (groups - mean) * members
    # max(count - 1, 1): a group of one has no spread, and 0 / eps = 0 instead of NaN.
    std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / jnp.maximum(count - 1.0, 1.0))
    return (centered / (std + eps)).reshape(-1)


def item_advantages(advantages: jax.Array, item_credit: jax.Array, item_mask: jax.Array,
                    eps: float = 1e-8) -> jax.Array:
    """Item credits in place of `advantages` on the tokens of profile lines (`item_mask`).

    Credits are F1 differences (a matched item about +0.2, a wrong one a few hundredths below 0),
    so only their scale is normalised, to a root mean square of 1 over the masked tokens, like the
    unit-spread group advantages around them; their sign already says right or wrong.
    """
    chex.assert_equal_shape([advantages, item_credit, item_mask],
                            custom_message="rl/ppo.py item_advantages: advantages, item_credit and item_mask "
                                           "share one shape")
    item_mask = as_float(item_mask)
    credit = jnp.asarray(item_credit, jnp.float32)
    rms = jnp.sqrt(masked_mean(credit**2, item_mask))
    return jnp.where(item_mask > 0, credit / jnp.maximum(rms, eps), jnp.asarray(advantages, jnp.float32))


def expand_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcasts per-sample advantages (batch,) to every valid token of (batch, T)."""
    chex.assert_rank([advantages, mask], [1, 2],
                     custom_message="rl/ppo.py expand_to_tokens: advantages is (batch,), mask (batch, T)")
    chex.assert_equal_shape_prefix([advantages, mask], 1,
                                   custom_message="rl/ppo.py expand_to_tokens: one advantage per row of mask")
    return jnp.asarray(advantages, jnp.float32)[:, None] * as_float(mask)


# ----------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
) -> LossTerms:
    """PPO's clipped surrogate: -min(r * A, clip(r, 1 - eps, 1 + eps) * A) per valid token.

    Once the ratio r has left [1 - eps, 1 + eps] in the direction the advantage favours, the
    clipped term is the minimum and is constant in r, so that token stops pushing the policy.
    """
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask],
                            custom_message="rl/ppo.py policy_loss: logprobs, old_logprobs, advantages and mask "
                                           "share one shape")
    chex.assert_type([logprobs, old_logprobs, advantages], float,
                     custom_message="rl/ppo.py policy_loss: logprobs, old_logprobs and advantages are floats")
    mask = as_float(mask)
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
    ratio = jnp.exp(log_ratio)
    advantages = jnp.asarray(advantages, jnp.float32)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    return LossTerms(
        total=jnp.sum(loss * mask),
        count=jnp.sum(mask),
        sums={
            # Tokens where clipping decided the loss.
            "clip_fraction": jnp.sum((clipped > unclipped) * mask),
            # Samples came from the old policy, so k3 with r = new / old estimates KL(old || new).
            "approx_kl": jnp.sum((ratio - 1.0 - log_ratio) * mask),
        },
    )


def reference_kl_loss(
    logprobs: jax.Array,
    reference_logprobs: jax.Array,
    kl_coef: jax.Array,
    mask: jax.Array,
    estimator: KLEstimator = "k3",
) -> tuple[jax.Array, jax.Array]:
    """The KL-to-reference term of the actor loss (`ppo.kl_penalty=loss`): (sum of kl_coef * KL,
    sum of KL) over the valid tokens, the KL per token estimated from the sampled tokens.

    The gradient flows through the current `logprobs` only (the reference is fixed). With k3 this
    is DeepSeekMath's GRPO term, whose gradient per token is 1 - pi_ref / pi. `kl_coef` is (rows,)
    (one value per row: the coefficient is data, so adaptive KL recompiles nothing).
    """
    chex.assert_rank([logprobs, kl_coef], [2, 1],
                     custom_message="rl/ppo.py reference_kl_loss: logprobs is (rows, T), kl_coef (rows,)")
    chex.assert_equal_shape([logprobs, reference_logprobs, mask],
                            custom_message="rl/ppo.py reference_kl_loss: logprobs, reference_logprobs and mask "
                                           "share one shape")
    chex.assert_equal_shape_prefix([kl_coef, mask], 1,
                                   custom_message="rl/ppo.py reference_kl_loss: one kl_coef per row")
    mask = as_float(mask)
    kl = kl_penalty(logprobs, jax.lax.stop_gradient(jnp.asarray(reference_logprobs)), estimator) * mask
    return jnp.sum(jnp.asarray(kl_coef, jnp.float32)[:, None] * kl), jnp.sum(kl)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
) -> LossTerms:
    """Clipped value loss: 0.5 * max((v - R)^2, (old + clip(v - old, +-eps) - R)^2) per token."""
    chex.assert_equal_shape([values, old_values, returns, mask],
                            custom_message="rl/ppo.py value_loss: values, old_values, returns and mask "
                                           "share one shape")
    chex.assert_type([values, old_values, returns], float,
                     custom_message="rl/ppo.py value_loss: values, old_values and returns are floats")
    mask = as_float(mask)
    values = jnp.asarray(values, jnp.float32)
    old_values = jnp.asarray(old_values, jnp.float32)
    returns = jnp.asarray(returns, jnp.float32)
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * jnp.maximum(unclipped_error, clipped_error)
    return LossTerms(
        total=jnp.sum(loss * mask),
        count=jnp.sum(mask),
        sums={"clip_fraction": jnp.sum((clipped_error > unclipped_error) * mask)},
    )
