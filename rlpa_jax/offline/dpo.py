"""Direct Preference Optimization (DPO) on the scripted world: the teacher's turn over a misread one.

Each preference pair shares one history: the chosen turn is the scripted teacher's (the profile the
user has revealed and a reply that picks up what they said), the rejected turn is the same turn
with the user's values swapped for someone else's (`teacher.misread_turn`: fluent, well-formed,
wrong about the user), or a bland turn while nothing is revealed yet. Bland turns alone were too
easy a negative: reward accuracy reached 1.0 in a few steps and DPO stopped teaching. Examples
are SFT's: the prompt is what the rollout renders for that history, each target is the turn text
and <|im_end|>, and the chosen and rejected rows of a pair share one prompt token for token.

The loss (Rafailov et al., 2023), per pair, with sequence log-probs summed over the turn's tokens:

    m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    loss = -(1 - eps) * log sigmoid(beta * m) - eps * log sigmoid(-beta * m)

eps > 0 is conservative DPO (labels flipped with probability eps). The reference is the policy
as it was before the first step: its log-probs are computed once, before training, and travel in
the batch, so a step runs one forward (chosen and rejected rows together) and no reference copy
of the parameters is ever held. The update is training.updater.Updater, so micro-batching, meshes
and the warm-up + cosine AdamW are shared with SFT and PPO.

Several processes (README "Several hosts"): the pairs come from the scripted teacher and the
rule-based ScriptedUser, seeded and cheap (no LLM, no sampler), so every process builds the same
pairs, examples and batch schedule itself instead of exchanging them; each step places only its
own devices' rows of the identical host batch, and the log-prob passes gather their result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlpa_jax.config.tree import DPOConfig
from rlpa_jax.dialogue.chat import Message, format_turn, load_prompt
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.users.scripted import ScriptedUser
from rlpa_jax.generation.sampler import bucket
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.offline import teacher
from rlpa_jax.offline.sft import (
    SFT_LENGTH_BUCKETS,
    Tokenizer,
    batch_schedule,
    fitted_prompt,
    left_padded,
    target_token_ids,
    trimmed_batch,
)
from rlpa_jax.runtime import multihost, parallel
from rlpa_jax.training.fit import fit, offline_updater
from rlpa_jax.training.forwards import response_logprobs
from rlpa_jax.training.losses import LossTerms
from rlpa_jax.training.updater import Batch, LossFn

# The response window (the last R positions, where every target lies) is bucketed once per run, so
# the log-softmax runs over R positions instead of the whole sequence.
RESPONSE_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)

# (history before the turn, chosen turn text, rejected turn text)
PreferencePair = tuple[list[Message], str, str]


# --------------------------------------------------------------------------------------------
# Preference pairs and examples


def preference_pairs(
    personas: Sequence[Persona], num_turns: int, seed: int, user: ScriptedUser | None = None
) -> list[PreferencePair]:
    """(history, teacher turn, rejected turn) for every turn of the ScriptedUser against the teacher.

    The rejected turn is the teacher's turn misread (`teacher.misread_turn`: every revealed value
    swapped for another persona's value of that slot, so only the facts differ) or, before the
    user has revealed anything, a bland turn. The dialogue continues with the teacher's turn, so
    the chosen side and every history are exactly teacher.scripted_dialogues(personas, num_turns,
    seed, user); rejected turns draw from their own seeded stream, so the whole list is
    deterministic under `seed`. Pairs are persona-major: pair k belongs to personas[k // num_turns].
    """
    if num_turns < 1:
        raise ValueError(f"offline/dpo.py: preference_pairs needs num_turns >= 1, got {num_turns}")
    user = user if user is not None else ScriptedUser()
    values = teacher.slot_values(personas)
    pairs: list[PreferencePair] = []
    for index, persona in enumerate(personas):
        rng = random.Random(f"dpo-rejected:{seed}:{index}")  # str seeds are stable across processes
        for history, revealed, profile, reply in teacher.scripted_turns(persona, index, num_turns, seed, user):
            rejected = (teacher.misread_turn(revealed, profile, reply, values, rng)
                        or teacher.bland_turn(history, revealed, rng))
            pairs.append((history, format_turn(profile, reply), format_turn(*rejected)))
    return pairs


def build_dpo_examples(
    pairs: Sequence[PreferencePair],
    tokenizer: Tokenizer,
    max_length: int,
    system_prompt: str | None = None,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> dict[str, np.ndarray]:
    """Left-padded arrays with the pairs interleaved: row 2k is pair k's chosen turn, row 2k+1 its rejected.

    Returns tokens (2N, L) int32, attention_mask (2N, L) bool and loss_mask (2N, L) float32, 1
    exactly on the target tokens (<|im_end|> included). Both rows of a pair carry the same prompt,
    fitted (oldest turns dropped, as in SFT) so that the longer of the two targets fits `max_length`.
    """
    system_prompt = load_prompt("policy_system") if system_prompt is None else system_prompt
    sequences: list[tuple[list[int], int]] = []
    for index, (history, chosen_text, rejected_text) in enumerate(pairs):
        chosen = target_token_ids(tokenizer, chosen_text)
        rejected = target_token_ids(tokenizer, rejected_text)
        prompt = fitted_prompt(tokenizer, history, max(len(chosen), len(rejected)), max_length, system_prompt,
                               f"preference pair {index}")
        sequences += [(prompt + chosen, len(chosen)), (prompt + rejected, len(rejected))]
    if not sequences:
        raise ValueError("offline/dpo.py: build_dpo_examples got no preference pairs")
    length = bucket(max(len(ids) for ids, _ in sequences), length_buckets)
    return left_padded(sequences, tokenizer.pad_token_id, length)


def check_examples(examples: dict[str, np.ndarray]) -> None:
    missing = {"tokens", "attention_mask", "loss_mask"} - set(examples)
    if missing:
        raise KeyError(f"offline/dpo.py: examples lack {sorted(missing)}; build them with build_dpo_examples")
    if len(examples["tokens"]) % 2 or not len(examples["tokens"]):
        raise ValueError(f"offline/dpo.py: examples have {len(examples['tokens'])} rows; expected a positive even "
                         "number (chosen and rejected rows interleaved)")


def response_window(examples: dict[str, np.ndarray]) -> int:
    """R: a bucketed length that holds every target (the last R positions of every row)."""
    return bucket(int(examples["loss_mask"].sum(axis=1).max()), RESPONSE_BUCKETS)


def pair_lengths(examples: dict[str, np.ndarray]) -> np.ndarray:
    """Per pair, the longer of its two sequences (what its batch must hold)."""
    return examples["attention_mask"].sum(axis=1).reshape(-1, 2).max(axis=1)


def pair_batch(
    examples: dict[str, np.ndarray],
    pairs: np.ndarray,
    window: int,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> dict[str, np.ndarray]:
    """The `pairs` of `examples` as (B, 2, ...) arrays (chosen, rejected), trimmed to their length bucket.

    tokens and attention_mask are (B, 2, L); response_mask (B, 2, R) covers the last R positions
    (R = the run's window, or L - 1 when the batch is shorter); pair_mask (B,) is all ones.
    """
    rows = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
    trimmed = trimmed_batch(examples, rows, length_buckets)
    length = trimmed["tokens"].shape[1]
    # A target never fills the whole row (the prompt has at least the system turn), so L - 1 holds it.
    window = min(window, length - 1)
    count = len(pairs)
    return {
        "tokens": trimmed["tokens"].reshape(count, 2, length),
        "attention_mask": trimmed["attention_mask"].reshape(count, 2, length),
        "response_mask": trimmed["loss_mask"][:, -window:].reshape(count, 2, window),
        "pair_mask": np.ones((count,), np.float32),
    }


# --------------------------------------------------------------------------------------------
# Log-probabilities and the loss


def sequence_logps(params: Params, config: Qwen2Config, tokens: jax.Array, attention_mask: jax.Array,
                   response_mask: jax.Array) -> jax.Array:
    """Per row, the summed log-probability of the tokens `response_mask` marks.

    tokens and attention_mask are (rows, L); response_mask (rows, R) covers the last R positions,
    each scored by the prediction made one position earlier (training.forwards.response_logprobs).
    """
    token_logps = response_logprobs(params, config, tokens, attention_mask, response_mask.shape[-1])
    return jnp.sum(token_logps * response_mask.astype(jnp.float32), axis=-1)


def pair_logps(params: Params, config: Qwen2Config, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs, each (B,), from one forward over the batch's 2B rows."""
    count, _, length = batch["tokens"].shape
    window = batch["response_mask"].shape[-1]
    logps = sequence_logps(params, config, batch["tokens"].reshape(2 * count, length),
                           batch["attention_mask"].reshape(2 * count, length),
                           batch["response_mask"].reshape(2 * count, window)).reshape(count, 2)
    return logps[:, 0], logps[:, 1]


def dpo_losses(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO loss and implicit rewards: (losses, chosen_rewards, rejected_rewards).

    A side's implicit reward is beta * (policy - reference) log-prob; the loss is the logistic loss
    on their difference, with labels flipped with probability `label_smoothing` (conservative DPO).
    """
    chosen_rewards = beta * (jnp.asarray(policy_chosen_logps, jnp.float32)
                             - jnp.asarray(reference_chosen_logps, jnp.float32))
    rejected_rewards = beta * (jnp.asarray(policy_rejected_logps, jnp.float32)
                               - jnp.asarray(reference_rejected_logps, jnp.float32))
    margins = chosen_rewards - rejected_rewards
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margins)
              - label_smoothing * jax.nn.log_sigmoid(-margins))
    return losses, chosen_rewards, rejected_rewards


def dpo_loss_fn(config: Qwen2Config, beta: float, label_smoothing: float = 0.0) -> LossFn:
    """DPO over a pair batch (pair_batch plus reference_chosen_logps / reference_rejected_logps), as
    LossTerms per pair, with two diagnostics of its own: `reward_accuracy` (pairs whose chosen
    reward beats the rejected one) and `reward_margin` (chosen minus rejected implicit reward).
    Use with Updater's loss_mask=scored_pairs, so the step's mean is per pair.
    """

    def loss(params: Params, batch: Batch) -> LossTerms:
        policy_chosen, policy_rejected = pair_logps(params, config, batch)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy_chosen, policy_rejected, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
            beta, label_smoothing)
        weights = batch["pair_mask"].astype(jnp.float32)
        margins = chosen_rewards - rejected_rewards
        return LossTerms(total=jnp.sum(losses * weights), count=jnp.sum(weights),
                         sums={"reward_accuracy": jnp.sum((margins > 0) * weights),
                               "reward_margin": jnp.sum(margins * weights)})

    return loss


def scored_pairs(batch: Batch):
    """The units DPO's loss averages over (Updater's loss_mask): the batch's real pairs."""
    return batch["pair_mask"]


def preference_logps(
    params: Params,
    config: Qwen2Config,
    examples: dict[str, np.ndarray],
    batch_size: int,
    mesh: Mesh | None = None,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> np.ndarray:
    """(N, 2) sequence log-probs of every pair's (chosen, rejected) turn under `params`.

    Pairs go through in length order, `batch_size` at a time (the last batch repeats its final
    pair to stay full), so a pass compiles once per length bucket, as training does. With several
    processes every one calls it with the same examples (a collective): each gets every pair's log-probs.
    """
    check_examples(examples)
    window = response_window(examples)
    forward = jax.jit(lambda p, b: jnp.stack(pair_logps(p, config, b), axis=-1))
    order = np.argsort(pair_lengths(examples), kind="stable")
    result = np.zeros((len(order), 2), np.float32)
    for start in range(0, len(order), batch_size):
        pairs = order[start:start + batch_size]
        full = np.concatenate([pairs, np.full(batch_size - len(pairs), pairs[-1])])
        batch = pair_batch(examples, full, window, length_buckets)
        del batch["pair_mask"]
        if mesh is None:
            logps = forward(params, batch)
        else:
            # Every process holds the whole batch: each places its own rows (no cross-process compare).
            batch = {k: multihost.put_identical(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            with parallel.activate(mesh):
                logps = forward(params, batch)
        result[pairs] = np.asarray(multihost.gather(logps))[: len(pairs)]
    return result


def reward_accuracy(policy_logps: np.ndarray, reference_logps: np.ndarray) -> float:
    """Share of pairs whose implicit reward (policy - reference log-prob) favours the chosen turn."""
    margins = (policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1])
    return float(np.mean(margins > 0))


# --------------------------------------------------------------------------------------------
# Training loop


def train_dpo(
    params: Params,
    model_config: Qwen2Config,
    examples: dict[str, np.ndarray],
    dpo_config: DPOConfig,
    seed: int,
    mesh: Mesh | None = None,
    param_shardings: Params | None = None,
    progress: bool = True,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> tuple[Params, list[dict[str, float]]]:
    """Train `params` with DPO for dpo_config.steps steps (the config's dpo section); returns
    (params, per-step metrics).

    The reference is `params` as given: every pair's reference log-probs are computed before the
    first step. Batches are seeded, length-grouped shuffles of pairs (sft.batch_schedule), each
    trimmed to its length bucket. `params` is donated to the jitted step (on accelerators its
    buffers are reused): use the returned parameters afterwards. Each record holds the step's loss,
    reward accuracy and mean reward margin, measured on the batch before its update.
    """
    check_examples(examples)
    window = response_window(examples)
    reference = preference_logps(params, model_config, examples, dpo_config.batch_size, mesh, length_buckets)

    updater = offline_updater(dpo_loss_fn(model_config, dpo_config.beta, dpo_config.label_smoothing), scored_pairs,
                              dpo_config, mesh, param_shardings)
    schedule = batch_schedule(pair_lengths(examples), dpo_config.batch_size, dpo_config.steps, seed)

    def make_batch(pairs):
        return pair_batch(examples, pairs, window, length_buckets) | {
            "reference_chosen_logps": reference[pairs, 0], "reference_rejected_logps": reference[pairs, 1]}

    return fit(updater, params, schedule, make_batch,
               lambda m: {"loss": m["loss_mean"], "reward_accuracy": m["loss_reward_accuracy"],
                          "reward_margin": m["loss_reward_margin"], "grad_norm": m["grad_norm"]}, "dpo", progress)
