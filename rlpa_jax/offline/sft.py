"""Supervised fine-tuning (the warm start): teacher dialogues -> token arrays -> a jitted update loop.

Each example is one policy turn: the prompt is exactly what the sampler will see in a rollout
(`render_messages(system_prompt, history)` through the chat template with the generation prompt;
pass the rollout's system prompt, config.rollout.system_prompt, so the two agree),
and the target is the turn text followed by <|im_end|>, tokenised on its own, as the sampler
generates it. Only target tokens carry loss. An example too long for `max_length` loses its
oldest turns (the system prompt and the last user message always stay); the target is never cut.

The update is training.updater.Updater with a next-token cross-entropy that returns LossTerms, so
micro-batching, meshes and the warm-up + cosine AdamW are shared with PPO and DPO. `warm_start` is
the one entry point that turns personas into a fine-tuned policy: the trainer's warm start and
launch/sft.py both call it.

Several processes (README "Several hosts"): the teacher dialogues are scripted, seeded and cheap
(no LLM, no sampler), so every process builds the same dialogues, examples and batch schedule
itself rather than splitting and exchanging them; each step places only its own devices' rows of
the identical host batch (Updater), so the run equals one process on the same devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh

from rlpa_jax.config.tree import SFTConfig, TrainConfig
from rlpa_jax.dialogue import chat
from rlpa_jax.dialogue.chat import Message, load_prompt, parse_turn
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams, bucket
from rlpa_jax.model.qwen2 import Params, Qwen2Config, forward
from rlpa_jax.model.tokenizer import IM_END
from rlpa_jax.offline import teacher
from rlpa_jax.offline.teacher import Dialogue
from rlpa_jax.training.fit import fit, offline_updater
from rlpa_jax.training.forwards import output_embedding, token_logprobs_and_entropy
from rlpa_jax.training.losses import LossTerms
from rlpa_jax.training.updater import Batch, LossFn

# Sequence lengths are rounded up to a multiple of 128, so padding stays small while a run compiles
# its update step once per bucket in use (a handful).
SFT_LENGTH_BUCKETS: tuple[int, ...] = tuple(range(128, 4096 + 1, 128))
GROUP_BATCHES = 16  # batches per length-sorted window in batch_schedule
PROMPT_LENGTH_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)

Tokenizer = transformers.PreTrainedTokenizerBase


# --------------------------------------------------------------------------------------------
# Examples


def prompt_token_ids(tokenizer: Tokenizer, history: Sequence[Message], system_prompt: str) -> list[int]:
    """The policy prompt for the turn after `history`, as the rollout renders it."""
    return chat.prompt_token_ids(tokenizer, system_prompt, history)


def target_token_ids(tokenizer: Tokenizer, target_text: str) -> list[int]:
    """The turn text's tokens and <|im_end|>: what the sampler must produce, stop token included."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise ValueError(f"offline/sft.py: the tokenizer has no {IM_END} token; a Qwen-style chat tokenizer is needed")
    return list(tokenizer.encode(target_text, add_special_tokens=False)) + [im_end]


def fitted_prompt(
    tokenizer: Tokenizer,
    history: Sequence[Message],
    target_length: int,
    max_length: int,
    system_prompt: str,
    where: str,
) -> list[int]:
    """Prompt ids for `history`, dropping its oldest turns until prompt + target fit `max_length`."""
    prompt = chat.prompt_token_ids(tokenizer, system_prompt, history, max_length - target_length)
    if len(prompt) + target_length > max_length:
        raise ValueError(
            f"offline/sft.py: {where} needs {len(prompt)} prompt + {target_length} target tokens even with only "
            f"the system prompt and the last user message; raise max_length={max_length} to at least "
            f"{len(prompt) + target_length}"
        )
    return prompt


