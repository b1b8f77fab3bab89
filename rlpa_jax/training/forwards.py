"""Forwards that score a response: its tokens' log-probabilities (and entropies) under a policy, or
a critic's values.

Sequences are a prompt (left-padded to P) followed by the response (R tokens); the predictions for
the response come from positions P-1 .. P+R-2. Only those positions go through the output head, and
the log-softmax over the vocabulary runs in chunks of columns with a running log-sum-exp, so no
[rows, length, vocab] float32 array exists (for Qwen2.5's 151,936-word vocabulary that array is
~0.6 MB per token, larger than everything else a scoring forward holds). Each chunk is
rematerialised in the backward pass, so gradients do not keep the logits either.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlpa_jax.model.qwen2 import Params, Qwen2Config, forward, token_matmul

# Vocabulary columns per chunk: the largest float32 block is [rows, positions, VOCAB_CHUNK].
VOCAB_CHUNK = 16384


def output_embedding(params: Params, config: Qwen2Config) -> jax.Array:
    """(vocab, hidden): the rows whose dot product with a hidden state gives the logits."""
    return params["embed"] if config.tie_word_embeddings else params["lm_head"].T


def vocab_chunks(weights: jax.Array, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(chunks, size, hidden) weights and a (chunks, size) mask of real rows: as few chunks of at
    most `chunk` rows as cover the vocabulary, as equal as possible, so padding stays tiny."""
    vocab = weights.shape[0]
    count = math.ceil(vocab / (chunk or VOCAB_CHUNK))
    size = math.ceil(vocab / count)
    padded = jnp.pad(weights, ((0, count * size - vocab), (0, 0)))
    real = (jnp.arange(count * size) < vocab).reshape(count, size)
    return padded.reshape(count, size, -1), real


def token_logprobs_and_entropy(hidden: jax.Array, weights: jax.Array, targets: jax.Array,
                               chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of p at every position, p = softmax(hidden @ weights.T) in
    float32: hidden (rows, T, hidden), weights (vocab, hidden), targets (rows, T) ints; chunks of
    at most `chunk` (default VOCAB_CHUNK) vocabulary rows.

    One pass over the vocabulary chunks keeps, per position, the running max m, the sum of
    exp(logit - m) and the sum of exp(logit - m) * logit; log-sum-exp and entropy follow from them.
    """
    chunks, real = vocab_chunks(weights, chunk)
    if len(chunks) == 1:  # a small vocabulary: one block of logits, the plain log-softmax
        logits = token_matmul(hidden, weights.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return chosen, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)

    @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of storing them all
    def add_chunk(carry, chunk_and_real):
        running_max, exp_sum, weighted_sum = carry
        rows, is_real = chunk_and_real
        logits = token_matmul(hidden, rows.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
        logits = jnp.where(is_real, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        rescale = jnp.exp(running_max - new_max)
        exps = jnp.exp(logits - new_max[..., None])
        weighted = jnp.sum(exps * jnp.where(is_real, logits, 0.0), axis=-1)
        return (new_max, exp_sum * rescale + jnp.sum(exps, axis=-1), weighted_sum * rescale + weighted), None

    shape = targets.shape
    first = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    # The first chunk always holds real rows, so the running max is finite from then on.
    (running_max, exp_sum, weighted_sum), _ = jax.lax.scan(add_chunk, first, (chunks, real))
    log_normalizer = running_max + jnp.log(exp_sum)
    target_rows = jnp.take(weights, targets, axis=0).astype(hidden.dtype)
    target_logits = jnp.einsum("bte,bte->bt", hidden, target_rows, preferred_element_type=jnp.float32)
    return target_logits - log_normalizer, log_normalizer - weighted_sum / exp_sum


def response_hidden(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    """The final hidden states at the positions that predict the last `response_length` tokens."""
    hidden, _ = forward(params, config, tokens, attention_mask, head="none")
    return hidden[:, -response_length - 1:-1]


def response_logprobs_and_entropy(params: Params, config: Qwen2Config, tokens, attention_mask,
                                  response_length: int) -> tuple[jax.Array, jax.Array]:
    """(log-probabilities of the last `response_length` tokens, the entropies they were drawn from)."""
    hidden = response_hidden(params, config, tokens, attention_mask, response_length)
    return token_logprobs_and_entropy(hidden, output_embedding(params, config), tokens[:, -response_length:])


def response_logprobs(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    """Log-probabilities of the last `response_length` tokens (rows, response_length)."""
    return response_logprobs_and_entropy(params, config, tokens, attention_mask, response_length)[0]


def response_values(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    """The critic's value at every response token (the value head in place of the vocabulary)."""
    values, _ = forward(params, config, tokens, attention_mask, head="value")
    return values[:, -response_length - 1:-1]
