"""What every simulated user shares: its per-conversation state and the batched interface.

The host-side rollout keeps B conversations in flight and asks the simulator for the next
user message of all of them at once:

    states = [user.start(persona, seed) for persona, seed in ...]
    first = await user.respond(states, [[] for _ in states])     # cold start: "Hello"
    ...
    replies = await user.respond(states, histories)              # None = that one failed

respond() advances each state in place: the turn index (the user's messages so far, read from
the history), the revealed items and the RNG. A user can switch to another persona mid-dialogue
(the preference-conflict setting).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from rlpa_jax.dialogue.chat import Message
from rlpa_jax.dialogue.matching import canonical_slot
from rlpa_jax.dialogue.personas.base import Persona
from rlpa_jax.dialogue.profile import ProfileItem, normalize_text

OPENING_MESSAGE = "Hello"  # the ALOE protocol's cold start: no profile information
MAX_SENTENCES = 3


@dataclass
class UserState:
    """One simulated user's side of one conversation (mutated by respond())."""

    persona: Persona  # the persona played now (the switch target once switched)
    seed: int
    rng: random.Random
    turn: int = 0  # messages this user has sent, the opening included (the next one's index)
    revealed: set[int] = field(default_factory=set)  # indices into persona.items
    switch_turn: int | None = None  # the message index from which switch_persona is played
    switch_persona: Persona | None = None
    switched: bool = False
    original_persona: Persona | None = None


@runtime_checkable
class UserSimulator(Protocol):
    def start(
        self,
        persona: Persona,
        seed: int,
        switch_turn: int | None = None,
        switch_persona: Persona | None = None,
    ) -> UserState: ...

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]: ...


def new_user_state(
    persona: Persona, seed: int, switch_turn: int | None = None, switch_persona: Persona | None = None
) -> UserState:
    if (switch_turn is None) != (switch_persona is None):
        raise ValueError(
            "users.start: give both switch_turn and switch_persona (preference conflict) or neither; "
            f"got switch_turn={switch_turn!r}, switch_persona={'set' if switch_persona else None}"
        )
    if switch_turn is not None and switch_turn < 1:
        raise ValueError(f"users.start: switch_turn must be >= 1 (0 is the cold-start greeting), got {switch_turn}")
    return UserState(
        persona=persona,
        seed=seed,
        rng=random.Random(seed),
        switch_turn=switch_turn,
        switch_persona=switch_persona,
        original_persona=persona,
    )


def user_state_to_json(state: UserState) -> dict:
    """Everything of `state` but its personas, as plain JSON (the caller stores which personas they
    were): with user_state_from_json, a conversation resumed from a checkpoint gets the very replies
    the uninterrupted one would have had, the RNG included."""
    version, internal, gauss_next = state.rng.getstate()
    return {"seed": state.seed, "rng": [version, list(internal), gauss_next], "turn": state.turn,
            "revealed": sorted(state.revealed), "switch_turn": state.switch_turn, "switched": state.switched}


def user_state_from_json(data: dict, persona: Persona, switch_persona: Persona | None = None) -> UserState:
    """The state user_state_to_json wrote, for the conversation's original `persona` (and the
    persona it switches to, if it does)."""
    state = new_user_state(persona, int(data["seed"]), data["switch_turn"], switch_persona)
    version, internal, gauss_next = data["rng"]
    state.rng.setstate((version, tuple(internal), gauss_next))
    state.turn, state.revealed, state.switched = int(data["turn"]), set(data["revealed"]), bool(data["switched"])
    if state.switched:
        state.persona = switch_persona
    return state


def revealed_items(state: UserState) -> list[ProfileItem]:
    """Items of the current persona revealed so far (the ceiling for long-term profile scores)."""
    return [state.persona.items[index] for index in sorted(state.revealed)]


def sync_turn(state: UserState, history: Sequence[Message]) -> None:
    """The turn index is the number of messages this user has already sent in `history`, so a
    caller that writes the opening itself (or replays a history) keeps the index right."""
    state.turn = sum(1 for message in history if message.role == "user")


def has_assistant_message(history: Sequence[Message]) -> bool:
    return any(message.role == "assistant" for message in history)


def item_key(item: ProfileItem) -> tuple[str, str]:
    return canonical_slot(item.slot), normalize_text(item.value)


def switch_if_due(state: UserState) -> bool:
    """Move to the switch persona when its turn has come; True on the turn it happens.

    Items the new persona shares with the old one stay revealed.
    """
    if state.switched or state.switch_turn is None or state.switch_persona is None:
        return False
    if state.turn < state.switch_turn:
        return False
    old_revealed = {item_key(state.persona.items[index]) for index in state.revealed}
    state.persona = state.switch_persona
    state.revealed = {index for index, item in enumerate(state.persona.items) if item_key(item) in old_revealed}
    state.switched = True
    return True


class StatefulUser:
    """The part of a UserSimulator that every simulator keeping a UserState shares: start(),
    the batch check, the cold-start opening (which needs no persona) and, for simulators that
    answer each conversation on the host, respond() as one reply() per conversation."""

    opening: str = OPENING_MESSAGE

    def start(self, persona: Persona, seed: int, switch_turn: int | None = None,
              switch_persona: Persona | None = None) -> UserState:
        return new_user_state(persona, seed, switch_turn, switch_persona)

    def check_batch(self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]) -> None:
        if len(states) != len(histories):
            raise ValueError(
                f"users.{type(self).__name__}.respond: {len(states)} states but {len(histories)} histories"
            )

    def opening_if_cold_start(self, state: UserState, history: Sequence[Message]) -> str | None:
        """Syncs the turn index with `history`; the opening message (counted as a turn) while the
        assistant has not spoken yet, else None."""
        sync_turn(state, history)
        if has_assistant_message(history):
            return None
        state.turn += 1
        return self.opening

    async def respond(
        self, states: Sequence[UserState], histories: Sequence[Sequence[Message]]
    ) -> list[str | None]:
        """One reply() per conversation; a simulator that batches requests (LLMUser) overrides this."""
        self.check_batch(states, histories)
        return [self.reply(state, history) for state, history in zip(states, histories)]

    def reply(self, state: UserState, history: Sequence[Message]) -> str:
        """The next user message for one conversation (advances `state`)."""
        raise NotImplementedError(f"users.{type(self).__name__}: define reply() or override respond()")