def build_sft_examples(
    dialogues: Sequence[Dialogue],
    tokenizer: Tokenizer,
    max_length: int,
    system_prompt: str | None = None,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> dict[str, np.ndarray]:
    """Left-padded token arrays for every (history, target) example of every dialogue.

    Returns tokens (N, L) int32, attention_mask (N, L) bool and loss_mask (N, L) float32 that is 1
    exactly on the target tokens (<|im_end|> included); L is the longest example bucketed.
    """
    system_prompt = load_prompt("policy_system") if system_prompt is None else system_prompt
    sequences: list[tuple[list[int], int]] = []  # (prompt + target ids, target length)
    for dialogue_index, dialogue in enumerate(dialogues):
        for turn_index, (history, target_text) in enumerate(dialogue):
            target = target_token_ids(tokenizer, target_text)
            where = f"dialogue {dialogue_index} turn {turn_index}"
            prompt = fitted_prompt(tokenizer, history, len(target), max_length, system_prompt, where)
            sequences.append((prompt + target, len(target)))
    if not sequences:
        raise ValueError("offline/sft.py: build_sft_examples got no examples (empty dialogues)")
    length = bucket(max(len(ids) for ids, _ in sequences), length_buckets)
    return left_padded(sequences, tokenizer.pad_token_id, length)


def left_padded(sequences: Sequence[tuple[list[int], int]], pad_id: int, length: int) -> dict[str, np.ndarray]:
    """tokens, attention_mask and loss_mask (1 on each row's last `target length` tokens), left-padded."""
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    attention_mask = np.zeros((len(sequences), length), bool)
    loss_mask = np.zeros((len(sequences), length), np.float32)
    for row, (ids, target_length) in enumerate(sequences):
        tokens[row, length - len(ids):] = ids
        attention_mask[row, length - len(ids):] = True
        loss_mask[row, length - target_length:] = 1.0
    return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}


# --------------------------------------------------------------------------------------------
# Loss and training loop


def sft_loss_fn(config: Qwen2Config) -> LossFn:
    """Summed next-token cross-entropy over the loss_mask tokens, as LossTerms.

    The logits at position t predict token t+1, so the mask is shifted left by one: a target
    token is scored by the prediction made just before it.
    """

    def loss(params: Params, batch: Batch) -> LossTerms:
        hidden, _ = forward(params, config, batch["tokens"], batch["attention_mask"], head="none")
        # The log-softmax runs in vocabulary chunks: no [rows, length, vocab] array of logits.
        token_log_probs, _ = token_logprobs_and_entropy(hidden[:, :-1], output_embedding(params, config),
                                                        batch["tokens"][:, 1:])
        weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return LossTerms(total=-jnp.sum(token_log_probs * weights), count=jnp.sum(weights), sums={})

    return loss


def target_tokens(batch: Batch):
    """The units SFT's loss averages over (Updater's loss_mask)."""
    return batch["loss_mask"]


