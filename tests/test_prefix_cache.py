"""Prefix reuse across turns gives what a full prefill gives: the same cache entries, log-probs and tokens."""

import jax
import numpy as np
import pytest
from tiny_corpus import synthetic_corpus

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.users.scripted import ScriptedUser
from rlpa_jax.eval.policies import JaxPolicy
from rlpa_jax.eval.protocol import run_protocol
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.prefix_cache import PrefixSampler, common_prefix_lengths, plan_prefill
from rlpa_jax.generation.sampler import Sampler, SamplingParams, pad_prompts
from rlpa_jax.model.layer_stacks import unstack_layers
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import load_tokenizer, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.rl.environment import Environment, start_conversations
from rlpa_jax.rl.rollout import Rollout
from rlpa_jax.runtime import parallel

PAD, STOP = 0, 1
BUCKETS = (16, 32, 64, 96)


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    # Sharper than the 0.02 init: greedy choices with clear margins, not float-rounding ties.
    params["lm_head"] = params["lm_head"] * 30
    return config, params


def tokens(seed, length):
    return list(np.random.default_rng(seed).integers(2, 200, length))


FIRST = [tokens(1, 40), tokens(2, 11), tokens(3, 25), tokens(4, 30)]
SECOND = [
    FIRST[2][:-3] + tokens(5, 12),  # its last 3 tokens re-rendered, then 12 new ones
    FIRST[0] + tokens(6, 30),  # a longer suffix than row 0's
    tokens(7, 50),  # nothing in common with any kept prompt: a full prefill of its own
    FIRST[3] + tokens(8, 2),  # FIRST[1] is not continued (its conversation ended)
]


def continue_prompts(sampler, params, prompts, previous, key, sampling, batch_multiple=1):
    """One process, no mesh: `prompts` in rows 0.. of a call padded to `batch_multiple` rows."""
    rows = -(-len(prompts) // batch_multiple) * batch_multiple
    placed = dict(enumerate(prompts))
    plan = plan_prefill(placed, list(range(rows)), rows, previous, PAD, BUCKETS)
    return sampler(params, plan, previous, rows, placed, key, sampling)


def full_and_continued(model, sampling, key):
    """(full prefill, continued) generations of SECOND, and the sampler that continued."""
    config, params = model
    sampler = Sampler(config, (STOP,), PAD)
    continuing = PrefixSampler(config, (STOP,), PAD)
    _, kept = continue_prompts(continuing, params, FIRST, None, key, sampling)
    continued, cache = continue_prompts(continuing, params, SECOND, kept, key, sampling)
    full = sampler(params, *pad_prompts(SECOND, PAD, BUCKETS), key, sampling)
    return jax.device_get(full), jax.device_get(continued), continuing, cache


def test_greedy_continuation_equals_a_full_prefill(model):
    sampling = SamplingParams(max_new_tokens=12, temperature=0)
    full, continued, sampler, _ = full_and_continued(model, sampling, jax.random.key(0))
    np.testing.assert_array_equal(continued.tokens, full.tokens)
    np.testing.assert_array_equal(continued.lengths, full.lengths)
    np.testing.assert_allclose(continued.logprobs, full.logprobs, atol=1e-5)
    assert len(set(map(tuple, np.asarray(full.tokens)))) > 1  # the rows really differ
    counts = sampler.counts
    assert counts["rows"] == 8 and counts["reused_rows"] == 3  # the mismatched row kept nothing
    assert counts["full_tokens"] == sum(map(len, FIRST + SECOND))
    # Row 1 shares 40 tokens but keeps 32: the 50-token fresh row makes the suffix block 64 of 96.
    assert counts["kept_tokens"] == 22 + 32 + 30 and counts["prefilled_tokens"] == counts["full_tokens"] - 84
    assert counts["prefilled_slots"] == 4 * 64 + 4 * 64 and counts["full_slots"] == 4 * 64 + 4 * 96


def test_sampled_continuation_equals_a_full_prefill_with_the_same_key(model):
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, num_samples=3)
    full, continued, _, _ = full_and_continued(model, sampling, jax.random.key(5))
    np.testing.assert_array_equal(continued.tokens, full.tokens)
    np.testing.assert_allclose(continued.logprobs, full.logprobs, atol=1e-5)


def test_kept_cache_entries_equal_a_full_prefills(model):
    config, params = model
    sampling = SamplingParams(max_new_tokens=4, temperature=0)
    _, _, _, continued = full_and_continued(model, sampling, jax.random.key(0))
    _, fresh = continue_prompts(PrefixSampler(config, (STOP,), PAD), params, SECOND, None, jax.random.key(0), sampling)
    for row in range(len(SECOND)):
        for name in ("k", "v"):
            np.testing.assert_allclose(np.asarray(continued.cache[name][:, row, continued.slots[row]]),
                                       np.asarray(fresh.cache[name][:, row, fresh.slots[row]]), atol=1e-5)


def test_per_layer_parameters_keep_a_per_layer_cache_and_continue_the_same(model):
    """SamplingLayout's per-layer weights: the kept cache is per-layer lists, the samples the same."""
    config, params = model
    sampling = SamplingParams(max_new_tokens=6, temperature=0)
    full, continued, _, stacked = full_and_continued(model, sampling, jax.random.key(0))
    per_layer = (config, unstack_layers(params, config))
    _, per_layer_continued, _, cache = full_and_continued(per_layer, sampling, jax.random.key(0))
    np.testing.assert_array_equal(per_layer_continued.tokens, full.tokens)
    np.testing.assert_allclose(per_layer_continued.logprobs, continued.logprobs, atol=1e-5)
    assert isinstance(cache.cache["k"], list) and len(cache.cache["k"]) == config.num_layers
    for name in ("k", "v"):
        np.testing.assert_allclose(np.stack([np.asarray(x) for x in cache.cache[name]]), np.asarray(stacked.cache[name]),
                                   atol=1e-5)


