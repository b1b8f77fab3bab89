"""Trimmed PPO batches: cutting shared padding changes no log-prob, value or loss; length-grouped minibatches."""

import jax
import numpy as np

from rlpa_jax.model.qwen2 import Qwen2Config, critic_params_from_policy, init_params
from rlpa_jax.rl.experience import Experience, ForwardPasses, length_grouped_minibatches, prompt_lengths, trim_padding
from rlpa_jax.rl.objectives import actor_loss_fn, critic_loss_fn, response_tokens
from rlpa_jax.training.forwards import response_logprobs
from rlpa_jax.training.updater import Updater

CONFIG = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
PROMPT, RESPONSE = 32, 16
BUCKETS = (8, 16, 32)


def packed_batch(prompt_lengths, response_lengths, seed=0):
    """Rows as pack_samples lays them out: prompts left-padded to PROMPT, responses right-padded to RESPONSE."""
    rng = np.random.default_rng(seed)
    rows = len(prompt_lengths)
    tokens = np.zeros((rows, PROMPT + RESPONSE), np.int32)
    attention = np.zeros(tokens.shape, bool)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        tokens[i, PROMPT - p:PROMPT + r] = rng.integers(1, CONFIG.vocab_size, p + r)
        attention[i, PROMPT - p:PROMPT + r] = True
    response_mask = attention[:, PROMPT:].copy()
    return Experience(
        tokens=tokens, attention_mask=attention, response_mask=response_mask,
        old_logprobs=rng.normal(-4, 0.3, (rows, RESPONSE)).astype(np.float32) * response_mask,
        advantages=rng.normal(size=(rows, RESPONSE)).astype(np.float32) * response_mask,
        returns=rng.normal(size=(rows, RESPONSE)).astype(np.float32) * response_mask,
        old_values=rng.normal(size=(rows, RESPONSE)).astype(np.float32) * 0.1 * response_mask,
        scores=rng.normal(size=(rows,)).astype(np.float32),
    )


def test_trim_cuts_to_the_buckets_of_the_longest_row():
    batch = packed_batch([5, 11, 3], [4, 9, 1])
    trimmed = trim_padding(batch, BUCKETS, response_buckets=(4, 8, 12, 16))
    assert trimmed.tokens.shape == (3, 16 + 12) and trimmed.response_mask.shape == (3, 12)
    assert trimmed.advantages.shape == (3, 12) and trimmed.scores.shape == (3,)
    # Nothing real is cut: every row keeps all its tokens.
    assert trimmed.attention_mask.sum() == batch.attention_mask.sum()
    np.testing.assert_array_equal(prompt_lengths(trimmed), [5, 11, 3])
    # A batch already at its buckets stays as it is.
    full = packed_batch([32, 2], [16, 1])
    assert trim_padding(full, BUCKETS).tokens.shape == full.tokens.shape


def test_trimmed_batches_give_the_same_logprobs_values_and_losses():
    params = init_params(CONFIG, jax.random.key(0))
    critic = critic_params_from_policy(params, CONFIG)
    critic["value_kernel"] = jax.random.normal(jax.random.key(1), (CONFIG.hidden_size,)) * 0.1
    batch = packed_batch([5, 11, 3, 7], [4, 9, 1, 6])
    trimmed = trim_padding(batch, BUCKETS, response_buckets=(12,))
    kept = trimmed.response_mask.shape[1]

    full_lp = response_logprobs(params, CONFIG, batch.tokens, batch.attention_mask, RESPONSE)
    cut_lp = response_logprobs(params, CONFIG, trimmed.tokens, trimmed.attention_mask, kept)
    mask = trimmed.response_mask
    np.testing.assert_allclose(np.asarray(cut_lp)[mask], np.asarray(full_lp)[:, :kept][mask], atol=1e-5)

    for loss_fn, p in ((actor_loss_fn(CONFIG, 0.2, 0.01), params), (critic_loss_fn(CONFIG, 0.2), critic)):
        full_terms, cut_terms = loss_fn(p, batch), loss_fn(p, trimmed)
        np.testing.assert_allclose(np.asarray(cut_terms.total), np.asarray(full_terms.total), rtol=1e-5, atol=1e-6)
        assert float(cut_terms.count) == float(full_terms.count)


def test_forward_passes_trim_each_chunk_without_changing_results():
    params = init_params(CONFIG, jax.random.key(0))
    critic = critic_params_from_policy(params, CONFIG)
    batch = packed_batch([3, 4, 2, 30, 12, 5], [2, 16, 3, 5, 1, 8])
    plain = ForwardPasses(CONFIG, chunk_rows=2)
    trimming = ForwardPasses(CONFIG, chunk_rows=2, trim=lambda chunk: trim_padding(chunk, BUCKETS))
    np.testing.assert_allclose(trimming.logprobs(params, batch), plain.logprobs(params, batch), atol=1e-5)
    np.testing.assert_allclose(trimming.values(critic, batch), plain.values(critic, batch), atol=1e-5)


def test_length_grouped_minibatches_partition_rows_by_length():
    lengths = np.array([50, 10, 300, 12, 290, 55, 11, 310, 52, 305, 9, 48])
    minibatches = length_grouped_minibatches(lengths, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(minibatches).tolist()) == list(range(12))
    assert all(len(rows) == 3 for rows in minibatches)
    # Sorted by length before cutting: each minibatch holds one length class here.
    assert sorted(sorted(lengths[rows].tolist()) for rows in minibatches) == [
        [9, 10, 11], [12, 48, 50], [52, 55, 290], [300, 305, 310]]
    again = length_grouped_minibatches(lengths, 3, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(minibatches, again))
    # Rows of equal length meet in random company: another seed gives another order.
    other = length_grouped_minibatches(np.zeros(12), 3, np.random.default_rng(1))
    assert [r.tolist() for r in other] != [r.tolist() for r in length_grouped_minibatches(np.zeros(12), 3, np.random.default_rng(0))]


def test_an_update_on_trimmed_micro_batches_equals_the_untrimmed_update():
    import optax

    params = init_params(CONFIG, jax.random.key(0))
    batch = packed_batch([5, 11, 3, 7, 30, 2, 9, 4], [4, 9, 1, 6, 16, 2, 3, 5])
    batch = batch.only("tokens", "attention_mask", "response_mask", "old_logprobs", "advantages")
    results = []
    for trim in (None, lambda micro: trim_padding(micro, BUCKETS, response_buckets=(4, 8, 16))):
        updater = Updater(actor_loss_fn(CONFIG, 0.2, 0.0), optax.sgd(0.5), micro_batch_size=2, loss_mask=response_tokens,
                          trim=trim)
        trainable, metrics = updater(updater.init(jax.tree.map(lambda x: x.copy(), params)), batch)
        results.append((trainable.params, metrics))
    (plain, plain_metrics), (trimmed, trimmed_metrics) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), trimmed, plain)
    np.testing.assert_allclose(trimmed_metrics["loss_mean"], plain_metrics["loss_mean"], atol=1e-6)
