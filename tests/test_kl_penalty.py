"""ppo.kl_penalty=loss (the KL to the reference as a term of the actor loss) and the skipped actor
scoring forward of one on-policy step: the loss against a hand-written one, the update with
skipped old log-probs against the update with recomputed ones, and when the trainer skips."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlpa_jax.config.tree import PPOConfig
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.rl import advantages
from rlpa_jax.rl.experience import Experience, ExperienceBuilder, ForwardPasses, scores_old_logprobs
from rlpa_jax.rl.objectives import actor_loss_fn, response_tokens
from rlpa_jax.rl.ppo import AdvantageSettings
from rlpa_jax.training.forwards import response_logprobs
from rlpa_jax.training.updater import Updater

CONFIG = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
PROMPT, RESPONSE, ROWS, GROUP = 8, 6, 8, 4


def packed(seed=0) -> Experience:
    """Rows as pack_samples lays them out, with scores for GRPO groups of GROUP samples."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (ROWS, PROMPT + RESPONSE)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    attention[::2, :3] = False
    response_mask = np.arange(RESPONSE)[None] < rng.integers(1, RESPONSE + 1, ROWS)[:, None]
    attention[:, PROMPT:] = response_mask
    return Experience(tokens=tokens, attention_mask=attention, response_mask=response_mask,
                      scores=rng.random(ROWS).astype(np.float32), valid=np.ones(ROWS, bool))


def params(seed):
    return init_params(CONFIG, jax.random.key(seed))


def builder(kl_penalty="reward", score_actor=True, estimator="k3"):
    return ExperienceBuilder(ForwardPasses(CONFIG, chunk_rows=ROWS), advantages.lookup("grpo", "turn", GROUP),
                             pad_id=0, response_length=RESPONSE, prompt_buckets=(PROMPT,), reward_mode="both",
                             kl_estimator=estimator, whiten_advantages=False, kl_penalty=kl_penalty,
                             score_actor=score_actor)


def settings(kl_coef):
    return AdvantageSettings(gamma=1.0, lam=0.95, group_size=GROUP, kl_coef=kl_coef)


