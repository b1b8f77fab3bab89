"""The RL math of RLPA's multi-turn PPO: KL penalties, token rewards, advantages and losses.

Every function is pure and jittable, over padded (batch, response_length) arrays with a `mask`
(float or bool) of valid response tokens. Each turn of a dialogue is one PPO sample: the prompt
is the rendered history, the response is the policy's turn, and the turn's scalar reward
(profile F1 + strict response gate) lands on the last valid token, as in the paper's
OpenRLHF-based code.

Masks may be right-padded, left-padded or have holes: the advantage scans treat a row's valid
tokens, in order, as the trajectory and skip everything else, so the value after the last valid
token counts as 0 and padded positions get 0 advantage.

Losses return sums and counts (`LossTerms`) instead of means, so that accumulating micro-batches
and logging stay exact: the mean over a whole batch is `mean(sum of LossTerms)`, whatever the
micro-batch split (a mean of micro-batch means would weight short responses wrongly).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

KLEstimator = Literal["k1", "k3", "abs", "mse"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3", "abs", "mse")


# ----------------------------------------------------------------------------- masked reductions


def _as_float(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(jnp.float32)


def masked_sum(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Sum of `values` over valid positions (all axes, or one)."""
    return jnp.sum(jnp.asarray(values, jnp.float32) * _as_float(mask), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of `values` over valid positions; 0 where nothing is valid (instead of NaN)."""
    count = jnp.sum(_as_float(mask), axis=axis)
    return masked_sum(values, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Unbiased (Bessel-corrected) variance over all valid positions, as trl/OpenRLHF compute it."""
    mask = _as_float(mask)
    count = jnp.sum(mask)
    centered = (jnp.asarray(values, jnp.float32) - masked_mean(values, mask)) * mask
    # One valid value has no spread; dividing by max(n - 1, 1) keeps that case at 0, not NaN.
    return jnp.sum(centered**2) / jnp.maximum(count - 1.0, 1.0)


def whiten(
    values: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Masked whitening: (x - mean) / sqrt(var + eps) with statistics over valid tokens only.

    With `shift_mean=False` the mean is added back (only the scale changes), as trl's
    `masked_whiten` does for rewards. Padded positions come back as 0.
    """
    mask = _as_float(mask)
    values = jnp.asarray(values, jnp.float32)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_mask(mask: jax.Array) -> jax.Array:
    """One-hot (batch, T) float mask of each row's last valid token; all zeros for empty rows."""
    mask = _as_float(mask)
    length = mask.shape[-1]
    last_index = length - 1 - jnp.argmax(mask[..., ::-1] > 0, axis=-1)
    return jax.nn.one_hot(last_index, length, dtype=jnp.float32) * mask


# ----------------------------------------------------------------------------- KL and rewards


def kl_penalty(
    logprobs: jax.Array, reference_logprobs: jax.Array, estimator: KLEstimator = "k1"
) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    Schulman's estimators with samples from the policy and log r = ref - logp:
    k1 = -log r (unbiased, can be negative), k3 = r - 1 - log r (unbiased, never negative);
    "abs" = |logp - ref| and "mse" = (logp - ref)^2 / 2 are the biased, non-negative variants.
    """
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(reference_logprobs, jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return jnp.exp(-log_ratio) + log_ratio - 1.0
    if estimator == "abs":
        return jnp.abs(log_ratio)
    if estimator == "mse":
        return 0.5 * log_ratio**2
    raise ValueError(f"rl/ppo.py: KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def token_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    reference_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
    estimator: KLEstimator = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Dense rewards for one turn: -kl_coef * KL on every valid token, the score on the last.

    `scores` is (batch,) (the turn reward); returns `(rewards, kl)`, both (batch, T) and zero on
    padding. The KL is returned too, so the trainer can log it and feed the adaptive controller.
    """
    mask = _as_float(mask)
    kl = kl_penalty(logprobs, reference_logprobs, estimator) * mask
    score_on_last = jnp.asarray(scores, jnp.float32)[:, None] * last_token_mask(mask)
    return score_on_last - kl_coef * kl, kl


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


def fixed_kl_coef(
    coef: float | jax.Array,
    observed_kl: float | jax.Array,
    target: float,
    horizon: float,
    n_steps: int | jax.Array,
) -> jax.Array:
    """The fixed controller: same signature as `adaptive_kl_coef`, returns `coef` unchanged."""
    del observed_kl, target, horizon, n_steps
    return jnp.asarray(coef, jnp.float32)


# ----------------------------------------------------------------------------- advantages


def _masked_gae_rows(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """GAE over the valid tokens of each row of (rows, L) arrays, one reverse scan over L.

    The carry is (value, advantage) of the next *valid* token: a padded position leaves it as it
    is and gets 0 advantage, so padding anywhere (right, left, holes) is skipped and the value
    after a row's last valid token is 0.
    """
    mask = _as_float(mask)
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


def gae_advantages(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation within one turn (the paper's setting).

    All arrays are (batch, T); returns `(advantages, returns)` with returns = advantages + values,
    both 0 on padding. Each turn is its own episode: nothing is bootstrapped past its last token.
    """
    return _masked_gae_rows(rewards, values, mask, gamma, lam)


def cross_turn_gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    turn_mask: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE across the turns of each conversation (an option; the paper's code stays within turns).

    Inputs are (conversations, turns, T) with `turn_mask` (conversations, turns) marking turns
    that exist (and were scored). The paper's objective sums rewards over turns, so a turn's
    profile guess should get credit for the better turns it enables later. Here a conversation's
    policy tokens, turn after turn, form one trajectory: the value at the first valid token of
    turn t+1 bootstraps turn t's last valid token. Choices, stated:
    - the simulated user's reply between turns is environment, not action: it is skipped, so
      crossing a turn boundary costs one step of discount like any other token;
    - gamma and lam are per token, the same as within a turn (with gamma < 1 a later turn's
      reward reaches an earlier turn discounted by the token distance);
    - masked-out turns (conversation over, or a failed judge) are skipped like padding, so the
      turn before a hole bootstraps from the next existing turn.
    A one-turn conversation gives exactly `gae_advantages`. Returns `(advantages, returns)`,
    shaped like `rewards`.
    """
    conversations, turns, length = jnp.shape(rewards)
    token_mask = _as_float(mask) * _as_float(turn_mask)[:, :, None]
    flat_shape = (conversations, turns * length)
    advantages, returns = _masked_gae_rows(
        jnp.reshape(rewards, flat_shape),
        jnp.reshape(values, flat_shape),
        jnp.reshape(token_mask, flat_shape),
        gamma,
        lam,
    )
    shape = (conversations, turns, length)
    return jnp.reshape(advantages, shape), jnp.reshape(returns, shape)


def group_advantages(
    scores: jax.Array, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> jax.Array:
    """GRPO-style per-sample advantages: score minus its group's mean, over the group's std.

    Rows are prompt-major: rows [g*n, (g+1)*n) are the n samples of prompt g. The std is the
    unbiased one (as torch's default in GRPO implementations); `normalize_std=False` keeps only
    the mean baseline (Dr. GRPO). A group whose scores are all equal gets 0 advantage.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"rl/ppo.py: group_size={group_size} must be >= 1 and divide the {scores.shape[0]} rows"
        )
    groups = scores.reshape(-1, group_size)
    centered = groups - jnp.mean(groups, axis=1, keepdims=True)
    if normalize_std:
        # A group of one has no spread; ddof=0 keeps that case at 0 / eps = 0 instead of NaN.
        std = jnp.std(groups, axis=1, keepdims=True, ddof=1 if group_size > 1 else 0)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def block_token_rewards(
    profile_scores: jax.Array,
    response_scores: jax.Array,
    profile_mask: jax.Array,
    logprobs: jax.Array,
    reference_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
    estimator: KLEstimator = "k1",
) -> tuple[jax.Array, jax.Array]:
    """token_rewards with each block's reward where the block ends: the profile score on the last
    token of the <profile> block (`profile_mask`), the response score on the turn's last token.

    With gamma * lambda < 1, tokens after the profile block no longer share its reward, and the
    profile tokens see their own reward a few tokens away instead of a whole reply away.
    """
    rewards, kl = token_rewards(response_scores, logprobs, reference_logprobs, mask, kl_coef, estimator)
    return rewards + jnp.asarray(profile_scores, jnp.float32)[:, None] * last_token_mask(profile_mask), kl


def block_advantages(profile_advantages: jax.Array, response_advantages: jax.Array, profile_mask: jax.Array,
                     mask: jax.Array) -> jax.Array:
    """Per-sample advantages of each block broadcast to its own tokens: (batch,) x 2 -> (batch, T)."""
    profile_mask = _as_float(profile_mask)
    return (expand_to_tokens(profile_advantages, profile_mask)
            + expand_to_tokens(response_advantages, _as_float(mask) - profile_mask))


def item_advantages(advantages: jax.Array, item_credit: jax.Array, item_mask: jax.Array,
                    eps: float = 1e-8) -> jax.Array:
    """Item credits in place of `advantages` on the tokens of profile lines (`item_mask`).

    Credits are F1 differences (a matched item about +0.2, a wrong one a few hundredths below 0),
    so only their scale is normalised, to a root mean square of 1 over the masked tokens, like the
    unit-spread group advantages around them; their sign already says right or wrong.
    """
    item_mask = _as_float(item_mask)
    credit = jnp.asarray(item_credit, jnp.float32)
    rms = jnp.sqrt(masked_mean(credit**2, item_mask))
    return jnp.where(item_mask > 0, credit / jnp.maximum(rms, eps), jnp.asarray(advantages, jnp.float32))


def expand_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcasts per-sample advantages (batch,) to every valid token of (batch, T)."""
    return jnp.asarray(advantages, jnp.float32)[:, None] * _as_float(mask)


# ----------------------------------------------------------------------------- losses


class LossTerms(NamedTuple):
    """Sums over valid tokens, so micro-batches add up exactly (`add_terms`, then `mean`).

    total: sum of the per-token loss (or entropy); count: number of valid tokens;
    clipped: number of valid tokens where clipping decided the loss; approx_kl: sum of per-token
    k3 estimates of KL(old policy || new policy) (0 for losses without a ratio).
    """

    total: jax.Array
    count: jax.Array
    clipped: jax.Array
    approx_kl: jax.Array


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
    """Field-wise sum of two LossTerms (micro-batch accumulation)."""
    return LossTerms(*(x + y for x, y in zip(a, b)))


def mean(terms: LossTerms) -> jax.Array:
    """The loss averaged over every valid token counted in `terms`; 0 when there were none."""
    return terms.total / jnp.maximum(terms.count, 1.0)


def summary(terms: LossTerms) -> dict[str, jax.Array]:
    """Per-token means of every field, for logging."""
    count = jnp.maximum(terms.count, 1.0)
    return {
        "mean": terms.total / count,
        "clip_fraction": terms.clipped / count,
        "approx_kl": terms.approx_kl / count,
        "tokens": terms.count,
    }


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
    mask = _as_float(mask)
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
    ratio = jnp.exp(log_ratio)
    advantages = jnp.asarray(advantages, jnp.float32)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    return LossTerms(
        total=jnp.sum(loss * mask),
        count=jnp.sum(mask),
        clipped=jnp.sum((clipped > unclipped) * mask),
        # Samples came from the old policy, so k3 with r = new / old estimates KL(old || new).
        approx_kl=jnp.sum((ratio - 1.0 - log_ratio) * mask),
    )


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
) -> LossTerms:
    """Clipped value loss: 0.5 * max((v - R)^2, (old + clip(v - old, +-eps) - R)^2) per token."""
    mask = _as_float(mask)
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
        clipped=jnp.sum((clipped_error > unclipped_error) * mask),
        approx_kl=jnp.zeros((), jnp.float32),
    )


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> LossTerms:
    """Summed entropy of the token distributions (batch, T, vocab) at valid positions.

    This is the entropy itself (a bonus): the trainer subtracts `coef * mean(terms)` from its loss.
    """
    logits = jnp.asarray(logits, jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    mask = _as_float(mask)
    zero = jnp.zeros((), jnp.float32)
    return LossTerms(
        total=jnp.sum(entropy * mask), count=jnp.sum(mask), clipped=zero, approx_kl=zero
    )