def batch_schedule(lengths: np.ndarray, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """`steps` batches of example indices: seeded shuffles, one epoch after another, grouped by length.

    Each epoch's shuffle is cut into windows of GROUP_BATCHES batches; a window is sorted by length
    before it is cut into batches, and the epoch's batches are then shuffled again. A batch thus
    holds examples of similar length and can be trimmed to a short bucket (most of the compute goes
    to the prompt, so this about halves an SFT run), while batch contents stay random.
    """
    rng = np.random.default_rng(seed)
    window = batch_size * GROUP_BATCHES
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(len(lengths))
        if len(order) < batch_size:  # fewer examples than one batch: repeat them
            order = np.resize(order, batch_size)
        epoch: list[np.ndarray] = []
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch.extend(chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
        batches.extend(epoch[i] for i in rng.permutation(len(epoch)))
    return batches[:steps]


def trimmed_batch(
    examples: dict[str, np.ndarray], rows: np.ndarray, length_buckets: Sequence[int]
) -> dict[str, np.ndarray]:
    """The rows of `examples`, cut to the bucket of their longest sequence (left padding dropped)."""
    longest = int(examples["attention_mask"][rows].sum(axis=1).max())
    length = min(bucket(longest, length_buckets), examples["tokens"].shape[1])
    return {key: value[rows, -length:] for key, value in examples.items()}


def train_sft(
    params: Params,
    model_config: Qwen2Config,
    examples: dict[str, np.ndarray],
    sft_config: SFTConfig,
    seed: int,
    mesh: Mesh | None = None,
    param_shardings: Params | None = None,
    progress: bool = True,
    length_buckets: Sequence[int] = SFT_LENGTH_BUCKETS,
) -> tuple[Params, list[dict[str, float]]]:
    """Fine-tune `params` on `examples` for sft_config.steps steps; returns (params, per-step metrics).

    Batches are seeded, length-grouped shuffles (batch_schedule), so a run is reproducible; each is
    trimmed to the bucket of its longest example. `params` is donated to the jitted step
    (on accelerators its buffers are reused): use the returned parameters afterwards.
    """
    if sft_config.steps < 1 or sft_config.batch_size < 1:
        raise ValueError(
            f"offline/sft.py: sft.steps={sft_config.steps} and sft.batch_size={sft_config.batch_size} must be >= 1"
        )
    missing = {"tokens", "attention_mask", "loss_mask"} - set(examples)
    if missing:
        raise KeyError(f"offline/sft.py: examples lack {sorted(missing)}; build them with build_sft_examples")
    updater = offline_updater(sft_loss_fn(model_config), target_tokens, sft_config, mesh, param_shardings)
    schedule = batch_schedule(examples["attention_mask"].sum(axis=1), sft_config.batch_size, sft_config.steps, seed)
    # One compiled program per length bucket in use (a handful), each much cheaper than the longest.
    return fit(updater, params, schedule, lambda rows: trimmed_batch(examples, rows, length_buckets),
               lambda m: {"loss": m["loss_mean"], "grad_norm": m["grad_norm"], "tokens": m["loss_tokens"]},
               "sft", progress)


def warm_start(params: Params, model_config: Qwen2Config, tokenizer: Tokenizer, personas: Sequence[Persona],
               config: TrainConfig, mesh: Mesh | None = None,
               param_shardings: Params | None = None) -> tuple[Params, list[dict[str, float]], dict[str, np.ndarray]]:
    """The SFT warm start: the scripted teacher talks with the ScriptedUser for rollout.max_rounds
    turns with each of the first sft.num_dialogues personas, and `params` is fine-tuned on those
    turns with the rollout's system prompt. Returns (params, per-step records, the examples).

    An example may be as long as a rollout's longest sequence (rollout.max_prompt_tokens +
    rollout.max_new_tokens); a longer one loses its oldest turns, as a rollout prompt would."""
    rollout = config.rollout
    dialogues = teacher.scripted_dialogues(personas[:config.sft.num_dialogues], num_turns=rollout.max_rounds,
                                           seed=config.seed)
    examples = build_sft_examples(dialogues, tokenizer, rollout.max_prompt_tokens + rollout.max_new_tokens,
                                  system_prompt=load_prompt(rollout.system_prompt))
    params, history = train_sft(params, model_config, examples, config.sft, config.seed, mesh=mesh,
                                param_shardings=param_shardings, progress=config.logging.progress_bar)
    return params, history, examples


# --------------------------------------------------------------------------------------------
# Generation check


def greedy_turns(
    engine: GenerationEngine,
    tokenizer: Tokenizer,
    histories: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    system_prompt: str | None = None,
) -> list[str]:
    """The greedy policy turn after each history, decoded up to (not including) its stop token,
    sampled by `engine` (synced with the policy's parameters). With several processes every one
    calls it with the same histories, and every one gets every turn."""
    system_prompt = load_prompt("policy_system") if system_prompt is None else system_prompt
    prompts = [prompt_token_ids(tokenizer, history, system_prompt) for history in histories]
    completions = engine.generate_everywhere(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                                             jax.random.key(0))
    texts = []
    for samples in completions:
        ids = [int(i) for i in samples[0].tokens]
        if ids and ids[-1] in engine.stop_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def well_formed_share(texts: Sequence[str]) -> float:
    """Fraction of turns that parse_turn accepts as well formed."""
    return sum(parse_turn(text).well_formed for text in texts) / len(texts)
