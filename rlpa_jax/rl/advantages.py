"""Advantage estimators and credit schemes: small pure functions in two tables keyed by config name.

A credit scheme says which tokens each part of a turn's reward belongs to, as blocks of
(per-row score, token mask), the last block ending on the turn's last token:
- `turn` (the paper): the whole turn shares its reward;
- `block`: the <profile> block gets the profile reward, the reply the response reward;
- `item`: `block`, and each profile line's tokens get its items' share of the F1 in place of the
  block's advantage (rl/item_credit.py; it needs an estimator with per-sample advantages).

An estimator turns an Experience (with old log-probs, values and KL) and a credit scheme into
per-token (advantages, returns):
- `gae` (the paper): each block's score on its last token minus the KL penalty on every token,
  then GAE within the turn over the critic's values;
- `cross_turn`: the same, with each turn's last token also bootstrapping from the value of the
  conversation's next chosen turn;
- `grpo`: each block's score minus its group mean over the prompt's n samples, over the group's
  std, spread over the block's tokens, minus the KL penalty; no critic.

The KL penalty is kl_coef * experience.kl; with `ppo.kl_penalty=loss` the builder passes
kl_coef 0 here and the actor loss carries the KL instead.

The trainer asks the tables (`needs_critic`, `needs_item_credit`), never the names. A new
estimator is one function and one entry in ADVANTAGE_ESTIMATORS. `Advantages` checks the shapes
an estimator reads and returns (chex, on the host's NumPy arrays), whichever estimator it is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import chex
import numpy as np

from rlpa_jax.rl import ppo
from rlpa_jax.rl.experience import Experience
from rlpa_jax.rl.ppo import AdvantageSettings
from rlpa_jax.training.losses import as_float


class CreditBlock(NamedTuple):
    scores: np.ndarray  # (rows,)
    mask: np.ndarray  # (rows, R) float, the tokens the score belongs to


@dataclasses.dataclass(frozen=True)
class CreditScheme:
    blocks: Callable[[Experience], list[CreditBlock]]
    # Per-token credits (values, mask) that replace the block advantage where the mask is set.
    token_credit: Callable[[Experience], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def needs_item_credit(self) -> bool:
        return self.token_credit is not None


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    estimate: Callable[[Experience, CreditScheme, AdvantageSettings], tuple[np.ndarray, np.ndarray]]
    needs_critic: bool
    takes_token_credit: bool  # per-sample advantages that token credits may replace
    min_samples_per_prompt: int = 1  # a group baseline needs at least two samples of a prompt


# ----------------------------------------------------------------------------- credit schemes


def turn_blocks(experience: Experience) -> list[CreditBlock]:
    return [CreditBlock(experience.scores, as_float(experience.response_mask))]


def profile_and_reply_blocks(experience: Experience) -> list[CreditBlock]:
    profile = as_float(experience.profile_mask)
    return [CreditBlock(experience.profile_scores, profile),
            CreditBlock(experience.response_scores, as_float(experience.response_mask) - profile)]


def item_token_credit(experience: Experience) -> tuple[np.ndarray, np.ndarray]:
    return experience.item_credit, experience.item_mask


CREDIT_SCHEMES: dict[str, CreditScheme] = {
    "turn": CreditScheme(turn_blocks),
    "block": CreditScheme(profile_and_reply_blocks),
    "item": CreditScheme(profile_and_reply_blocks, token_credit=item_token_credit),
}


# ----------------------------------------------------------------------------- estimators


def token_rewards(experience: Experience, credit: CreditScheme, kl_coef: float) -> np.ndarray:
    """Each block's score on its last token, minus kl_coef * KL on every token."""
    *earlier, last = credit.blocks(experience)
    rewards = ppo.token_rewards(last.scores, experience.kl, as_float(experience.response_mask), kl_coef)
    for block in earlier:
        rewards = rewards + np.asarray(block.scores, np.float32)[:, None] * ppo.last_token_mask(block.mask)
    return np.asarray(rewards)


def gae_within_turn(experience: Experience, credit: CreditScheme, settings: AdvantageSettings):
    rewards = token_rewards(experience, credit, settings.kl_coef)
    return ppo.gae_advantages(rewards, experience.old_values, experience.response_mask, settings.gamma, settings.lam)


def next_turn_values(experience: Experience, gamma: float) -> np.ndarray:
    """gamma * V(first token of the next chosen turn of the same conversation); 0 at the end.

    The dialogue continues from the chosen sample only, so the chosen turn's successor is real
    and every other sample of that turn shares it as the estimate of what would follow.
    """
    first_values = {}
    for i in np.flatnonzero(experience.chosen):
        first_values[(int(experience.conversation_id[i]), int(experience.turn[i]))] = experience.old_values[i, 0]
    nxt = [first_values.get((int(c), int(t) + 1), 0.0) for c, t in zip(experience.conversation_id, experience.turn)]
    return gamma * np.asarray(nxt, np.float32)


