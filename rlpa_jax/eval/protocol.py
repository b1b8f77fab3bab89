"""The ALOE evaluation protocol, under any of its settings, run for many users at once.

Every dialogue starts cold: the simulated user opens with "Hello" and reveals itself gradually.
Turn k (k = 1..K) is the k-th exchange: the user's message k-1 (message 0 is the greeting) and the
policy's k-th reply. A response judge that sees the user's full true persona gives every reply a
strict 0/1 (natural, relevant, logical, engaging, informative); AL(k) is the mean over users.
Policy, judge and user calls of one turn are each one batched (async) call over all users.

What a setting (vanilla, extended, conflict, long_term) changes is its entry in eval/settings.py's
EVAL_SETTINGS: its length, the personas the users play, whether and when they switch to another
persona, how often the policy's stated profile is scored. This module reads those fields only.

A policy or user call that fails ends that user's dialogue (its remaining turns are unscored);
a judge that cannot score a reply leaves that one turn unscored. Unscored is NaN, never 0.

With several processes (launch/eval.py under jax.distributed), each process plays only its share
of the dialogues (`conversation_share`: for our model, those whose sampler rows land on its devices,
eval/shares.py; for an API policy, a contiguous block) and makes the simulated-user, judge and
profile-judge calls of those alone. The policy's sampler calls are collectives, so every process
calls the policy at the same points, with an empty share too: a turn (or a profile check) is skipped
only when no process has a dialogue left for it (one small exchange per turn). At the end the
transcripts are exchanged, so every process returns the result of the whole evaluation, as a
single process playing every dialogue would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.dialogue.judges import ProfileJudge, ResponseJudge, ResponseRequest
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.profile import ProfileItem, parse_profile, profile_f1
from rlpa_jax.dialogue.users import OPENING_MESSAGE, UserSimulator, UserState, revealed_items
from rlpa_jax.eval.metrics import al_report
from rlpa_jax.eval.policies import Policy, PolicyTurn, history_message
from rlpa_jax.eval.result import EvalResult
from rlpa_jax.eval.settings import EVAL_SETTINGS, EvalSetting, conflict_partners, eval_setting
from rlpa_jax.eval.shares import check_partition, conversation_share
from rlpa_jax.runtime import multihost

PROFILE_REQUEST_PROMPT = "profile_request"


# ---------------------------------------------------------------------------------------------
# The dialogue loop


@dataclass
class Dialogue:
    """One user's side of the evaluation: state, history, and what gets written to the transcript."""

    index: int
    user: UserState
    history: list[Message]
    messages: list[dict]
    judgments: list[int | None]
    judged_against: list[str | None]  # persona id per turn (None once the dialogue has stopped)
    profile_checks: list[dict] = field(default_factory=list)
    active: bool = True
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        self.active = False
        self.stop_reason = reason

    def transcript(self, persona: Persona, switch_persona: Persona | None) -> dict:
        record = {
            "user_index": self.index,
            "persona_id": persona.persona_id,
            "persona_items": [[item.slot, item.value] for item in persona.items],
            "messages": self.messages,
            "judgments": self.judgments,
            "judged_against": self.judged_against,
            "stop_reason": self.stop_reason,
        }
        if switch_persona is not None:
            record["switch_persona_id"] = switch_persona.persona_id
            record["switch_persona_items"] = [[item.slot, item.value] for item in switch_persona.items]
        if self.profile_checks:
            record["profile_checks"] = self.profile_checks
        return record


def _items_json(items: Sequence[ProfileItem] | None) -> list[list[str]] | None:
    return None if items is None else [[item.slot, item.value] for item in items]


def inferred_profile(turn: PolicyTurn) -> list[ProfileItem]:
    """The profile a policy states in answer to the profile request: its <profile> block for
    RLPA-format turns, else "- Slot: value" lines (or a JSON object) in its reply."""
    if turn.profile is not None:
        return list(turn.profile)
    return parse_profile(turn.response or turn.text)


def _record_turn(dialogues: Sequence[Dialogue], turns: Sequence[PolicyTurn],
                 turn_number: int) -> list[tuple[Dialogue, dict, ResponseRequest]]:
    """Write each reply to its transcript and history (or stop the dialogue if the policy failed);
    returns the judge requests, built from the history as it was before the reply."""
    pending = []
    for dialogue, turn in zip(dialogues, turns):
        message = {"role": "assistant", "content": turn.response, "text": turn.text,
                   "profile": _items_json(turn.profile), "turn": turn_number, "judgment": None}
        dialogue.messages.append(message)
        dialogue.judged_against.append(dialogue.user.persona.persona_id)
        dialogue.judgments.append(None)
        if turn.error is not None:
            message["error"] = turn.error
            dialogue.stop(f"policy failed at turn {turn_number}: {turn.error}")
            continue
        request = ResponseRequest(dialogue.user.persona, tuple(dialogue.history), turn.response)
        pending.append((dialogue, message, request))
        dialogue.history.append(history_message(turn))
    return pending


