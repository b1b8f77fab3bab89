"""rl/ppo.py and training/losses.py against plain numpy references written the obvious way (loops over valid tokens)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlpa_jax.rl import ppo
from rlpa_jax.training import losses

TOL = dict(rtol=1e-5, atol=1e-5)
# Right-padded rows of different lengths, including length 1 and the full width.
LENGTHS = (7, 1, 4, 10, 3, 6)
WIDTH = 10


def padding_mask(lengths=LENGTHS, width=WIDTH) -> np.ndarray:
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def random_batch(seed: int, lengths=LENGTHS, width=WIDTH) -> dict[str, np.ndarray]:
    """Float32 inputs with junk (not zeros) on padded positions, so masking is really tested."""
    rng = np.random.default_rng(seed)
    shape = (len(lengths), width)
    logprobs = -rng.exponential(1.0, shape).astype(np.float32)
    return dict(
        mask=padding_mask(lengths, width),
        logprobs=logprobs,
        old_logprobs=(logprobs + rng.normal(0, 0.3, shape)).astype(np.float32),
        reference_logprobs=-rng.exponential(1.0, shape).astype(np.float32),
        rewards=rng.normal(0, 1, shape).astype(np.float32),
        values=rng.normal(0, 1, shape).astype(np.float32),
        advantages=rng.normal(0, 1, shape).astype(np.float32),
        returns=rng.normal(0, 1, shape).astype(np.float32),
        scores=rng.uniform(0, 2, len(lengths)).astype(np.float32),
    )


# ----------------------------------------------------------------------------- numpy references


def np_kl(logp, ref, estimator):
    logp, ref = np.float64(logp), np.float64(ref)
    if estimator == "k1":
        return logp - ref
    return np.exp(ref - logp) - (ref - logp) - 1  # k3


def np_gae_row(rewards, values, valid, gamma, lam):
    """Textbook GAE over the valid tokens of one row, in order; 0 elsewhere."""
    index = [t for t in range(len(valid)) if valid[t]]
    advantages = np.zeros(len(valid))
    last = 0.0
    for k in reversed(range(len(index))):
        t = index[k]
        next_value = values[index[k + 1]] if k + 1 < len(index) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    returns = np.where(valid, advantages + values, 0.0)
    return advantages, returns


def np_gae(rewards, values, mask, gamma, lam):
    rows = [np_gae_row(r, v, m, gamma, lam) for r, v, m in zip(rewards, values, mask)]
    return np.stack([a for a, _ in rows]), np.stack([r for _, r in rows])


def np_masked_whiten(x, mask):
    valid = x[mask].astype(np.float64)
    out = (x - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    return np.where(mask, out, 0.0)


# ----------------------------------------------------------------------------- reductions


def test_masked_sum_and_mean_match_numpy():
    batch = random_batch(0)
    x, mask = batch["values"], batch["mask"]
    np.testing.assert_allclose(losses.masked_sum(x, mask), x[mask].sum(), **TOL)
    np.testing.assert_allclose(losses.masked_mean(x, mask), x[mask].mean(), **TOL)
    row_means = [x[i, : n].mean() for i, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(losses.masked_mean(x, mask, axis=1), row_means, **TOL)
    np.testing.assert_allclose(losses.masked_mean(x, np.zeros_like(mask)), 0.0)


def test_whiten_matches_numpy():
    batch = random_batch(1)
    x, mask = batch["values"] * 3 + 2, batch["mask"]
    got = ppo.whiten(x, mask)
    np.testing.assert_allclose(got, np_masked_whiten(x, mask), **TOL)
    assert abs(float(losses.masked_mean(got, mask))) < 1e-5
    assert float(ppo.masked_var(got, mask)) == pytest.approx(1.0, rel=1e-4)


def test_last_token_mask_marks_last_valid_token_only():
    mask = padding_mask((3, 1, 0, WIDTH))
    got = np.asarray(ppo.last_token_mask(mask))
    expected = np.zeros_like(got)
    for row, n in enumerate((3, 1, 0, WIDTH)):
        if n:
            expected[row, n - 1] = 1
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- KL and rewards


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_matches_numpy(estimator):
    batch = random_batch(2)
    got = ppo.kl_penalty(batch["logprobs"], batch["reference_logprobs"], estimator)
    want = np_kl(batch["logprobs"], batch["reference_logprobs"], estimator)
    np.testing.assert_allclose(got, want, **TOL)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k1"):
        ppo.kl_penalty(jnp.zeros(3), jnp.zeros(3), "k2")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards_match_numpy(estimator):
    batch = random_batch(3)
    kl_coef = 0.05
    kl = ppo.kl_penalty(batch["logprobs"], batch["reference_logprobs"], estimator) * batch["mask"]
    rewards = ppo.token_rewards(batch["scores"], kl, batch["mask"], kl_coef)
    want_kl = np.zeros((len(LENGTHS), WIDTH))
    want_rewards = np.zeros((len(LENGTHS), WIDTH))
    for row, n in enumerate(LENGTHS):
        for t in range(n):
            k = np_kl(batch["logprobs"][row, t], batch["reference_logprobs"][row, t], estimator)
            want_kl[row, t] = k
            want_rewards[row, t] = -kl_coef * k
        want_rewards[row, n - 1] += batch["scores"][row]
    np.testing.assert_allclose(kl, want_kl, **TOL)
    np.testing.assert_allclose(rewards, want_rewards, **TOL)


def test_adaptive_kl_moves_coefficient_toward_target():
    coef, target, horizon, n_steps = 0.1, 6.0, 10_000, 256
    above = float(ppo.adaptive_kl_coef(coef, 7.0, target, horizon, n_steps))
    below = float(ppo.adaptive_kl_coef(coef, 5.0, target, horizon, n_steps))
    on_target = float(ppo.adaptive_kl_coef(coef, target, target, horizon, n_steps))
    assert below < coef < above
    assert on_target == pytest.approx(coef)
    # Inside the clip: proportional to the error.
    assert above == pytest.approx(coef * (1 + (7.0 / 6.0 - 1) * n_steps / horizon), rel=1e-6)
    assert below == pytest.approx(coef * (1 + (5.0 / 6.0 - 1) * n_steps / horizon), rel=1e-6)
    # Far off target the error is clipped to +-0.2.
    far_above = float(ppo.adaptive_kl_coef(coef, 600.0, target, horizon, n_steps))
    far_below = float(ppo.adaptive_kl_coef(coef, 0.0, target, horizon, n_steps))
    assert far_above == pytest.approx(coef * (1 + 0.2 * n_steps / horizon), rel=1e-6)
    assert far_below == pytest.approx(coef * (1 - 0.2 * n_steps / horizon), rel=1e-6)


# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_matches_numpy(gamma, lam):
    batch = random_batch(4)
    advantages, returns = ppo.gae_advantages(
        batch["rewards"], batch["values"], batch["mask"], gamma, lam
    )
    want_adv, want_ret = np_gae(batch["rewards"], batch["values"], batch["mask"], gamma, lam)
    np.testing.assert_allclose(advantages, want_adv, **TOL)
    np.testing.assert_allclose(returns, want_ret, **TOL)
    assert not np.any(np.asarray(advantages)[~batch["mask"]])


def test_gae_with_unit_gamma_and_lambda_is_reward_to_go_minus_value():
    batch = random_batch(5)
    advantages, returns = ppo.gae_advantages(
        batch["rewards"], batch["values"], batch["mask"], 1.0, 1.0
    )
    for row, n in enumerate(LENGTHS):
        reward_to_go = np.cumsum(batch["rewards"][row, :n][::-1])[::-1]
        want = reward_to_go - batch["values"][row, :n]
        np.testing.assert_allclose(advantages[row, :n], want, **TOL)
        np.testing.assert_allclose(returns[row, :n], reward_to_go, **TOL)


def test_gae_is_independent_of_where_the_padding_sits():
    batch = random_batch(6)
    right = batch["mask"]

    def shift(x):
        """Left padding: every row's valid tokens moved to the end."""
        return np.stack([np.roll(row, WIDTH - n) for row, n in zip(x, LENGTHS)])

    left_adv, _ = ppo.gae_advantages(
        shift(batch["rewards"]), shift(batch["values"]), shift(right), 0.99, 0.95
    )
    right_adv, _ = ppo.gae_advantages(batch["rewards"], batch["values"], right, 0.99, 0.95)
    np.testing.assert_allclose(left_adv, shift(np.asarray(right_adv)), **TOL)


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_for_known_groups():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.5, 1.0, 1.5], np.float32)
    got = np.asarray(ppo.group_advantages(scores, group_size=4))
    spread = 0.5 / np.sqrt(1 / 3)  # deviation 0.5 over the unbiased std of {1, 0, 0, 1}
    np.testing.assert_allclose(got[:4], [spread, -spread, -spread, spread], rtol=1e-5)
    np.testing.assert_allclose(got[4:8], 0.0, atol=1e-6)  # all equal: no signal, no NaN
    third = np.array([0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(got[8:], (third - third.mean()) / third.std(ddof=1), rtol=1e-5)


def test_group_advantages_match_numpy_for_random_groups():
    rng = np.random.default_rng(10)
    scores = rng.uniform(0, 2, 5 * 3).astype(np.float32)
    want = []
    for g in range(5):
        group = scores[g * 3 : (g + 1) * 3].astype(np.float64)
        want.extend((group - group.mean()) / (group.std(ddof=1) + 1e-6))
    np.testing.assert_allclose(ppo.group_advantages(scores, 3), want, **TOL)
    with pytest.raises(ValueError, match="group_size"):
        ppo.group_advantages(scores, 4)


def test_expand_to_tokens_fills_valid_tokens_only():
    mask = padding_mask()
    advantages = np.arange(len(LENGTHS), dtype=np.float32) + 1
    got = np.asarray(ppo.expand_to_tokens(advantages, mask))
    np.testing.assert_array_equal(got, np.where(mask, advantages[:, None], 0.0))


# ----------------------------------------------------------------------------- losses


def test_policy_loss_matches_numpy():
    batch = random_batch(11)
    eps = 0.2
    terms = ppo.policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], eps
    )
    total = clipped = approx_kl = 0.0
    for row, n in enumerate(LENGTHS):
        for t in range(n):
            log_ratio = float(batch["logprobs"][row, t]) - float(batch["old_logprobs"][row, t])
            ratio = np.exp(log_ratio)
            a = float(batch["advantages"][row, t])
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            total += -surrogate
            clipped += surrogate < ratio * a
            approx_kl += ratio - 1 - log_ratio
    np.testing.assert_allclose(terms.total, total, **TOL)
    assert float(terms.count) == sum(LENGTHS)
    assert float(terms.sums["clip_fraction"]) == clipped and clipped > 0
    np.testing.assert_allclose(terms.sums["approx_kl"], approx_kl, **TOL)