def test_plan_lays_out_kept_prefixes_then_left_padded_suffixes(model):
    config, params = model
    _, kept = continue_prompts(PrefixSampler(config, (STOP,), PAD), params, FIRST, None, jax.random.key(0),
                               SamplingParams(max_new_tokens=2, temperature=0))
    plan = plan_prefill(dict(enumerate(SECOND)), range(6), 6, kept, PAD, BUCKETS)
    assert plan.full_length == 96 and plan.suffix_tokens.shape == (6, 64)  # longest suffix: the fresh row's 50
    assert plan.source_rows[[0, 1, 3]].tolist() == [2, 0, 3]
    assert plan.kept.tolist() == [22, 32, 0, 30, 0, 0]  # row 1's 40 shared tokens shrink to K = 96 - 64
    for row, prompt in enumerate(SECOND):
        k = plan.kept[row]
        np.testing.assert_array_equal(plan.suffix_tokens[row][plan.suffix_mask[row]], prompt[k:])
        np.testing.assert_array_equal(plan.source_slots[row, 32 - k:], kept.slots[plan.source_rows[row]][:k])
    assert not plan.suffix_mask[4:].any() and not plan.kept_mask[4:].any()  # batch padding rows


def test_common_prefix_lengths():
    kept = [np.array([1, 2, 3]), np.array([1, 2, 4, 5]), np.array([9])]
    assert common_prefix_lengths(np.array([1, 2, 4]), kept).tolist() == [2, 3, 0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512))


def sharp_tiny_model():
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    params["lm_head"] = params["lm_head"] * 30  # clear greedy margins (see `model`)
    return config, params


def rollout_samples(tokenizer, prefix_cache: bool, temperature: float):
    config, params = sharp_tiny_model()
    # Rows split over 2 devices: padding rows, and prefixes copied on each device from its own block.
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
    engine = GenerationEngine(config, stop_token_ids(tokenizer), tokenizer.pad_token_id, mesh=mesh,
                              prompt_buckets=(64, 128, 256), prefix_cache=prefix_cache)
    engine.sync(params)
    # A short prompt limit: later turns drop their oldest exchanges, so prefixes diverge early.
    environment = Environment(tokenizer, load_prompt("policy_system_tiny"), ScriptedUser(), EmbeddedProfileJudge(),
                              EmbeddedResponseJudge(), max_prompt_tokens=200)
    rollout = Rollout(environment, engine, SamplingParams(max_new_tokens=16, temperature=temperature, num_samples=2),
                      max_rounds=5, groups=2)
    conversations = start_conversations(synthetic_personas(5, seed=1), ScriptedUser(), [10, 11, 12, 13, 14])
    result = rollout.run(conversations, jax.random.key(3))
    return result, engine.prefix_sampler


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollout_with_the_prefix_cache_samples_what_full_prefills_sample(tokenizer, temperature):
    full, _ = rollout_samples(tokenizer, False, temperature)
    reused, prefix = rollout_samples(tokenizer, True, temperature)
    assert [s.text for s in reused.samples] == [s.text for s in full.samples]
    for a, b in zip(reused.samples, full.samples):
        np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
        np.testing.assert_allclose(a.sampler_logprobs, b.sampler_logprobs, atol=1e-5)
    assert len({s.text for s in full.samples}) > 5
    counts = prefix.counts
    assert counts["full_tokens"] == full.stats["prompt_tokens"] == reused.stats["prompt_tokens"]
    # Most histories here get truncated (their kept prefix is the system prompt and greeting), yet
    # about half of the prompt tokens are reused.
    assert counts["prefilled_tokens"] == reused.stats["prefilled_tokens"] < 0.7 * full.stats["prefilled_tokens"]
    assert counts["reused_rows"] == counts["rows"] - 5  # every turn after the first continues
    assert any(len(s.prompt_tokens) > 180 for s in full.samples)  # truncated histories took part


def test_evaluation_dialogues_with_the_prefix_cache_are_the_same(tokenizer):
    config, params = sharp_tiny_model()
    personas = synthetic_personas(3, seed=5)
    results, policies = [], []
    for prefix_cache in (False, True):
        policy = JaxPolicy.from_params(params, config, tokenizer, load_prompt("policy_system_tiny"), "tiny", max_new_tokens=16,
                           prompt_buckets=(64, 128, 256), max_prompt_tokens=256, max_batch_size=2,
                           prefix_cache=prefix_cache)
        # Profile checks after turns 3 and 6 are calls on copies of the histories, between turns.
        results.append(run_protocol(policy, personas, ScriptedUser(), EmbeddedResponseJudge(), 7, "long_term",
                                    EmbeddedProfileJudge(), seed=1, profile_every=3))
        policies.append(policy)
    assert results[1].transcripts == results[0].transcripts
    assert results[1].profile_scores == results[0].profile_scores
    counts = policies[1].engine.prefix_sampler.counts
    # Histories past 256 tokens get truncated (then little is shared), yet a third is reused.
    assert counts["rows"] == 3 * (7 + 2) and counts["prefilled_tokens"] < 0.8 * counts["full_tokens"]
