"""Forwards that score a response: its tokens' log-probabilities under a policy, or a critic's values.

Sequences are a prompt (left-padded to P) followed by the response (R tokens); the predictions for
the response come from positions P-1 .. P+R-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlpa_jax.model.qwen2 import Params, Qwen2Config, forward


def response_logits(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int, head="lm"):
    out, _ = forward(params, config, tokens, attention_mask, head=head)
    return out[:, -response_length - 1:-1]


def response_logprobs(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    """(log-probabilities of the last `response_length` tokens, the logits that predicted them)."""
    logits = response_logits(params, config, tokens, attention_mask, response_length)
    targets = tokens[:, -response_length:]
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return logprobs, logits


def response_values(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    """The critic's value at every response token (the value head in place of the vocabulary)."""
    return response_logits(params, config, tokens, attention_mask, response_length, head="value")
