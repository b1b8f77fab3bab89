"""Response log-probs and entropies from vocabulary chunks (training/forwards.py) equal the plain
full-vocabulary log-softmax, values and gradients, to 1e-5 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params
from rlpa_jax.training import forwards
from rlpa_jax.training.forwards import (
    output_embedding,
    response_logprobs,
    response_logprobs_and_entropy,
    token_logprobs_and_entropy,
    vocab_chunks,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def full_vocabulary(hidden, weights, targets):
    """The reference: every logit at once, then log_softmax (what the forwards did before chunking)."""
    logits = jnp.einsum("bte,ve->btv", hidden, weights, preferred_element_type=jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return chosen, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


@pytest.mark.parametrize("vocab, chunk", [(97, 32), (96, 32), (50, 64), (1000, 300)])
def test_chunks_equal_the_full_log_softmax_and_its_gradient(vocab, chunk):
    rng = np.random.default_rng(vocab)
    hidden = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(vocab, 16)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (3, 5)), jnp.int32)
    got = token_logprobs_and_entropy(hidden, weights, targets, chunk)
    want = full_vocabulary(hidden, weights, targets)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)

    def loss(fn):
        return lambda h, w: sum(jnp.sum(x * c) for x, c in zip(fn(h, w), (1.0, 0.3)))

    chunked = jax.grad(loss(lambda h, w: token_logprobs_and_entropy(h, w, targets, chunk)), argnums=(0, 1))
    plain = jax.grad(loss(lambda h, w: full_vocabulary(h, w, targets)), argnums=(0, 1))
    for g, w in zip(chunked(hidden, weights), plain(hidden, weights)):
        np.testing.assert_allclose(g, w, **TOL)


def test_chunks_cover_the_vocabulary_with_little_padding():
    chunks, real = vocab_chunks(jnp.zeros((151936, 4)), 16384)
    assert chunks.shape[:2] == (10, 15194) and int(real.sum()) == 151936  # 4 padding rows, not 11,904


@pytest.mark.parametrize("tie", [True, False])
def test_response_logprobs_equal_the_full_head(tie):
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=tie)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, 300, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3], [5], [1]]))  # left padding

    def before(p):
        """The forward as it was: logits at every position, then the response's slice."""
        logits, _ = forward(p, config, tokens, mask)
        return full_vocabulary_from_logits(logits[:, -5:-1], tokens[:, -4:])

    def full_vocabulary_from_logits(logits, targets):
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return (jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0],
                -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))

    got = response_logprobs_and_entropy(params, config, tokens, mask, 4)
    want = before(params)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)
    np.testing.assert_allclose(response_logprobs(params, config, tokens, mask, 4), want[0], **TOL)
    grads = jax.grad(lambda p: jnp.sum(response_logprobs(p, config, tokens, mask, 4) * mask[:, -4:]))(params)
    expected = jax.grad(lambda p: jnp.sum(before(p)[0] * mask[:, -4:]))(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), grads, expected)
    assert output_embedding(params, config).shape == (300, 64)


def value_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, sub-jaxprs (scan bodies, remat, pjit) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(inner, "eqns"):
                    shapes |= value_shapes(inner)
                elif hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                    shapes |= value_shapes(inner.jaxpr)
    return shapes


def test_no_full_vocabulary_array_is_built(monkeypatch):
    monkeypatch.setattr(forwards, "VOCAB_CHUNK", 1024)
    config = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.ones((2, 40), jnp.int32)

    def loss(p):
        return jnp.sum(response_logprobs(p, config, tokens, jnp.ones_like(tokens, bool), 8))

    for fn in (loss, jax.grad(loss)):  # the scoring forward and the update's backward pass
        shapes = value_shapes(jax.make_jaxpr(fn)(params).jaxpr)
        assert (2, 8, 1024) in shapes  # the walk reaches the chunks' logits ...
        assert not [s for s in shapes if len(s) == 3 and s[-1] == 4096]  # ... and nothing vocabulary-wide


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_score_and_train_as_the_layer_scan(remat):
    """model.scan_layers=false: the same log-probs, entropies and parameter gradients (stacked, as
    the optimizer holds them) as the scan, with and without rematerialisation."""
    scanned = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                          num_kv_heads=2, remat=remat)
    unrolled = scanned.replace(scan_layers=False)
    params = init_params(scanned, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3]]))  # one left-padded row

    def loss(config):
        def fn(p):
            logprobs, entropy = response_logprobs_and_entropy(p, config, tokens, mask, 4)
            return jnp.sum(logprobs * jnp.arange(1.0, 5.0)) + 0.3 * jnp.sum(entropy)
        return fn

    np.testing.assert_allclose(loss(unrolled)(params), loss(scanned)(params), **TOL)
    got, want = jax.grad(loss(unrolled))(params), jax.grad(loss(scanned))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)  # stacked "layers" gradients either way
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **TOL)
