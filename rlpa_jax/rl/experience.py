"""From sampled turns to one typed PPO batch: the `Experience`.

Each sampled turn is one row: its prompt (left-padded to a bucketed length P) and its response
(right-padded to R = max_new_tokens). `ExperienceBuilder` builds the whole Experience in one call:
it packs the rollout's samples, runs the scoring forwards (the actor's log-probs as the "old"
policy, the frozen reference's log-probs, the critic's values when the advantage estimator needs
a critic), and adds KL, advantages and returns (an estimator from rl/advantages.py). The losses
(rl/objectives.py) read its fields by name.

`ppo.kl_penalty` says where the KL to the reference goes: `reward` (the paper) subtracts
kl_coef * KL per token in the advantage estimator; `loss` (DeepSeekMath's GRPO, TRL) gives the
estimator no KL term and hands the update the reference's log-probs and the coefficient, and the
actor loss adds kl_coef * KL. Where the old log-probs feed nothing but the ratio of a single
on-policy step (`score_actor=False`, `scores_old_logprobs`), the actor's forward is skipped: the
loss then uses its own log-probs, detached, and the KL is measured in the update (`kl` holds zeros).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from rlpa_jax.config.tree import PPOConfig
from rlpa_jax.generation.sampler import bucket
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.rl import ppo
from rlpa_jax.rl.environment import RewardMode, reward_parts
from rlpa_jax.rl.ppo import AdvantageSettings
from rlpa_jax.rl.rollout import Sample
from rlpa_jax.runtime import multihost
from rlpa_jax.training.forwards import response_logprobs, response_values

# What each field's second axis spans; trimming and padding follow it.
SEQUENCE, RESPONSE, ROW = "sequence", "response", "row"


def _field(axis: str, doc: str):
    return dataclasses.field(default=None, metadata={"axis": axis, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Experience:
    """One PPO batch: `rows` sampled turns, NumPy arrays on the host (or their device copies).

    Shapes: (rows, P + R) for sequence fields, (rows, R) for response fields, (rows,) for row
    fields. Fields a stage has not filled yet are None (`only` keeps a subset for an update).
    """

    tokens: np.ndarray = _field(SEQUENCE, "int32 prompt (left-padded) then response (right-padded)")
    attention_mask: np.ndarray = _field(SEQUENCE, "bool, True on real tokens")
    response_mask: np.ndarray = _field(RESPONSE, "bool, True on the turn's tokens (stop token included)")
    sampler_logprobs: np.ndarray = _field(RESPONSE, "float32 log-probs the sampler drew the tokens with")
    profile_mask: np.ndarray = _field(RESPONSE, "bool, the tokens up to and including </profile>")
    item_credit: np.ndarray = _field(RESPONSE, "float32 each profile line's share of the F1 (item credit)")
    item_mask: np.ndarray = _field(RESPONSE, "bool, the tokens of profile lines that carry an item credit")
    scores: np.ndarray = _field(ROW, "float32 the turn reward the configured reward mode trains on")
    profile_scores: np.ndarray = _field(ROW, "float32 its profile part (profile F1, or 0 in an ablation)")
    response_scores: np.ndarray = _field(ROW, "float32 its response part (the 0/1 gate, or 0 in an ablation)")
    chosen: np.ndarray = _field(ROW, "bool, the best-of-n sample that continued the conversation")
    valid: np.ndarray = _field(ROW, "bool, judged (False: a judge or user failed; padding rows too)")
    conversation_id: np.ndarray = _field(ROW, "int32 (-1 on padding rows)")
    turn: np.ndarray = _field(ROW, "int32 (-1 on padding rows)")
    sample_index: np.ndarray = _field(ROW, "int32 which of the prompt's n samples (-1 on padding rows)")
    old_logprobs: np.ndarray = _field(RESPONSE, "float32 the actor's log-probs before this update")
    reference_logprobs: np.ndarray = _field(RESPONSE, "float32 the frozen reference's log-probs")
    old_values: np.ndarray = _field(RESPONSE, "float32 the critic's values (zeros without a critic)")
    kl: np.ndarray = _field(RESPONSE, "float32 per-token KL estimate to the reference (zeros without old_logprobs)")
    advantages: np.ndarray = _field(RESPONSE, "float32")
    returns: np.ndarray = _field(RESPONSE, "float32 value targets (zeros without a critic)")
    # Data, not a constant of the update program: adaptive KL changes it every iteration.
    kl_coef: np.ndarray = _field(ROW, "float32 the coefficient of the actor loss's KL term (0: measured only)")

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def replace(self, **fields) -> "Experience":
        return dataclasses.replace(self, **fields)

    def only(self, *names: str) -> "Experience":
        """The named fields; every other field None (what one jitted forward or update needs)."""
        return Experience(**{name: getattr(self, name) for name in names})

    def take(self, rows) -> "Experience":
        return jax.tree.map(lambda value: value[rows], self)

    def padded_rows(self, multiple: int) -> "Experience":
        """All-zero rows appended up to a multiple (zero masks: they add nothing to a loss)."""
        extra = -self.rows % multiple
        if not extra:
            return self
        return jax.tree.map(lambda v: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]), self)


jax.tree_util.register_dataclass(Experience, data_fields=[f.name for f in dataclasses.fields(Experience)],
                                 meta_fields=[])
# Each field's axis kind (SEQUENCE, RESPONSE, ROW): the shape a field has in a batch of given width.
FIELD_AXES = {f.name: f.metadata["axis"] for f in dataclasses.fields(Experience)}

# The fields the actor and critic updates read (ppo.kl_penalty=reward, actor forward scored):
# ExperienceBuilder.update_fields names them for the configured case.
UPDATE_FIELDS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "advantages", "returns", "old_values")
# What the update reads besides when the KL is in the loss (or measured there).
KL_IN_LOSS_FIELDS = ("reference_logprobs", "kl_coef")


def pack_samples(samples: Sequence[Sample], pad_id: int, response_length: int, prompt_buckets: Sequence[int],
                 row_multiple: int = 1, reward_mode: RewardMode = "both") -> Experience:
    """The samples' arrays, with all-padding rows up to a row multiple.

    Besides the trained score, each row keeps the two parts of it the reward mode trains on and
    a mask of its <profile> block's tokens (for crediting each block with its own reward), and
    its item credits when the rollout computed them (zeros otherwise). A sample no judge could
    score keeps its row (so every prompt's n samples stay n consecutive rows) with an empty
    response mask: it adds nothing to a loss, an advantage or a statistic."""
    prompt_length = bucket(max(len(s.prompt_tokens) for s in samples), prompt_buckets)
    rows = -(-len(samples) // row_multiple) * row_multiple
    tokens = np.full((rows, prompt_length + response_length), pad_id, np.int32)
    attention = np.zeros(tokens.shape, bool)
    sampler_logprobs = np.zeros((rows, response_length), np.float32)
    meta = np.full((rows, 3), -1, np.int32)  # conversation, turn, sample index
    scores = np.zeros((rows,), np.float32)
    chosen = np.zeros((rows,), bool)
    valid = np.zeros((rows,), bool)
    block_scores = np.zeros((rows, 2), np.float32)
    profile_mask = np.zeros((rows, response_length), bool)
    item_credit = np.zeros((rows, response_length), np.float32)
    item_mask = np.zeros((rows, response_length), bool)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_tokens), len(s.response_tokens)
        tokens[i, prompt_length - p:prompt_length] = s.prompt_tokens
        tokens[i, prompt_length:prompt_length + r] = s.response_tokens
        attention[i, prompt_length - p:prompt_length + r] = True
        valid[i] = s.score.valid
        sampler_logprobs[i, :r] = s.sampler_logprobs
        meta[i] = (s.conversation_id, s.turn, s.sample_index)
        scores[i] = s.reward
        chosen[i] = s.chosen
        block_scores[i] = reward_parts(s.score, reward_mode)
        profile_mask[i, :min(s.profile_length, r)] = s.score.valid
        if s.item_credit is not None:
            item_credit[i, :r], item_mask[i, :r] = s.item_credit, s.item_mask
    return Experience(
        tokens=tokens, attention_mask=attention, response_mask=attention[:, prompt_length:] & valid[:, None],
        sampler_logprobs=sampler_logprobs, profile_mask=profile_mask, item_credit=item_credit, item_mask=item_mask,
        scores=scores, profile_scores=block_scores[:, 0], response_scores=block_scores[:, 1], chosen=chosen, valid=valid,
        conversation_id=meta[:, 0], turn=meta[:, 1], sample_index=meta[:, 2],
    )


# Response lengths a trimmed batch is cut to: few enough that trimming compiles a handful of programs.
RESPONSE_BUCKETS = (32, 64, 128, 256, 512)


def prompt_lengths(experience: Experience) -> np.ndarray:
    """Real (unpadded) prompt tokens of every row."""
    response_length = experience.response_mask.shape[1]
    return experience.attention_mask[:, :-response_length].sum(axis=1)


def trim_padding(experience: Experience, prompt_buckets: Sequence[int],
                 response_buckets: Sequence[int] = RESPONSE_BUCKETS) -> Experience:
    """The rows cut to the buckets of their own longest prompt and response.

    A packed batch is as wide as the longest prompt of a whole iteration plus max_new_tokens, while
    most rows are early turns with short prompts and short replies; the forwards and the update
    cost what the width costs. Dropping columns that are padding in every row changes no result
    (positions come from the attention mask), so each slice of rows runs at its own bucket.
    """
    response_width = experience.response_mask.shape[1]
    prompt_width = experience.tokens.shape[1] - response_width
    keep_prompt = min(bucket(max(int(prompt_lengths(experience).max()), 1), prompt_buckets), prompt_width)
    keep_response = min(bucket(max(int(experience.response_mask.sum(axis=1).max()), 1), response_buckets),
                        response_width)
    cuts = {SEQUENCE: np.s_[:, prompt_width - keep_prompt:prompt_width + keep_response],
            RESPONSE: np.s_[:, :keep_response], ROW: np.s_[:]}
    return experience.replace(**{f.name: getattr(experience, f.name)[cuts[f.metadata["axis"]]]
                                 for f in dataclasses.fields(Experience) if getattr(experience, f.name) is not None})


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


def untrim_responses(values: np.ndarray, response_width: int) -> np.ndarray:
    """(rows, trimmed response) -> (rows, response_width), zeros where the trim cut padding."""
    return np.pad(values, ((0, 0), (0, response_width - values.shape[1])))


class ForwardPasses:
    """The scoring forwards: response log-probs under a policy (the actor, the reference) and the
    critic's values, jitted, over the rows in chunks of `chunk_rows`.

    `trim` (the cut the updates use too) shortens each chunk to its own length buckets: rows
    arrive in rollout order, so a chunk holds turns of similar length."""

    def __init__(self, config: Qwen2Config, chunk_rows: int = 32, put_batch=None,
                 trim: Callable[[Experience], Experience] | None = None):
        self.config, self.chunk_rows = config, chunk_rows
        self.put_batch = put_batch or (lambda x: x)
        self.trim = trim
        self._logprobs = jax.jit(lambda p, t, m, r: response_logprobs(p, config, t, m, r), static_argnums=3)
        self._values = jax.jit(lambda p, t, m, r: response_values(p, config, t, m, r), static_argnums=3)

    def _chunks(self, fn, params, experience: Experience) -> np.ndarray:
        width = experience.response_mask.shape[1]
        inputs = experience.only("tokens", "attention_mask", "response_mask")
        outs = []
        for start in range(0, experience.rows, self.chunk_rows):
            chunk = inputs.take(np.s_[start:start + self.chunk_rows])
            if self.trim is not None:
                chunk = self.trim(chunk)
            length = chunk.response_mask.shape[1]
            out = fn(params, self.put_batch(chunk.tokens), self.put_batch(chunk.attention_mask), length)
            outs.append(untrim_responses(np.asarray(multihost.gather(out)), width))
        return np.concatenate(outs) * experience.response_mask

    def lower(self, params: Params, tokens, attention_mask, response_length: int, head: str = "lm"):
        """The program one chunk runs, lowered (not run) for these possibly abstract arguments."""
        jitted = self._logprobs if head == "lm" else self._values
        return jitted.lower(params, tokens, attention_mask, response_length)

    def logprobs(self, params: Params, experience: Experience) -> np.ndarray:
        return self._chunks(self._logprobs, params, experience)

    def values(self, params: Params, experience: Experience) -> np.ndarray:
        return self._chunks(self._values, params, experience)


def scores_old_logprobs(p: PPOConfig, rows_per_iteration: int) -> bool:
    """Whether an iteration needs the actor's scoring forward (the "old" log-probs).

    It does not when every row is updated exactly once, at the parameters that sampled and would
    have scored it (one epoch, all rows in one minibatch: one optimizer step, whose micro-batches
    all see the same parameters), and nothing but the PPO ratio reads the old log-probs: the KL is
    in the loss, or it is off (kl_coef 0 in the rewards; adaptive KL cannot move a 0). The loss's
    own log-probs, detached, are then the old ones, and the KL metric comes from the update.
    """
    one_step = p.epochs == 1 and rows_per_iteration <= p.train_batch_size
    return not (one_step and (p.kl_penalty == "loss" or p.kl_coef == 0))


@dataclasses.dataclass(frozen=True)
class ExperienceBuilder:
    """Samples -> a finished Experience: packing, scoring forwards, KL and advantages, in one call.

    `kl_penalty`: `reward` folds kl_coef * KL into the advantages, `loss` leaves it to the actor
    loss. `score_actor=False` skips the actor's forward (`scores_old_logprobs` decides: one on-policy
    update per row, and no advantage reads the old log-probs); the update then measures the KL itself."""

    forwards: ForwardPasses
    # (experience, settings) -> per-token (advantages, returns): rl.advantages.lookup(...)
    advantages: Callable[[Experience, AdvantageSettings], tuple[np.ndarray, np.ndarray]]
    pad_id: int
    response_length: int
    prompt_buckets: Sequence[int]
    reward_mode: RewardMode
    kl_estimator: ppo.KLEstimator
    whiten_advantages: bool
    kl_penalty: ppo.KLPenalty = "reward"
    score_actor: bool = True

    def __post_init__(self):
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"ppo.kl_penalty={self.kl_penalty!r} is not one of reward, loss")

    @property
    def kl_in_update(self) -> bool:
        """Whether the update gets the reference's log-probs: to train on the KL, or to measure it."""
        return self.kl_penalty == "loss" or not self.score_actor

    @property
    def update_fields(self) -> tuple[str, ...]:
        """The fields the actor and critic updates read, for this placement of the KL."""
        fields = tuple(f for f in UPDATE_FIELDS if self.score_actor or f != "old_logprobs")
        return fields + KL_IN_LOSS_FIELDS if self.kl_in_update else fields

    def __call__(self, samples: Sequence[Sample], actor: Params, reference: Params, critic: Params | None,
                 settings: AdvantageSettings) -> Experience:
        experience = pack_samples(samples, self.pad_id, self.response_length, self.prompt_buckets,
                                  self.forwards.chunk_rows, self.reward_mode)
        return self.score(experience, actor, reference, critic, settings)

    def score(self, experience: Experience, actor: Params, reference: Params, critic: Params | None,
              settings: AdvantageSettings) -> Experience:
        """A packed Experience (tokens, masks, scores, valid) -> the finished one."""
        if self.kl_penalty == "reward" and not self.score_actor and settings.kl_coef:
            raise ValueError(f"ppo.kl_penalty=reward with kl_coef={settings.kl_coef} needs the old log-probs; "
                             "the actor's forward cannot be skipped")
        mask = experience.response_mask
        old_logprobs = self.forwards.logprobs(actor, experience) if self.score_actor else None
        reference_logprobs = self.forwards.logprobs(reference, experience)
        # Without a critic (critic=None: the estimator needs none) its values would be one forward
        # pass spent for nothing.
        old_values = (self.forwards.values(critic, experience) if critic is not None
                      else np.zeros_like(reference_logprobs))
        kl = (np.asarray(ppo.kl_penalty(old_logprobs, reference_logprobs, self.kl_estimator) * mask)
              if old_logprobs is not None else np.zeros_like(reference_logprobs))
        experience = experience.replace(old_logprobs=old_logprobs, reference_logprobs=reference_logprobs,
                                        old_values=old_values, kl=kl)
        if self.kl_in_update:
            coef = settings.kl_coef if self.kl_penalty == "loss" else 0.0
            experience = experience.replace(kl_coef=np.full((experience.rows,), coef, np.float32))
        if self.kl_penalty == "loss":  # the estimator gets no KL term: the loss has it
            settings = dataclasses.replace(settings, kl_coef=0.0)
        advantages, returns = self.advantages(experience, settings)
        if self.whiten_advantages:
            advantages = np.asarray(ppo.whiten(advantages, mask))
        return experience.replace(advantages=np.asarray(advantages, np.float32),
                                  returns=np.asarray(returns, np.float32))