def test_value_loss_matches_numpy():
    batch = random_batch(12)
    eps = 0.2
    values = batch["values"]
    old_values = values + np.random.default_rng(0).normal(0, 0.5, values.shape).astype(np.float32)
    terms = ppo.value_loss(values, old_values, batch["returns"], batch["mask"], eps)
    total = clipped = 0.0
    for row, n in enumerate(LENGTHS):
        for t in range(n):
            v, old = float(values[row, t]), float(old_values[row, t])
            ret = float(batch["returns"][row, t])
            v_clipped = old + min(max(v - old, -eps), eps)
            total += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            clipped += (v_clipped - ret) ** 2 > (v - ret) ** 2
    np.testing.assert_allclose(terms.total, total, **TOL)
    assert float(terms.count) == sum(LENGTHS)
    assert float(terms.sums["clip_fraction"]) == clipped and clipped > 0


def test_policy_loss_gradient_is_zero_only_in_the_clipped_direction():
    eps = 0.2
    # Log-ratios far outside and inside the clip range, with both advantage signs.
    log_ratio = np.log(np.array([1.5, 0.5, 0.5, 1.5, 1.1, 0.9], np.float32))
    advantages = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], np.float32)
    old = np.full(6, -1.0, np.float32)
    new = old + log_ratio
    mask = np.ones(6, bool)
    grad = jax.grad(lambda lp: ppo.policy_loss(lp, old, advantages, mask, eps).total)(new)
    grad = np.asarray(grad)
    # Ratio past 1 + eps with A > 0, or below 1 - eps with A < 0: clipped, no push further.
    assert grad[0] == 0 and grad[1] == 0
    # Ratio outside the range the other way: the unclipped term rules, the gradient pulls back.
    ratio = np.exp(log_ratio)
    np.testing.assert_allclose(grad[2:], -advantages[2:] * ratio[2:], rtol=1e-6)
    assert float(ppo.policy_loss(new, old, advantages, mask, eps).sums["clip_fraction"]) == 2