async def _judge(pending: Sequence[tuple[Dialogue, dict, ResponseRequest]], response_judge: ResponseJudge) -> None:
    """One batched judge call for the turn; None (unscored) stays None."""
    if not pending:
        return
    verdicts = await response_judge.judge([request for _, _, request in pending])
    for (dialogue, message, _), verdict in zip(pending, verdicts):
        message["judgment"] = verdict
        dialogue.judgments[-1] = verdict


@dataclass(frozen=True)
class ProfileProbe:
    """A profile request on a copy of one dialogue, with the truth as it stood when it was asked
    (taken before the simulated users reply, which runs at the same time)."""

    dialogue: Dialogue
    history: list[Message]
    true_items: tuple[ProfileItem, ...]
    revealed: int


def profile_probe(dialogue: Dialogue, request_text: str) -> ProfileProbe:
    return ProfileProbe(dialogue, dialogue.history + [Message("user", request_text)], dialogue.user.persona.items,
                        len(revealed_items(dialogue.user)))


async def _check_profiles(policy: Policy, probes: Sequence[ProfileProbe], turn_number: int,
                          profile_judge: ProfileJudge) -> None:
    """Ask the policy for its current profile in every probe and score it (F1 x 100)."""
    answers = await policy.respond([probe.history for probe in probes])
    inferred = [None if answer.error is not None else inferred_profile(answer) for answer in answers]
    asked = [index for index, items in enumerate(inferred) if items is not None]
    matches = await profile_judge.count_matches([(inferred[i], probes[i].true_items) for i in asked]) if asked else []
    matched = dict(zip(asked, matches))
    for index, (probe, answer) in enumerate(zip(probes, answers)):
        total = len(probe.true_items)
        check = {"turn": turn_number, "score": None, "answer": answer.text, "inferred": _items_json(inferred[index]),
                 "revealed_share": 100.0 * probe.revealed / max(1, total),
                 "ceiling": 100.0 * profile_f1(probe.revealed, probe.revealed, total)}
        if answer.error is not None:
            check["error"] = answer.error
        elif matched.get(index) is not None:
            check["score"] = 100.0 * profile_f1(matched[index], len(inferred[index]), total)
        probe.dialogue.profile_checks.append(check)


async def _continue_dialogues(user_sim: UserSimulator, dialogues: Sequence[Dialogue], turn_number: int) -> None:
    """The simulated users' next messages, one batched call; a failed user ends its dialogue."""
    replies = await user_sim.respond([dialogue.user for dialogue in dialogues],
                                     [dialogue.history for dialogue in dialogues])
    for dialogue, reply in zip(dialogues, replies):
        if reply is None:
            dialogue.stop(f"simulated user failed after turn {turn_number}")
            continue
        dialogue.history.append(Message("user", reply))
        dialogue.messages.append({"role": "user", "content": reply})


def profile_score_summary(profile_checks: Sequence[Sequence[dict]], check_turns: Sequence[int]) -> list[dict]:
    """Per check turn, means over the users scored (`profile_checks`: each user's checks):
    profile score, revealed share and ceiling."""
    summaries = []
    for turn_number in check_turns:
        checks = [check for user_checks in profile_checks for check in user_checks
                  if check["turn"] == turn_number and check["score"] is not None]

        def mean(key: str) -> float | None:
            return float(np.mean([check[key] for check in checks])) if checks else None

        summaries.append({"turn": turn_number, "score": mean("score"), "revealed_share": mean("revealed_share"),
                          "ceiling": mean("ceiling"), "scored": len(checks),
                          "unscored": len(profile_checks) - len(checks)})
    return summaries


def resolve_turns(setting: str, num_turns: int | None) -> int:
    """The dialogue length: `num_turns`, or the setting's standard one when None."""
    turns = eval_setting(setting).turns if num_turns is None else num_turns
    if turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {turns}")
    return turns


def _setting_option(setting: str, entry: EvalSetting, key: str, given: int | None) -> int | None:
    """A per-setting option (switch_turn, profile_every): the setting's own value unless given; an
    option the setting does not use (None in its entry) cannot be given."""
    own = getattr(entry, key)
    if given is None:
        return own
    if own is None:
        using = [name for name, other in EVAL_SETTINGS.items() if getattr(other, key) is not None]
        raise ValueError(f"run_protocol: setting {setting} has no {key} (EVAL_SETTINGS in rlpa_jax/eval/settings.py); "
                         f"it applies to {', '.join(using) or 'no setting'}")
    return given


