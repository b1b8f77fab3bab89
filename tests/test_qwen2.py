"""Flax Qwen2 against transformers' PyTorch Qwen2ForCausalLM on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, make_hf_model, save_hf_model

from rlpa_jax.model import hf
from rlpa_jax.model.layer_stacks import init_cache, unstack_cache, unstack_layers
from rlpa_jax.model.qwen2 import critic_params_from_policy, forward, init_params, positions_from_mask

CASES = {
    "tied": dict(tie_word_embeddings=True),
    "untied_6q_2kv": dict(tie_word_embeddings=False, hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
    "mha_theta1e6": dict(num_key_value_heads=4, rope_theta=1e6, num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model = make_hf_model(**CASES[request.param])
    directory = save_hf_model(model, tmp_path_factory.mktemp(request.param))
    params, config = hf.load_params(directory)
    return model, params, config


def test_logits_match_transformers(pair):
    model, params, config = pair
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 17))
    ours, _ = forward(params, config, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_left_padding_matches_transformers_and_unpadded(pair):
    model, params, config = pair
    rng = np.random.default_rng(1)
    lengths = [12, 7, 3]
    tokens = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), bool)
    rows = [rng.integers(1, config.vocab_size, n) for n in lengths]
    for i, row in enumerate(rows):
        tokens[i, 12 - len(row):] = row
        mask[i, 12 - len(row):] = True
    ours = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))[0])
    reference = hf_logits(model, tokens, mask)
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-4, rtol=0)
    for i, row in enumerate(rows):
        alone = np.asarray(forward(params, config, jnp.asarray(row[None]))[0])[0]
        np.testing.assert_allclose(ours[i, 12 - len(row):], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layers", ["scan", "unstacked"])
def test_kv_cache_decoding_equals_full_forward(pair, layers):
    """Prefill then one token at a time: under the layer scan with the stacked cache, and as the
    sampler's decode loop runs it, on per-layer weights and caches (single-query attention)."""
    _, params, config = pair
    rng = np.random.default_rng(2)
    prompt_len, new, slots = 6, 5, 16
    tokens = rng.integers(1, config.vocab_size, (2, prompt_len + new))
    tokens_mask = np.ones_like(tokens, bool)
    tokens_mask[1, :2] = False  # row 1 is left-padded by two
    full = np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(tokens_mask))[0])

    key_mask = np.zeros((2, slots), bool)
    key_mask[:, :prompt_len] = tokens_mask[:, :prompt_len]
    positions = positions_from_mask(jnp.asarray(tokens_mask))
    cache = init_cache(config, 2, slots)
    if layers == "unstacked":
        params, cache = unstack_layers(params, config), unstack_cache(cache)
    step = jax.jit(lambda p, t, m, pos, c, i: forward(p, config, t, m, pos, cache=c, cache_index=i))
    logits, cache = step(params, tokens[:, :prompt_len], key_mask, positions[:, :prompt_len], cache, 0)
    np.testing.assert_allclose(np.asarray(logits)[:, -1], full[:, prompt_len - 1], atol=1e-4, rtol=0)
    for t in range(prompt_len, prompt_len + new):
        key_mask[:, t] = True
        logits, cache = step(params, tokens[:, t:t + 1], key_mask, positions[:, t:t + 1], cache, t)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4, rtol=0)


def test_bfloat16_compute_stays_close_to_float32(pair):
    _, params, config = pair
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 9)))
    f32 = forward(params, config, tokens)[0]
    bf16 = forward(params, config.replace(compute_dtype="bfloat16"), tokens)[0]
    assert bf16.dtype == jnp.float32  # logits are always float32 for stable log-probabilities
    assert float(jnp.abs(bf16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def test_remat_gives_the_same_gradients(pair):
    _, params, config = pair
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (2, 8)))

    def loss(p, cfg):
        return forward(p, cfg, tokens)[0].astype(jnp.float32).std()

    plain = jax.grad(loss)(params, config)
    remat = jax.grad(loss)(params, config.replace(remat="full"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)


def test_value_head_reads_the_policy_backbone(pair):
    _, params, config = pair
    critic = critic_params_from_policy(params, config)
    assert "lm_head" not in critic and jax.tree.structure(critic) == jax.tree.structure(
        init_params(config, jax.random.key(0), head="value"))
    critic["value_kernel"] = jnp.linspace(-1, 1, config.hidden_size)
    critic["value_bias"] = jnp.float32(0.5)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 5)))
    values, _ = forward(critic, config, tokens, head="value")
    hidden, _ = forward(params, config, tokens, head="none")
    np.testing.assert_allclose(values, hidden @ critic["value_kernel"] + 0.5, atol=1e-5)