def test_value_loss_gradient_is_zero_when_the_clipped_error_dominates():
    old, returns, eps = np.zeros(2, np.float32), np.ones(2, np.float32), 0.2
    # v = 0.5 moved toward the return beyond eps: the clipped error (0.8^2) is larger, flat in v.
    # v = -0.5 moved away from the return: the unclipped error rules and the gradient is v - R.
    values = np.array([0.5, -0.5], np.float32)
    grad = jax.grad(lambda v: ppo.value_loss(v, old, returns, np.ones(2), eps).total)(values)
    np.testing.assert_allclose(np.asarray(grad), [0.0, -1.5], rtol=1e-6)


def test_micro_batch_sums_give_the_full_batch_mean():
    batch = random_batch(14)
    mask = batch["mask"]

    def args(rows):
        return (batch["logprobs"][rows], batch["old_logprobs"][rows], batch["advantages"][rows],
                mask[rows])

    full = ppo.policy_loss(*args(slice(None)))
    # Rows 0-1 hold 8 tokens, rows 2-5 hold 23: unequal micro-batches.
    first, second = ppo.policy_loss(*args(slice(0, 2))), ppo.policy_loss(*args(slice(2, None)))
    summed = losses.add_terms(first, second)
    for key, value in losses.summary(summed).items():
        np.testing.assert_allclose(value, losses.summary(full)[key], **TOL)
    # The naive mean of micro-batch means differs, which is why losses return sums.
    naive = (mean(first) + mean(second)) / 2
    assert abs(naive - mean(full)) > 1e-3
    assert mean(ppo.policy_loss(*args(slice(0, 0)))) == 0.0

    values = batch["values"]

    def value_args(rows):
        return values[rows], values[rows] * 0.5, batch["returns"][rows], mask[rows]

    full_value = ppo.value_loss(*value_args(slice(None)))
    split_value = losses.add_terms(
        ppo.value_loss(*value_args(slice(0, 2))), ppo.value_loss(*value_args(slice(2, None)))
    )
    np.testing.assert_allclose(mean(split_value), mean(full_value), **TOL)