async def run_protocol_async(
    policy: Policy,
    personas: Sequence[Persona],
    user_sim: UserSimulator,
    response_judge: ResponseJudge,
    num_turns: int | None = None,
    setting: str = "vanilla",
    profile_judge: ProfileJudge | None = None,
    seed: int = 0,
    *,
    switch_turn: int | None = None,
    partner_pool: Sequence[Persona] | None = None,
    profile_every: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run the protocol for every persona; see run_protocol."""
    num_turns = resolve_turns(setting, num_turns)
    entry = eval_setting(setting)
    switch_turn = _setting_option(setting, entry, "switch_turn", switch_turn)
    profile_every = _setting_option(setting, entry, "profile_every", profile_every)
    if not personas:
        raise ValueError("run_protocol: no personas to evaluate")
    if profile_every is not None and profile_judge is None:
        raise ValueError(f"run_protocol: setting {setting} needs a profile_judge")
    if switch_turn is not None and not 2 <= switch_turn <= num_turns:
        raise ValueError(f"run_protocol: {setting} switch_turn={switch_turn} must be within 2..num_turns={num_turns}")
    if profile_every is not None and profile_every < 1:
        raise ValueError(f"run_protocol: profile_every must be >= 1, got {profile_every}")

    personas = entry.personas(personas, seed)
    partners = conflict_partners(personas, seed, partner_pool) if switch_turn is not None else [None] * len(personas)
    request_text = load_prompt(PROFILE_REQUEST_PROMPT) if profile_every is not None else ""
    check_turns = [] if profile_every is None else [k for k in range(1, num_turns + 1) if k % profile_every == 0]

    share = conversation_share(policy, len(personas))
    several = multihost.process_count() > 1
    if several:
        check_partition(share, len(personas))
    dialogues = []
    for index in share:
        # Turn k's user message is message k-1, so "switch at turn 6" is the user's message 5.
        state = user_sim.start(personas[index], seed * 100_000 + index,
                               switch_turn - 1 if partners[index] is not None else None, partners[index])
        dialogues.append(Dialogue(index, state, [Message("user", OPENING_MESSAGE)],
                                  [{"role": "user", "content": OPENING_MESSAGE}], [], []))

    with tqdm(total=num_turns, desc=f"{policy.name} [{setting}]", unit="turn",
              disable=not progress or not multihost.is_main_process()) as bar:
        for turn_number in range(1, num_turns + 1):
            active = [dialogue for dialogue in dialogues if dialogue.active]
            for dialogue in dialogues:
                if not dialogue.active:
                    dialogue.judgments.append(None)
                    dialogue.judged_against.append(None)
            # Every process calls the policy while any has a dialogue left (its calls are collectives).
            if not multihost.agree_on_any(bool(active)):
                bar.update(1)
                continue
            turns = await policy.respond([dialogue.history for dialogue in active])
            pending = _record_turn(active, turns, turn_number)
            still_active = [dialogue for dialogue in active if dialogue.active]
            # Judging, profile checks and the users' replies need only what is settled now, so
            # they run concurrently (host calls overlap each other and the policy's device work).
            jobs = [_judge(pending, response_judge)]
            if turn_number in check_turns and multihost.agree_on_any(bool(still_active)):
                probes = [profile_probe(dialogue, request_text) for dialogue in still_active]
                jobs.append(_check_profiles(policy, probes, turn_number, profile_judge))
            if turn_number < num_turns and still_active:
                jobs.append(_continue_dialogues(user_sim, still_active, turn_number))
            await asyncio.gather(*jobs)
            bar.update(1)

    transcripts = [dialogue.transcript(personas[dialogue.index], partners[dialogue.index]) for dialogue in dialogues]
    if several:  # every process's dialogues, in the one-process order (pickled: key order and types kept)
        transcripts = sorted((record for part in multihost.allgather_objects(transcripts) for record in part),
                             key=lambda record: record["user_index"])
    judgments = np.array([[np.nan if value is None else float(value) for value in record["judgments"]]
                          for record in transcripts], dtype=np.float64)
    return EvalResult(
        name=policy.name,
        setting=setting,
        judgments=judgments,
        al=al_report(judgments),
        profile_scores=profile_score_summary([record.get("profile_checks", []) for record in transcripts],
                                             check_turns) if profile_every is not None else None,
        transcripts=transcripts,
    )


def run_protocol(
    policy: Policy,
    personas: Sequence[Persona],
    user_sim: UserSimulator,
    response_judge: ResponseJudge,
    num_turns: int | None = None,
    setting: str = "vanilla",
    profile_judge: ProfileJudge | None = None,
    seed: int = 0,
    **kw: Any,
) -> EvalResult:
    """Evaluate `policy` with one cold-start dialogue per persona under `setting`.

    setting: a name in EVAL_SETTINGS (eval/settings.py). num_turns: None gives the setting's
    standard length (10; 70 for long_term). Keywords: switch_turn (a setting that switches, i.e.
    conflict: the first turn whose user message comes from the new persona, default the setting's,
    6), partner_pool (personas to switch to, default `personas`), profile_every (a setting with
    profile checks, i.e. long_term: turns between them, default the setting's, 10), progress (a
    tqdm bar over turns). From inside a running event loop, await run_protocol_async instead.
    """
    return run_sync(run_protocol_async(policy, personas, user_sim, response_judge, num_turns, setting,
                                       profile_judge, seed, **kw))


__all__ = [
    "inferred_profile",
    "profile_score_summary",
    "resolve_turns",
    "run_protocol",
    "run_protocol_async",
]