def gae_across_turns(experience: Experience, credit: CreditScheme, settings: AdvantageSettings):
    rewards = token_rewards(experience, credit, settings.kl_coef)
    last = np.asarray(ppo.last_token_mask(experience.response_mask))
    rewards = rewards + last * next_turn_values(experience, settings.gamma)[:, None]
    return ppo.gae_advantages(rewards, experience.old_values, experience.response_mask, settings.gamma, settings.lam)


def whole_group_advantages(scores: np.ndarray, valid: np.ndarray, group_size: int):
    """ppo.group_advantages over rows that may end inside a group: an iteration's rows are padded
    to a multiple of ppo.micro_batch_size, which need not be one of rollout.samples_per_prompt (6
    rows for one prompt of 4 samples). The rows past the last whole group are padding; they are
    completed to a group of unscored rows (no advantage, no effect on any statistic) and cut off
    again. Rows in whole groups take the path they always took."""
    rows = len(scores)
    missing = -rows % group_size
    if not missing:
        return ppo.group_advantages(scores, group_size, valid)
    scores = np.concatenate([np.asarray(scores, np.float32), np.zeros(missing, np.float32)])
    valid = np.concatenate([np.asarray(valid, bool), np.zeros(missing, bool)])
    return np.asarray(ppo.group_advantages(scores, group_size, valid))[:rows]


def group_relative(experience: Experience, credit: CreditScheme, settings: AdvantageSettings):
    """Group advantages of each block on its tokens; the KL enters as a per-token penalty on top."""
    blocks = [ppo.expand_to_tokens(whole_group_advantages(block.scores, experience.valid, settings.group_size),
                                   block.mask) for block in credit.blocks(experience)]
    advantages = sum(blocks[1:], blocks[0])
    if credit.token_credit is not None:
        advantages = ppo.item_advantages(advantages, *credit.token_credit(experience))
    advantages = np.asarray(advantages) - settings.kl_coef * experience.kl * experience.response_mask
    return advantages, np.zeros_like(advantages)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_within_turn, needs_critic=True, takes_token_credit=False),
    "cross_turn": AdvantageEstimator(gae_across_turns, needs_critic=True, takes_token_credit=False),
    "grpo": AdvantageEstimator(group_relative, needs_critic=False, takes_token_credit=True, min_samples_per_prompt=2),
}


@dataclasses.dataclass(frozen=True)
class Advantages:
    """The configured estimator bound to the configured credit scheme: what the trainer asks
    (`needs_critic`, `needs_item_credit`) and calls (experience -> (advantages, returns))."""

    estimator: AdvantageEstimator
    credit: CreditScheme

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic

    @property
    def needs_item_credit(self) -> bool:
        return self.credit.needs_item_credit

    def __call__(self, experience: Experience, settings: AdvantageSettings) -> tuple[np.ndarray, np.ndarray]:
        check_scored(experience)
        advantages, returns = self.estimator.estimate(experience, self.credit, settings)
        chex.assert_equal_shape([advantages, returns, experience.response_mask],
                                custom_message="rl/advantages.py: an estimator returns (advantages, returns) "
                                               "shaped like response_mask (rows, R)")
        return advantages, returns


def check_scored(experience: Experience) -> None:
    """What every estimator reads: a score per row, and the KL and the critic's values per token of
    response_mask (rows, R)."""
    chex.assert_rank(experience.response_mask, 2, custom_message="rl/advantages.py: response_mask is (rows, R)")
    chex.assert_equal_shape([experience.response_mask, experience.kl, experience.old_values],
                            custom_message="rl/advantages.py: kl and old_values are shaped like response_mask")
    chex.assert_shape(experience.scores, experience.response_mask.shape[:1],
                      custom_message="rl/advantages.py: scores has one value per row of response_mask")


def lookup(advantage: str, credit: str, samples_per_prompt: int | None = None) -> Advantages:
    """The configured estimator and credit scheme, or an error naming the key and what is accepted."""
    if advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"ppo.advantage={advantage!r} is not one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if credit not in CREDIT_SCHEMES:
        raise ValueError(f"ppo.credit={credit!r} is not one of {', '.join(CREDIT_SCHEMES)}")
    estimator, scheme = ADVANTAGE_ESTIMATORS[advantage], CREDIT_SCHEMES[credit]
    if scheme.token_credit is not None and not estimator.takes_token_credit:
        takers = [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.takes_token_credit]
        raise ValueError(f"ppo.credit={credit} needs ppo.advantage={' or '.join(takers)} (item credits replace "
                         f"per-sample advantages), got {advantage!r}")
    if samples_per_prompt is not None and samples_per_prompt < estimator.min_samples_per_prompt:
        raise ValueError(f"ppo.advantage={advantage} needs rollout.samples_per_prompt >= "
                         f"{estimator.min_samples_per_prompt}, got {samples_per_prompt}")
    return Advantages(estimator, scheme)
