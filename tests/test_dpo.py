"""DPO: the loss and its gradient against numpy, sequence log-probs against a full forward, preference
pairs from the scripted world against the embedded judge, and a short run on a tiny random model."""

import asyncio
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_corpus import synthetic_corpus

from rlpa_jax.config.tree import DPOConfig, MeshConfig
from rlpa_jax.dialogue.chat import load_prompt, parse_turn
from rlpa_jax.dialogue.judges import ResponseRequest
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem, profile_f1
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params
from rlpa_jax.model.tokenizer import IM_END, load_tokenizer, train_tiny_tokenizer
from rlpa_jax.offline import dpo, sft, teacher

CONFIG = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
SYSTEM = load_prompt("policy_system_tiny")
LN2 = float(np.log(2.0))
# Eager Flax init takes seconds per call; compiled once, every further key is instant.
random_params = jax.jit(lambda key: init_params(CONFIG, key))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=CONFIG.vocab_size))


def numpy_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_sigmoid(x):
    return np.exp(numpy_log_sigmoid(x))


def numpy_token_logps(params, tokens, attention):
    """float64 log p(token t | tokens before t) for t >= 1, from one full forward: (rows, L - 1)."""
    logits = np.asarray(jax.jit(forward, static_argnums=1)(params, CONFIG, tokens, attention)[0], np.float64)[:, :-1]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_and_its_gradient_equal_numpy(label_smoothing):
    rng = np.random.default_rng(0)
    logps = [rng.normal(-40.0, 8.0, 6).astype(np.float32) for _ in range(4)]
    logps[0][0] += 500.0  # a huge margin each way: log-sigmoid must stay finite
    logps[1][1] += 500.0
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = dpo.dpo_losses(*logps, beta, label_smoothing)

    pc, pr, rc, rr = (x.astype(np.float64) for x in logps)
    margin = beta * ((pc - rc) - (pr - rr))
    expected = -(1 - label_smoothing) * numpy_log_sigmoid(margin) - label_smoothing * numpy_log_sigmoid(-margin)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(np.asarray(chosen_rewards), beta * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected_rewards), beta * (pr - rr), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(losses)))

    total = lambda *x: jnp.sum(dpo.dpo_losses(*x, beta, label_smoothing)[0])  # noqa: E731
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*map(jnp.asarray, logps))
    # d loss / d pc = -(1 - eps) * beta * sigmoid(-beta m) + eps * beta * sigmoid(beta m); the others by sign.
    d_chosen = -(1 - label_smoothing) * beta * numpy_sigmoid(-margin) + label_smoothing * beta * numpy_sigmoid(margin)
    for grad, sign in zip(grads, (1.0, -1.0, -1.0, 1.0)):
        np.testing.assert_allclose(np.asarray(grad), sign * d_chosen, rtol=1e-4, atol=1e-7)


def test_sequence_logps_equal_a_numpy_sum_of_token_logps():
    params = random_params(jax.random.key(1))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    attention = np.ones((4, 12), bool)
    attention[1, :5] = attention[3, :2] = False  # left padding
    response_mask = np.zeros((4, 6), np.float32)  # the last 6 positions
    response_mask[0, :] = response_mask[1, 3:] = response_mask[2, 1:] = response_mask[3, 5:] = 1.0
    got = jax.jit(lambda p: dpo.sequence_logps(p, CONFIG, tokens, attention, response_mask))(params)

    token_logps = numpy_token_logps(params, tokens, attention)  # column t - 1 scores token t
    expected = (token_logps[:, -6:] * response_mask).sum(axis=1)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_dpo_loss_fn_pairs_rows_and_fills_the_diagnostics():
    params = random_params(jax.random.key(2))
    rng = np.random.default_rng(1)
    pairs, length, window = 3, 14, 5
    tokens = rng.integers(0, CONFIG.vocab_size, (pairs, 2, length)).astype(np.int32)
    attention = np.ones((pairs, 2, length), bool)
    attention[0, 1, :6] = attention[2, 0, :3] = False
    response_mask = np.zeros((pairs, 2, window), np.float32)
    response_mask[:, 0, 1:] = response_mask[:, 1, 3:] = 1.0
    response_mask[1, 0, :] = 1.0
    token_logps = numpy_token_logps(params, tokens.reshape(-1, length), attention.reshape(-1, length))
    policy = (token_logps[:, -window:] * response_mask.reshape(-1, window)).sum(axis=1).reshape(pairs, 2)
    # References around the policy's own values, so some margins are positive and some negative.
    reference = policy + rng.normal(0.0, 2.0, (pairs, 2))
    batch = {"tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
             "pair_mask": np.array([1.0, 1.0, 0.0], np.float32),  # the last pair is padding
             "reference_chosen_logps": reference[:, 0].astype(np.float32),
             "reference_rejected_logps": reference[:, 1].astype(np.float32)}
    beta, eps = 0.5, 0.1
    terms = jax.jit(dpo.dpo_loss_fn(CONFIG, beta, eps))(params, batch)

    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    losses = -(1 - eps) * numpy_log_sigmoid(margin) - eps * numpy_log_sigmoid(-margin)
    used = batch["pair_mask"] > 0
    assert float(terms.count) == 2.0
    np.testing.assert_allclose(float(terms.total), losses[used].sum(), rtol=1e-4)
    assert float(terms.sums["reward_accuracy"]) == np.sum(margin[used] > 0)  # a count of pairs
    np.testing.assert_allclose(float(terms.sums["reward_margin"]), margin[used].sum(), rtol=1e-4, atol=1e-4)


