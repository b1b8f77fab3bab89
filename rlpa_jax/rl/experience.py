"""From sampled turns to a PPO batch: padded arrays, scoring forwards, rewards and advantages.

Samples are packed as prompt (left-padded to a bucketed length) + response (right-padded to
max_new_tokens). Jitted forwards then recompute the actor's log-probs (the "old" policy; the gap
to the sampler's log-probs is logged), the frozen reference's log-probs and the critic's values.
Rewards put the turn score on the last response token minus a KL penalty on every token, and
advantages come from GAE within a turn (the paper), GAE across turns, or GRPO groups.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.rl import ppo
from rlpa_jax.rl.rollout import RewardMode, Sample, reward_parts
from rlpa_jax.rl.step import response_logprobs, response_values
from rlpa_jax.sampling import bucket

Batch = dict[str, np.ndarray]


def pack_samples(samples: Sequence[Sample], pad_id: int, response_length: int, prompt_buckets: Sequence[int],
                 row_multiple: int = 1, reward_mode: RewardMode = "both") -> Batch:
    """Padded arrays for a list of samples; extra all-padding rows up to a row multiple.

    Besides the trained score, each row keeps the two parts of it the reward mode trains on and
    a mask of its <profile> block's tokens (for crediting each block with its own reward), and
    its item credits when the rollout computed them (zeros otherwise)."""
    prompt_length = bucket(max(len(s.prompt_tokens) for s in samples), prompt_buckets)
    rows = -(-len(samples) // row_multiple) * row_multiple
    tokens = np.full((rows, prompt_length + response_length), pad_id, np.int32)
    attention = np.zeros(tokens.shape, bool)
    sampler_logprobs = np.zeros((rows, response_length), np.float32)
    meta = np.full((rows, 3), -1, np.int32)  # conversation, turn, sample index
    scores = np.zeros((rows,), np.float32)
    chosen = np.zeros((rows,), bool)
    block_scores = np.zeros((rows, 2), np.float32)
    profile_mask = np.zeros((rows, response_length), bool)
    item_credit = np.zeros((rows, response_length), np.float32)
    item_mask = np.zeros((rows, response_length), bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_tokens), len(s.response_tokens)
        tokens[i, prompt_length - p:prompt_length] = s.prompt_tokens
        tokens[i, prompt_length:prompt_length + r] = s.response_tokens
        attention[i, prompt_length - p:prompt_length + r] = True
        sampler_logprobs[i, :r] = s.sampler_logprobs
        meta[i] = (s.conversation_id, s.turn, s.sample_index)
        scores[i] = s.reward
        chosen[i] = s.chosen
        block_scores[i] = reward_parts(s.score, reward_mode)
        profile_mask[i, :min(s.profile_length, r)] = True
        if s.item_credit is not None:
            item_credit[i, :r], item_mask[i, :r] = s.item_credit, s.item_mask
    return {
        "tokens": tokens, "attention_mask": attention, "response_mask": attention[:, prompt_length:].copy(),
        "sampler_logprobs": sampler_logprobs, "scores": scores, "chosen": chosen,
        "conversation_id": meta[:, 0], "turn": meta[:, 1], "sample_index": meta[:, 2],
        "profile_scores": block_scores[:, 0], "response_scores": block_scores[:, 1], "profile_mask": profile_mask,
        "item_credit": item_credit, "item_mask": item_mask,
    }


# Response lengths a trimmed batch is cut to: few enough that trimming compiles a handful of programs.
RESPONSE_BUCKETS = (32, 64, 128, 256, 512)


def prompt_lengths(batch: Batch) -> np.ndarray:
    """Real (unpadded) prompt tokens of every row."""
    response_length = batch["response_mask"].shape[1]
    return batch["attention_mask"][:, :-response_length].sum(axis=1)


def trim_padding(batch: Batch, prompt_buckets: Sequence[int], response_buckets: Sequence[int] = RESPONSE_BUCKETS) -> Batch:
    """The batch cut to the buckets of its own longest prompt and response.

    A packed batch is as wide as the longest prompt of a whole iteration plus max_new_tokens, while
    most rows are early turns with short prompts and short replies; the forwards and the update
    cost what the width costs. Dropping columns that are padding in every row changes no result
    (positions come from the attention mask), so each slice of rows runs at its own bucket.
    """
    prompt_width = batch["tokens"].shape[1] - batch["response_mask"].shape[1]
    response_width = batch["response_mask"].shape[1]
    keep_prompt = min(bucket(max(int(prompt_lengths(batch).max()), 1), prompt_buckets), prompt_width)
    keep_response = min(bucket(max(int(batch["response_mask"].sum(axis=1).max()), 1), response_buckets), response_width)
    start, stop = prompt_width - keep_prompt, prompt_width + keep_response
    trimmed = {}
    for key, value in batch.items():
        if value.ndim >= 2 and value.shape[1] == prompt_width + response_width:
            trimmed[key] = value[:, start:stop]
        elif value.ndim >= 2 and value.shape[1] == response_width:
            trimmed[key] = value[:, :keep_response]
        else:
            trimmed[key] = value
    return trimmed


def untrim_responses(values: np.ndarray, response_width: int) -> np.ndarray:
    """(rows, trimmed response) -> (rows, response_width), zeros where the trim cut padding."""
    return np.pad(values, ((0, 0), (0, response_width - values.shape[1])))


def length_grouped_minibatches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices cut into minibatches of `size` rows of similar length, in random order.

    A seeded shuffle is sorted by length (stable, so rows of one length stay shuffled), cut into
    minibatches, and the minibatches are shuffled again: each can be trimmed to a short bucket,
    while which rows meet in a minibatch and the order of updates stay random.
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    minibatches = [order[start:start + size] for start in range(0, len(order), size)]
    return [minibatches[i] for i in rng.permutation(len(minibatches))]


class Scorer:
    """Jitted forwards that read a packed batch in chunks: log-probs of the responses and values.

    `trim` (when given, as for step.Updater) cuts each chunk to its own length buckets: rows arrive
    in rollout order, so a chunk holds turns of similar length."""

    def __init__(self, config: Qwen2Config, chunk_rows: int = 32, put_batch=None,
                 trim: Callable[[Batch], Batch] | None = None):
        self.config, self.chunk_rows = config, chunk_rows
        self.put_batch = put_batch or (lambda x: x)
        self.trim = trim
        self._logprobs = jax.jit(lambda p, t, m, r: response_logprobs(p, config, t, m, r)[0], static_argnums=3)
        self._values = jax.jit(lambda p, t, m, r: response_values(p, config, t, m, r), static_argnums=3)

    def _chunks(self, fn, params, batch: Batch) -> np.ndarray:
        width = batch["response_mask"].shape[1]
        keys = ("tokens", "attention_mask", "response_mask")
        outs = []
        for start in range(0, len(batch["tokens"]), self.chunk_rows):
            chunk = {k: batch[k][start:start + self.chunk_rows] for k in keys}
            if self.trim is not None:
                chunk = self.trim(chunk)
            length = chunk["response_mask"].shape[1]
            out = fn(params, self.put_batch(chunk["tokens"]), self.put_batch(chunk["attention_mask"]), length)
            outs.append(untrim_responses(np.asarray(jax.device_get(out)), width))
        return np.concatenate(outs) * batch["response_mask"]

    def logprobs(self, params: Params, batch: Batch) -> np.ndarray:
        return self._chunks(self._logprobs, params, batch)

    def values(self, params: Params, batch: Batch) -> np.ndarray:
        return self._chunks(self._values, params, batch)


def next_turn_values(batch: Batch, gamma: float) -> np.ndarray:
    """gamma * V(first token of the next chosen turn of the same conversation); 0 at the end.

    The dialogue continues from the chosen sample only, so the chosen turn's successor is real
    and every other sample of that turn shares it as the estimate of what would follow.
    """
    first_values = {}
    for i in np.flatnonzero(batch["chosen"]):
        first_values[(int(batch["conversation_id"][i]), int(batch["turn"][i]))] = batch["old_values"][i, 0]
    nxt = [first_values.get((int(c), int(t) + 1), 0.0) for c, t in zip(batch["conversation_id"], batch["turn"])]
    return gamma * np.asarray(nxt, np.float32)


def add_advantages(batch: Batch, advantage: str, kl_coef: float, kl_estimator: str, gamma: float, lam: float,
                   group_size: int, whiten: bool, credit: str = "turn") -> Batch:
    """Adds rewards, kl, advantages and returns to the batch (all (rows, response_length)).

    credit="turn" scores the whole turn with its reward (the paper); credit="block" credits the
    <profile> block with the profile reward and the reply with the response reward (GRPO: each
    block gets its own group advantage; GAE: each block's reward sits on its last token);
    credit="item" is "block" with each profile line credited with its items' share of the F1
    (rl/item_credit.py; GRPO only).
    """
    if credit not in ("turn", "block", "item"):
        raise ValueError(f"ppo.credit={credit!r}; expected turn, block or item")
    if credit == "item" and advantage != "grpo":
        raise ValueError(f"ppo.credit=item needs ppo.advantage=grpo, got {advantage!r}")
    mask = batch["response_mask"]
    by_block = credit in ("block", "item")
    if by_block:
        rewards, kl = ppo.block_token_rewards(batch["profile_scores"], batch["response_scores"], batch["profile_mask"],
                                              batch["old_logprobs"], batch["reference_logprobs"], mask, kl_coef,
                                              kl_estimator)
    else:
        rewards, kl = ppo.token_rewards(batch["scores"], batch["old_logprobs"], batch["reference_logprobs"], mask,
                                        kl_coef, kl_estimator)
    rewards, kl = np.asarray(rewards), np.asarray(kl)
    if advantage == "grpo":
        # Group-relative advantages on the scores; the KL enters as a per-token penalty on top.
        if by_block:
            advantages = np.asarray(ppo.block_advantages(ppo.group_advantages(batch["profile_scores"], group_size),
                                                         ppo.group_advantages(batch["response_scores"], group_size),
                                                         batch["profile_mask"], mask))
            if credit == "item":
                advantages = np.asarray(ppo.item_advantages(advantages, batch["item_credit"], batch["item_mask"]))
        else:
            advantages = np.asarray(ppo.expand_to_tokens(ppo.group_advantages(batch["scores"], group_size), mask))
        advantages = advantages - kl_coef * kl * mask
        returns = np.zeros_like(advantages)
    else:
        if advantage == "cross_turn":
            last = np.asarray(ppo.last_token_mask(mask))
            rewards = rewards + last * next_turn_values(batch, gamma)[:, None]
        elif advantage != "gae":
            raise ValueError(f"ppo.advantage={advantage!r}; expected gae, cross_turn or grpo")
        advantages, returns = (np.asarray(x) for x in ppo.gae_advantages(rewards, batch["old_values"], mask, gamma, lam))
    if whiten:
        advantages = np.asarray(ppo.whiten(jnp.asarray(advantages), mask))
    return batch | {"rewards": rewards, "kl": kl, "advantages": advantages.astype(np.float32),
                    "returns": returns.astype(np.float32)}
