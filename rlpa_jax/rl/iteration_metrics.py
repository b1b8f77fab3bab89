"""What an iteration's samples and experience say, as metrics: profile F1 by turn (where it is
lost: revealed, written, right) and the experience's log-prob gap, block entropies and KL."""

from __future__ import annotations

import numpy as np

from rlpa_jax.dialogue.matching import mentioned_item_indices
from rlpa_jax.rl.experience import Experience
from rlpa_jax.runtime import multihost


def profile_by_turn(samples, conversations, local_ids: frozenset[int] | None = None) -> dict[str, float]:
    """Where in the dialogue profile F1 is lost, per turn K (mean over the scored samples):
    `profile_f1_turnK`; `revealed_turnK`, the true items the user's messages so far mention (what
    a perfect reader could list); `written_turnK`, the items the turn lists (0 when malformed);
    `right_turnK`, how many of those match (m, read back from F1 = 2m / (written + true)).

    With several processes (`local_ids`: the conversations this one played, whose histories it
    holds) each counts its own samples and the sums are reduced over processes."""
    by_id = {c.conversation_id: c for c in conversations}
    by_turn: dict[int, dict[str, list[float]]] = {}
    for s in samples:
        if not s.score.valid or (local_ids is not None and s.conversation_id not in local_ids):
            continue
        conversation = by_id[s.conversation_id]
        true = conversation.user.persona.items
        said = [m.content for m in conversation.history if m.role == "user"][:s.turn + 1]
        written = len(s.parsed.profile) if s.parsed.well_formed else 0
        row = by_turn.setdefault(s.turn, {"profile_f1": [], "revealed": [], "written": [], "right": []})
        row["profile_f1"].append(s.score.profile_reward)
        row["revealed"].append(len(set().union(*(mentioned_item_indices(true, text) for text in said))))
        row["written"].append(written)
        row["right"].append(round(s.score.profile_reward * (written + len(true)) / 2))
    if local_ids is None:
        return {f"{name}_turn{turn + 1}": float(np.mean(values)) for turn, row in sorted(by_turn.items())
                for name, values in row.items()}
    # Every process must name the same keys: the turns any process saw.
    turns = sorted(set().union(*multihost.allgather_json(sorted(by_turn))))
    sums = {f"{name}_turn{turn + 1}": float(np.sum(by_turn.get(turn, {}).get(name, [])))
            for turn in turns for name in ("profile_f1", "revealed", "written", "right")}
    counts = {key: len(by_turn.get(int(key.rsplit("_turn", 1)[1]) - 1, {}).get(key.rsplit("_turn", 1)[0], []))
              for key in sums}
    return multihost.reduce_metrics(sums, counts)


def experience_metrics(experience: Experience) -> dict[str, float]:
    """What an iteration's experience says before the update: the largest gap between the sampler's
    and the trainer's log-probs (~0 in float32), each block's entropy, and the KL to the reference.

    Without the actor's scoring forward (old_logprobs None: skipped, experience.scores_old_logprobs) there is no
    trainer log-prob to compare: `logprob_gap` and `kl` are left out (the trainer takes `kl` from
    the update's `loss_kl`) and the entropies use the sampler's log-probs."""
    mask = experience.response_mask
    logprobs = experience.old_logprobs
    metrics = {}
    if logprobs is not None:
        metrics["logprob_gap"] = float(np.abs(logprobs - experience.sampler_logprobs)[mask].max())
    else:
        logprobs = experience.sampler_logprobs
    # Per-token entropy of each block, estimated as the sampled tokens' mean -log p (exact in
    # expectation at temperature 1): whether PPO sharpens the profile, the reply, or neither.
    profile_mask = experience.profile_mask & mask
    for name, block in (("entropy_profile", profile_mask), ("entropy_reply", mask & ~profile_mask)):
        metrics[name] = float(-logprobs[block].mean()) if block.any() else 0.0
    if experience.old_logprobs is not None:
        metrics["kl"] = float(experience.kl[mask].mean())
    return metrics
