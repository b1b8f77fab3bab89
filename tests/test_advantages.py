"""Advantage estimators and credit schemes (rl/advantages.py), on Experiences packed from samples."""

import chex
import numpy as np
import pytest

from rlpa_jax.dialogue.chat import parse_turn
from rlpa_jax.dialogue.judges import TurnScore
from rlpa_jax.rl import advantages, ppo
from rlpa_jax.rl.experience import pack_samples
from rlpa_jax.rl.rollout import Sample

# One prompt, four samples: profile F1 and response gate vary independently.
PARTS = [(0.0, 1.0), (0.5, 1.0), (1.0, 0.0), (0.5, 0.0)]
SETTINGS = ppo.AdvantageSettings(gamma=1.0, lam=1.0, group_size=4, kl_coef=0.0)


def samples(profile_length=2, **extra):
    return [Sample(0, 0, j, np.array([5, 6], np.int32), np.arange(6, dtype=np.int32), np.zeros(6, np.float32), "",
                   parse_turn(""), TurnScore(f1, ok, f1 + ok, True, True), f1 + ok, profile_length=profile_length,
                   **{k: v(j) for k, v in extra.items()})
            for j, (f1, ok) in enumerate(PARTS)]


def scored(experience, kl=None, values=None):
    """The fields the builder adds before estimating: KL (zeros here) and the critic's values."""
    zeros = np.zeros(experience.response_mask.shape, np.float32)
    return experience.replace(kl=zeros if kl is None else kl, old_values=zeros if values is None else values)