def sgd_update(batch: Experience, estimator="k3", seed=0):
    """One SGD step (any gradient difference shows 1:1) over two micro-batches, from params(seed)."""
    updater = Updater(actor_loss_fn(CONFIG, 0.2, 0.0, estimator), optax.sgd(0.5), ROWS // 2, response_tokens)
    return updater(updater.init(params(seed)), batch)


def test_kl_term_in_the_loss_equals_a_hand_written_loss_and_gradient():
    rng = np.random.default_rng(3)
    batch = packed().replace(
        old_logprobs=rng.normal(-4.8, 0.2, (ROWS, RESPONSE)).astype(np.float32),
        reference_logprobs=rng.normal(-4.8, 0.3, (ROWS, RESPONSE)).astype(np.float32),
        advantages=rng.normal(size=(ROWS, RESPONSE)).astype(np.float32),
        kl_coef=np.full(ROWS, 0.3, np.float32))
    mask = batch.response_mask.astype(np.float32)

    def by_hand(p):
        logp = response_logprobs(p, CONFIG, batch.tokens, batch.attention_mask, RESPONSE)
        ratio = jnp.exp(logp - batch.old_logprobs)
        surrogate = jnp.maximum(-batch.advantages * ratio, -batch.advantages * jnp.clip(ratio, 0.8, 1.2))
        log_r = batch.reference_logprobs - logp  # k3 = r - 1 - log r, r = pi_ref / pi
        k3 = jnp.exp(log_r) - 1.0 - log_r
        return jnp.sum((surrogate + 0.3 * k3) * mask) / mask.sum(), jnp.sum(k3 * mask) / mask.sum()

    loss_fn = actor_loss_fn(CONFIG, 0.2, 0.0, "k3")

    def ours(p):
        terms = loss_fn(p, batch)
        return terms.total / terms.count, terms.sums["kl"] / terms.count

    (want, want_kl), want_grad = jax.value_and_grad(by_hand, has_aux=True)(params(0))
    (got, got_kl), got_grad = jax.value_and_grad(ours, has_aux=True)(params(0))
    assert float(want_kl) > 0.01 and float(got) == pytest.approx(float(want), abs=1e-6)
    assert float(got_kl) == pytest.approx(float(want_kl), abs=1e-6)
    chex.assert_trees_all_close(got_grad, want_grad, atol=1e-6, rtol=0)
    # The KL term moves the gradient (the comparison above would see a missing term).
    no_kl = actor_loss_fn(CONFIG, 0.2, 0.0, "k3")
    plain = jax.grad(lambda p: no_kl(p, batch.replace(reference_logprobs=None, kl_coef=None)).total)(params(0))
    assert np.abs(np.asarray(plain["embed"]) - np.asarray(want_grad["embed"]) * mask.sum()).max() > 1e-4


def test_loss_placement_with_kl_coef_zero_updates_like_reward_placement():
    experience = packed()
    reward = builder("reward").score(experience, params(0), params(1), None, settings(0.0))
    loss = builder("loss").score(experience, params(0), params(1), None, settings(0.0))
    assert "reference_logprobs" in builder("loss").update_fields and "kl_coef" in builder("loss").update_fields
    reward_state, _ = sgd_update(reward.only(*builder("reward").update_fields))
    loss_state, loss_metrics = sgd_update(loss.only(*builder("loss").update_fields))
    chex.assert_trees_all_close(loss_state.params, reward_state.params, atol=1e-6, rtol=0)
    # The KL was still measured: the reference differs from the actor.
    assert float(loss_metrics["loss_kl"]) > 0


def test_loss_placement_keeps_the_kl_out_of_the_advantages():
    experience = packed()
    with_kl = builder("loss").score(experience, params(0), params(1), None, settings(0.5))
    without = builder("reward").score(experience, params(0), params(1), None, settings(0.0))
    np.testing.assert_array_equal(with_kl.advantages, without.advantages)
    np.testing.assert_array_equal(with_kl.kl_coef, np.full(ROWS, 0.5, np.float32))
    assert with_kl.kl[experience.response_mask].mean() > 0  # the per-token estimate stays, for the metrics
    reward = builder("reward").score(experience, params(0), params(1), None, settings(0.5))
    assert np.abs(reward.advantages - with_kl.advantages).max() > 1e-3


def test_skipped_old_forward_updates_like_recomputed_old_logprobs():
    experience = packed()
    actor = params(2)
    scored = builder("loss").score(experience, actor, params(1), None, settings(0.2))
    skipped = builder("loss", score_actor=False).score(experience, actor, params(1), None, settings(0.2))
    assert skipped.old_logprobs is None and not skipped.kl.any()
    assert "old_logprobs" not in builder("loss", score_actor=False).update_fields
    np.testing.assert_array_equal(skipped.advantages, scored.advantages)
    want, want_metrics = sgd_update(scored.only(*builder("loss").update_fields), seed=2)
    got, got_metrics = sgd_update(skipped.only(*builder("loss", score_actor=False).update_fields), seed=2)
    chex.assert_trees_all_close(got.params, want.params, atol=1e-5, rtol=0)
    assert float(got_metrics["loss_approx_kl"]) == 0.0 and float(got_metrics["loss_clip_fraction"]) == 0.0
    # On-policy, the KL the update measured is the one the old forward would have given.
    assert float(got_metrics["loss_kl"]) == pytest.approx(float(scored.kl[experience.response_mask].mean()), rel=1e-4)
    # Old log-probs that are off by a little move the parameters elsewhere: the comparison can fail.
    shifted = scored.replace(old_logprobs=scored.old_logprobs + 0.1 * experience.response_mask)
    wrong, _ = sgd_update(shifted.only(*builder("loss").update_fields), seed=2)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(wrong.params), jax.tree.leaves(want.params))) > 1e-4


def test_reward_placement_cannot_skip_the_old_forward_with_a_kl_coefficient():
    with pytest.raises(ValueError, match="kl_penalty=reward"):
        builder("reward", score_actor=False).score(packed(), params(0), params(1), None, settings(0.1))
    with pytest.raises(ValueError, match="ppo.kl_penalty='bogus'"):
        builder("bogus")


@pytest.mark.parametrize("changes, rows, scores", [
    (dict(kl_penalty="loss"), 8, False),
    (dict(kl_penalty="loss"), 16, True),  # two minibatches
    (dict(kl_penalty="loss", epochs=2), 8, True),
    (dict(kl_penalty="reward", kl_coef=0.0), 8, False),
    (dict(kl_penalty="reward", kl_coef=0.0, adaptive_kl=True), 8, False),  # 0 stays 0
    (dict(kl_penalty="reward"), 8, True),  # the advantages need the old log-probs
])
def test_the_old_forward_is_skipped_exactly_for_one_on_policy_step(changes, rows, scores):
    p = dataclasses.replace(PPOConfig(train_batch_size=8, micro_batch_size=4, epochs=1), **changes)
    assert scores_old_logprobs(p, rows) is scores


def test_a_bad_kl_penalty_names_the_key_and_the_choices():
    from rlpa_jax.config.loading import load_config
    from rlpa_jax.config.options import ConfigError
    with pytest.raises(ConfigError, match=r"ppo.kl_penalty: expected one of \['reward', 'loss'\], got 'bogus'"):
        load_config(None, ["ppo.kl_penalty=bogus"])
    assert load_config(None, []).ppo.kl_penalty == "reward"  # the embedded default (make demo) is unchanged