def judged_pass_rate(personas, histories, texts):
    requests = [ResponseRequest(persona, history, parse_turn(text).response)
                for persona, history, text in zip(personas, histories, texts)]
    return float(np.mean(asyncio.run(EmbeddedResponseJudge().judge(requests))))


def profile_f1_of(persona, text):
    inferred = parse_turn(text).profile
    matched = asyncio.run(EmbeddedProfileJudge().count_matches([(inferred, persona.items)]))[0]
    return profile_f1(matched, len(inferred), len(persona.items))


def test_preference_pairs_are_the_teacher_dialogues_against_misread_turns():
    personas, turns = synthetic_personas(30, seed=4), 4
    pairs = dpo.preference_pairs(personas, num_turns=turns, seed=3)
    assert pairs == dpo.preference_pairs(personas, num_turns=turns, seed=3)
    assert pairs != dpo.preference_pairs(personas, num_turns=turns, seed=4)
    dialogues = teacher.scripted_dialogues(personas, num_turns=turns, seed=3)
    assert [(h, c) for h, c, _ in pairs] == [example for dialogue in dialogues for example in dialogue]
    assert all(chosen != rejected for _, chosen, rejected in pairs)
    assert all(parse_turn(rejected).well_formed for _, _, rejected in pairs)

    owners = [personas[index // turns] for index in range(len(pairs))]
    # Once the user has told something, the rejected turn keeps the teacher's wording but gets the
    # facts wrong: a lower profile F1 on every such pair, and a reply of the same shape.
    told = [(owner, chosen, rejected) for owner, (history, chosen, rejected) in zip(owners, pairs)
            if parse_turn(chosen).profile]
    assert len(told) >= 2 * len(personas)
    assert all(profile_f1_of(o, r) < profile_f1_of(o, c) for o, c, r in told)
    same_shape = [len(parse_turn(c).response.split()) == len(parse_turn(r).response.split()) for _, c, r in told]
    assert np.mean(same_shape) > 0.5

    histories = [history for history, _, _ in pairs]
    chosen_rate = judged_pass_rate(owners, histories, [chosen for _, chosen, _ in pairs])
    rejected_rate = judged_pass_rate(owners, histories, [rejected for _, _, rejected in pairs])
    assert chosen_rate >= 0.8 and rejected_rate < chosen_rate, (chosen_rate, rejected_rate)


def test_misread_turn_swaps_every_revealed_value_for_another_of_its_slot():
    told = [ProfileItem("Occupation", "nurse"), ProfileItem("Interests", "hiking")]
    values = {"Occupation": ["architect", "nurse"], "Interests": ["hiking", "yoga"]}
    profile, reply = teacher.misread_turn(told, told, "Being a nurse who loves hiking, nurse.", values,
                                          random.Random(0))
    assert profile == [ProfileItem("Occupation", "architect"), ProfileItem("Interests", "yoga")]
    assert reply == "Being an architect who loves yoga, architect."
    assert teacher.misread_turn([], [], "Hi there!", values, random.Random(0)) is None
    assert teacher.misread_turn(told[:1], told[:1], "Hi", {"Occupation": ["nurse"]}, random.Random(0)) is None


def test_examples_interleave_each_pair_over_one_shared_prompt(tokenizer):
    pairs = dpo.preference_pairs(synthetic_personas(3, seed=7), num_turns=3, seed=0)
    examples = dpo.build_dpo_examples(pairs, tokenizer, max_length=1024, system_prompt=SYSTEM)
    tokens, attention, loss_mask = examples["tokens"], examples["attention_mask"], examples["loss_mask"]
    assert tokens.shape[0] == 2 * len(pairs) and tokens.shape[1] % 128 == 0
    for index, (history, chosen, rejected) in enumerate(pairs):
        prompt = sft.prompt_token_ids(tokenizer, history, SYSTEM)
        for row, text in ((2 * index, chosen), (2 * index + 1, rejected)):
            real = tokens[row][attention[row]].tolist()
            assert real[: len(prompt)] == prompt
            assert tokenizer.decode(tokens[row][loss_mask[row] > 0]) == text + IM_END
            assert loss_mask[row].sum() == len(real) - len(prompt)

    window = dpo.response_window(examples)
    batch = dpo.pair_batch(examples, np.array([4, 1]), window)
    length = batch["tokens"].shape[-1]
    assert batch["tokens"].shape == (2, 2, length) and batch["response_mask"].shape == (2, 2, min(window, length - 1))
    np.testing.assert_array_equal(batch["tokens"][0, 1], tokens[9, -length:])
    # The window holds every target token of the batch's rows.
    assert batch["response_mask"].sum() == loss_mask[[8, 9, 2, 3]].sum()


def test_a_long_pair_drops_old_turns_from_both_sides_alike(tokenizer):
    history, chosen, rejected = dpo.preference_pairs(synthetic_personas(1, seed=8), num_turns=5, seed=0)[-1]
    longer = max(len(sft.target_token_ids(tokenizer, text)) for text in (chosen, rejected))
    full = len(sft.prompt_token_ids(tokenizer, history, SYSTEM)) + longer
    examples = dpo.build_dpo_examples([(history, chosen, rejected)], tokenizer, full - 1, SYSTEM)
    tokens, attention, loss_mask = examples["tokens"], examples["attention_mask"], examples["loss_mask"]
    prompts = [tokens[row][attention[row] & (loss_mask[row] == 0)].tolist() for row in (0, 1)]
    assert prompts[0] == prompts[1] and len(prompts[0]) + longer < full
    assert tokenizer.decode(tokens[1][loss_mask[1] > 0]) == rejected + IM_END


def test_short_dpo_run_learns_to_prefer_the_teacher(tokenizer):
    pairs = dpo.preference_pairs(synthetic_personas(32, seed=0), num_turns=2, seed=0)
    held_out = dpo.preference_pairs(synthetic_personas(16, seed=10_000), num_turns=2, seed=1)
    buckets = (256,)  # one length bucket: one compiled step
    examples = dpo.build_dpo_examples(pairs, tokenizer, 256, SYSTEM, length_buckets=buckets)
    held_out_examples = dpo.build_dpo_examples(held_out, tokenizer, 256, SYSTEM, length_buckets=buckets)
    params = random_params(jax.random.key(0))
    reference_held_out = dpo.preference_logps(params, CONFIG, held_out_examples, 8, length_buckets=buckets)

    settings = DPOConfig(beta=0.1, steps=32, learning_rate=1e-3, batch_size=8, warmup_steps=2)
    params, history = dpo.train_dpo(params, CONFIG, examples, settings, seed=0, progress=False,
                                    length_buckets=buckets)
    policy_held_out = dpo.preference_logps(params, CONFIG, held_out_examples, 8, length_buckets=buckets)

    losses = [record["loss"] for record in history]
    accuracy = np.mean([record["reward_accuracy"] for record in history[-4:]])
    held_out_accuracy = dpo.reward_accuracy(policy_held_out, reference_held_out)
    # The first step sees policy == reference: every pair's loss is log 2, averaged per pair.
    assert len(history) == 32 and abs(losses[0] - LN2) < 1e-4, losses[0]
    assert np.mean(losses[-4:]) < 0.5 * LN2, losses  # ~0.69 -> ~0.2
    # Held-out pairs are half misread turns (only the facts differ): well above chance (0.5), not 1.
    assert accuracy >= 0.9 and held_out_accuracy >= 0.65, (accuracy, held_out_accuracy)
    assert history[-1]["reward_margin"] > 0.3


def test_dpo_on_a_mesh_matches_one_device(tokenizer):
    from rlpa_jax.runtime import parallel
    from rlpa_jax.runtime.parallel import param_shardings

    pairs = dpo.preference_pairs(synthetic_personas(4, seed=1), num_turns=1, seed=0)
    # A one-word system prompt keeps these first turns within one 128-token bucket.
    examples = dpo.build_dpo_examples(pairs, tokenizer, 128, "Reply.", length_buckets=(128,))
    settings = DPOConfig(steps=2, learning_rate=1e-3, batch_size=4, warmup_steps=0)
    params = random_params(jax.random.key(3))
    _, single = dpo.train_dpo(jax.tree.map(jnp.copy, params), CONFIG, examples, settings, seed=0, progress=False,
                              length_buckets=(128,))

    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
    shardings = param_shardings(CONFIG, mesh)
    _, sharded = dpo.train_dpo(parallel.shard(params, shardings), CONFIG, examples, settings, seed=0, progress=False,
                               mesh=mesh, param_shardings=shardings, length_buckets=(128,))
    for key in ("loss", "reward_margin", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in sharded], [r[key] for r in single], rtol=2e-3, atol=1e-5)
    assert single[-1]["loss"] < single[0]["loss"]