def test_packed_rows_keep_each_blocks_reward_and_the_profile_tokens():
    score = TurnScore(0.5, 1.0, 1.5, True, True)
    rows = [Sample(0, 0, j, np.array([5, 6, 7], np.int32), np.arange(6, dtype=np.int32), np.zeros(6, np.float32),
                   "", parse_turn(""), score, 1.5, profile_length=length) for j, length in enumerate((4, 0))]
    for mode, parts in (("both", (0.5, 1.0)), ("profile", (0.5, 0.0)), ("response", (0.0, 1.0))):
        experience = pack_samples(rows, 0, 8, (4, 8), reward_mode=mode)
        assert (experience.profile_scores[0], experience.response_scores[0]) == parts
    np.testing.assert_array_equal(experience.profile_mask[:, :5], [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    assert experience.tokens.shape == (2, 4 + 8) and experience.old_logprobs is None


def test_block_credit_gives_profile_tokens_the_profile_advantage():
    experience = scored(pack_samples(samples(), 0, 6, (2,)))
    got, returns = advantages.lookup("grpo", "block")(experience, SETTINGS)
    profile = np.asarray(ppo.group_advantages(np.array([f1 for f1, _ in PARTS]), 4))
    response = np.asarray(ppo.group_advantages(np.array([ok for _, ok in PARTS]), 4))
    expected = np.concatenate([np.repeat(profile[:, None], 2, 1), np.repeat(response[:, None], 4, 1)], axis=1)
    chex.assert_trees_all_close((got, returns), (expected, np.zeros((4, 6))), rtol=1e-6)
    turn, _ = advantages.lookup("grpo", "turn")(experience, SETTINGS)
    totals = np.asarray(ppo.group_advantages(np.array([f1 + ok for f1, ok in PARTS]), 4))
    np.testing.assert_allclose(turn, np.repeat(totals[:, None], 6, 1), rtol=1e-6)


def test_item_credit_replaces_the_profile_advantage_on_item_tokens():
    experience = scored(pack_samples(samples(3, item_credit=lambda j: np.array([0, 0.2 * j, 0, 0, 0, 0], np.float32),
                                             item_mask=lambda j: np.array([0, 1, 0, 0, 0, 0], bool)), 0, 6, (2,)))
    block, _ = advantages.lookup("grpo", "block")(experience, SETTINGS)
    item, _ = advantages.lookup("grpo", "item")(experience, SETTINGS)
    credits = 0.2 * np.arange(4)
    np.testing.assert_allclose(item[:, 1], credits / np.sqrt(np.mean(credits**2)), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(item, 1, axis=1), np.delete(block, 1, axis=1))
    with pytest.raises(ValueError, match="ppo.credit=item needs ppo.advantage=grpo"):
        advantages.lookup("gae", "item")


def test_gae_with_block_credit_puts_each_score_on_its_blocks_last_token():
    kl = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32) * 0.1
    values = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    experience = scored(pack_samples(samples(), 0, 6, (2,)), kl=kl, values=values)
    settings = ppo.AdvantageSettings(gamma=1.0, lam=0.9, group_size=4, kl_coef=0.05)
    got, returns = advantages.lookup("gae", "block")(experience, settings)
    rewards = -0.05 * kl
    rewards[:, 1] += [f1 for f1, _ in PARTS]  # the <profile> block ends at token 1
    rewards[:, 5] += [ok for _, ok in PARTS]  # the reply ends the turn
    expected = ppo.gae_advantages(rewards, values, np.ones((4, 6)), 1.0, 0.9)
    chex.assert_trees_all_close((got, returns), expected, rtol=1e-5, atol=1e-6)


def test_the_tables_say_what_each_estimator_and_scheme_needs():
    assert advantages.lookup("gae", "turn").needs_critic and advantages.lookup("cross_turn", "turn").needs_critic
    assert not advantages.lookup("grpo", "turn").needs_critic
    assert advantages.lookup("grpo", "item").needs_item_credit and not advantages.lookup("grpo", "block").needs_item_credit
    with pytest.raises(ValueError, match=r"ppo.advantage='td' is not one of gae, cross_turn, grpo"):
        advantages.lookup("td", "turn")
    with pytest.raises(ValueError, match=r"ppo.credit='items' is not one of turn, block, item"):
        advantages.lookup("grpo", "items")


# ----------------------------------------------------------------------------- extending the table
# docs/ARCHITECTURE.md "Extending": a new estimator is one function and one table entry. RLOO (each sample's
# baseline is the mean score of the prompt's other samples) needs no critic.


def leave_one_out(experience, credit, settings):
    n = settings.group_size
    advantages = 0.0
    for block in credit.blocks(experience):
        groups = np.asarray(block.scores, np.float32).reshape(-1, n)
        baseline = (groups.sum(axis=1, keepdims=True) - groups) / (n - 1)
        advantages = advantages + (groups - baseline).reshape(-1, 1) * block.mask
    advantages = advantages - settings.kl_coef * experience.kl * experience.response_mask
    return advantages, np.zeros_like(advantages)


def test_a_new_estimator_is_one_function_and_one_table_entry(monkeypatch, tmp_path):
    from rlpa_jax.app import build

    monkeypatch.setitem(advantages.ADVANTAGE_ESTIMATORS, "rloo", advantages.AdvantageEstimator(
        leave_one_out, needs_critic=False, takes_token_credit=False, min_samples_per_prompt=2))
    got, _ = advantages.lookup("rloo", "turn")(scored(pack_samples(samples(), 0, 6, (2,))), SETTINGS)
    totals = np.array([f1 + ok for f1, ok in PARTS])
    np.testing.assert_allclose(got[:, 0], totals - (totals.sum() - totals) / 3, rtol=1e-6)

    # The config accepts the new name, and a PPO iteration trains with it (and no critic).
    config = build.load_config(None, [
        "ppo.advantage=rloo", "ppo.credit=block", f"output_dir={tmp_path}", "sft.enabled=false", "mesh.devices=1",
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
        "rollout.conversations=2", "rollout.max_rounds=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
        "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256", "data.num_personas=16",
        "ppo.train_batch_size=8", "ppo.micro_batch_size=4", "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = build.build_trainer(config)
    state, metrics = trainer.iteration(trainer.initial_state())
    assert np.isfinite(metrics["loss_mean"]) and "critic_loss_mean" not in metrics
    with pytest.raises(Exception, match=r"ppo.advantage='rloo' is not one of"):
        monkeypatch.delitem(advantages.ADVANTAGE_ESTIMATORS, "rloo")
        build.load_config(None, ["ppo.advantage=rloo"])


def test_an_unscored_sample_is_masked_inside_its_group_and_later_groups_keep_their_rows():
    # Two prompts of four samples; the judge failed on sample 1 of the first prompt.
    rows = samples() + [Sample(1, 0, j, s.prompt_tokens, s.response_tokens, s.sampler_logprobs, "", s.parsed,
                               s.score, s.reward, profile_length=2) for j, s in enumerate(samples())]
    failed = TurnScore(0.0, 0.0, 0.0, valid=False, well_formed=True)
    rows[1] = Sample(0, 0, 1, rows[1].prompt_tokens, rows[1].response_tokens, rows[1].sampler_logprobs, "",
                     rows[1].parsed, failed, 0.0, profile_length=2)
    experience = scored(pack_samples(rows, 0, 6, (2,)))
    assert experience.valid.tolist() == [True, False, True, True] + [True] * 4
    assert not experience.response_mask[1].any() and not experience.profile_mask[1].any()
    got, _ = advantages.lookup("grpo", "turn")(experience, SETTINGS)
    totals = np.array([f1 + ok for f1, ok in PARTS])
    kept = totals[[0, 2, 3]]
    np.testing.assert_allclose(got[[0, 2, 3], 0], (kept - kept.mean()) / (kept.std(ddof=1) + 1e-6), rtol=1e-5)
    assert not got[1].any()  # the unscored sample: no advantage, no loss
    np.testing.assert_allclose(got[4:, 0], (totals - totals.mean()) / (totals.std(ddof=1) + 1e-6), rtol=1e-5)
    # A group with no scored sample contributes nothing.
    assert not np.asarray(ppo.group_advantages(np.arange(4.0), 4, np.zeros(4, bool))).any()


def test_estimators_reject_fields_of_the_wrong_shape():
    experience = scored(pack_samples(samples(), 0, 6, (2,)))
    grpo, gae = advantages.lookup("grpo", "turn"), advantages.lookup("gae", "turn")
    with pytest.raises(AssertionError, match=r"rl/advantages.py: kl and old_values are shaped like response_mask"):
        gae(experience.replace(old_values=np.zeros((4, 5), np.float32)), SETTINGS)
    with pytest.raises(AssertionError, match=r"rl/advantages.py: scores has one value per row of response_mask"):
        grpo(experience.replace(scores=experience.scores[:3]), SETTINGS)
    with pytest.raises(AssertionError, match=r"rl/advantages.py: response_mask is \(rows, R\)"):
        grpo(experience.replace(response_mask=experience.response_mask[0]), SETTINGS)


def test_an_estimator_must_return_token_arrays_like_the_response_mask(monkeypatch):
    per_row = advantages.AdvantageEstimator(lambda e, c, s: (e.scores, np.zeros_like(e.scores)),
                                            needs_critic=False, takes_token_credit=False)
    monkeypatch.setitem(advantages.ADVANTAGE_ESTIMATORS, "per_row", per_row)
    with pytest.raises(AssertionError, match=r"an estimator returns \(advantages, returns\) shaped like response_mask"):
        advantages.lookup("per_row", "turn")(scored(pack_samples(samples(), 0, 6, (2,))), SETTINGS)


def test_grpo_takes_rows_padded_past_the_last_whole_group():
    # One prompt of 4 samples packed into 6 rows (rows are padded to a multiple of
    # ppo.micro_batch_size=6): the 2 padding rows end inside a group of 4.
    experience = scored(pack_samples(samples(), 0, 6, (2,), row_multiple=6))
    assert experience.rows == 6 and not experience.valid[4:].any()
    for credit in ("turn", "block"):
        got, returns = advantages.lookup("grpo", credit)(experience, SETTINGS)
        whole, _ = advantages.lookup("grpo", credit)(scored(pack_samples(samples(), 0, 6, (2,))), SETTINGS)
        np.testing.assert_array_equal(got[:4], whole)  # the real rows, as without the padding
        assert got.shape == (6, 6) and not got[4:].any() and not returns.any()