def mean(terms: losses.LossTerms) -> float:
    return float(losses.summary(terms)["mean"])


# ----------------------------------------------------------------------------- jit == eager


def test_jitted_functions_equal_eager():
    batch = random_batch(15)
    mask = batch["mask"].astype(np.float32)  # float masks are accepted as well as bool
    calls = {
        "kl_k3": (functools.partial(ppo.kl_penalty, estimator="k3"),
                  (batch["logprobs"], batch["reference_logprobs"])),
        "token_rewards": (ppo.token_rewards, (batch["scores"], batch["logprobs"] * mask, mask, 0.1)),
        "adaptive_kl": (ppo.adaptive_kl_coef, (0.1, 0.3, 0.2, 1000.0, 64)),
        "gae": (ppo.gae_advantages, (batch["rewards"], batch["values"], mask, 0.99, 0.95)),
        "group": (functools.partial(ppo.group_advantages, group_size=3), (batch["scores"],)),
        "whiten": (ppo.whiten, (batch["values"], mask)),
        "policy_loss": (ppo.policy_loss,
                        (batch["logprobs"], batch["old_logprobs"], batch["advantages"], mask)),
        "value_loss": (ppo.value_loss,
                       (batch["values"], batch["values"] * 0.7, batch["returns"], mask)),
        "masked_mean": (losses.masked_mean, (batch["values"], mask)),
    }
    for name, (fn, args) in calls.items():
        eager = jax.tree.leaves(fn(*args))
        jitted = jax.tree.leaves(jax.jit(fn)(*args))
        assert len(eager) == len(jitted), name
        for e, j in zip(eager, jitted):
            np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-6, err_msg=name)


def test_group_advantages_with_every_sample_scored_are_bit_for_bit_the_plain_formula():
    # The masked form must not change a run in which no judge failed (the embedded world). The
    # trainer computes advantages eagerly, as here; under jit XLA may reorder either form.
    scores = np.random.default_rng(18).uniform(0, 2, 64).astype(np.float32)
    groups = jnp.asarray(scores).reshape(-1, 4)
    plain = (groups - jnp.mean(groups, axis=1, keepdims=True)) / (jnp.std(groups, axis=1, keepdims=True, ddof=1) + 1e-6)
    for valid in (None, np.ones(64, bool)):
        np.testing.assert_array_equal(ppo.group_advantages(scores, 4, valid), plain.reshape(-1))
