"""Which conversations a PPO iteration plays, per `rollout.schedule`.

`conversation`: every iteration starts `rollout.conversations` new dialogues (`fresh_conversations`,
users drawn from (seed, iteration)) and plays them to the end with one policy.

`turn` (the paper's schedule): a `ConversationPool` of that many slots, each holding one live
dialogue that advances one turn per iteration, so later turns are sampled by a newer policy than
earlier ones. A slot whose dialogue is over (max_rounds turns played, or the user left) is
refilled at the start of the next iteration with a new user. Users are dealt from the training
personas like cards: the run's k-th conversation gets position k % N of a permutation drawn from
(seed, k // N), so every persona is played once before any is played twice (the paper walks its
data set the same way) and the pool is a pure function of the seed and what happened in it. The
whole pool (histories, user states with their RNGs, personas as indices into the training
personas, the deal position) is plain JSON (`to_json` / `load_json`), saved with each checkpoint,
so `--resume` continues the very same conversations.

With several processes every process holds the whole pool: each deals the same users (a pure
function of the seed), plays only the conversations whose sampler rows are its own (rl/rollout.py)
and, after the turn, takes everyone else's from them (`take_peer_turns`, in this same JSON). So
every process's pool is the one-process run's, the checkpoint item is identical on every process
(whichever writes it, --resume reads the same pool) and the refill, turn and turnover statistics
need no further exchange. Only the played conversations travel, once per iteration: a few
messages and a user state each, small next to the sampled turns the rollout exchanges anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlpa_jax.dialogue.chat import Message
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.users import UserSimulator, user_state_from_json, user_state_to_json
from rlpa_jax.rl.environment import Conversation, start_conversations
from rlpa_jax.runtime import multihost

FORMAT = 1  # the JSON layout's version; a document of another version is refused on resume


def derived_seed(*parts: int) -> int:
    """A seed that is a pure function of its parts (Python's hash() of strings is salted per process)."""
    return int(np.random.default_rng([abs(x) for x in parts] + [int(x < 0) for x in parts]).integers(2**31))


def iteration_personas(pool: Sequence[Persona], count: int, seed: int, iteration: int) -> list[int]:
    """Persona indices for one PPO iteration: a pure function of (seed, iteration), so a resumed
    run draws exactly the users the uninterrupted run would have drawn."""
    rng = np.random.default_rng([seed, iteration])
    return rng.choice(len(pool), size=count, replace=len(pool) < count).tolist()


def fresh_conversations(personas: Sequence[Persona], user_sim: UserSimulator, count: int, seed: int, iteration: int,
                        switch_turn: int | None = None) -> list[Conversation]:
    """The `conversation` schedule's users for one iteration."""
    indices = iteration_personas(personas, count, seed, iteration)
    switch_to = None
    if switch_turn is not None:
        switch_to = [personas[i] for i in iteration_personas(personas, len(indices), seed + 1, iteration)]
    seeds = [derived_seed(seed, iteration, k) for k in range(len(indices))]
    return start_conversations([personas[i] for i in indices], user_sim, seeds, first_id=0,
                               switch_turn=switch_turn, switch_personas=switch_to)


# ---------------------------------------------------------------------------------------------
# The `turn` schedule


def dealt_persona(count: int, seed: int, k: int) -> int:
    """Index of the persona the run's k-th conversation plays: position k % count of the
    permutation drawn for (seed, k // count)."""
    return int(np.random.default_rng([seed, k // count]).permutation(count)[k % count])


def conversation_seed(seed: int, k: int) -> int:
    """The user's RNG seed for the run's k-th conversation."""
    return derived_seed(seed, k)


def turns_played(conversation: Conversation) -> int:
    """The policy's turns so far: the index of the turn it plays next."""
    return sum(1 for message in conversation.history if message.role == "assistant")


@dataclasses.dataclass
class Slot:
    conversation: Conversation  # conversation_id is k, the conversation's number in the run
    persona: int  # index into the training personas
    switch_persona: int | None  # the persona it switches to at data.switch_turn, if it does


class ConversationPool:
    """The `turn` schedule's live conversations, `size` slots (see the module's docstring)."""

    def __init__(self, size: int, personas: Sequence[Persona], user_sim: UserSimulator, seed: int, max_rounds: int,
                 switch_turn: int | None = None):
        if not personas:
            raise ValueError("rollout.schedule=turn: the conversation pool needs at least one training persona")
        self.size, self.personas, self.user_sim = size, personas, user_sim
        self.seed, self.max_rounds, self.switch_turn = seed, max_rounds, switch_turn
        self.slots: list[Slot | None] = [None] * size
        self.started = 0  # conversations dealt so far: the next one is number `started`

    @property
    def conversations(self) -> list[Conversation]:
        return [slot.conversation for slot in self.slots if slot is not None]

    def turns(self) -> list[int]:
        """The turn each conversation plays next (0-based), in `conversations` order."""
        return [turns_played(c) for c in self.conversations]

    def is_over(self, conversation: Conversation) -> bool:
        return not conversation.active or turns_played(conversation) >= self.max_rounds

    def finished(self) -> int:
        """Conversations whose dialogue is over (their slots are refilled next iteration)."""
        return sum(1 for c in self.conversations if self.is_over(c))

    def refill(self) -> int:
        """New users in the empty slots and in those whose dialogue is over; how many started."""
        empty = [i for i, slot in enumerate(self.slots) if slot is None or self.is_over(slot.conversation)]
        for i in empty:
            self.slots[i] = self._deal(self.started)
            self.started += 1
        return len(empty)

    def _deal(self, k: int) -> Slot:
        persona = dealt_persona(len(self.personas), self.seed, k)
        switch = None if self.switch_turn is None else dealt_persona(len(self.personas), self.seed + 1, k)
        (conversation,) = start_conversations(
            [self.personas[persona]], self.user_sim, [conversation_seed(self.seed, k)], first_id=k,
            switch_turn=self.switch_turn, switch_personas=None if switch is None else [self.personas[switch]])
        return Slot(conversation, persona, switch)

    def take_peer_turns(self, local_ids: frozenset[int]) -> None:
        """Several processes, after a turn: every process sends the slots it played (`local_ids`:
        their conversation ids) and loads the others' from their JSON, so all hold the same pool;
        a collective. A process's own slots stay the objects it played."""
        mine = [[i, slot_to_json(slot)] for i, slot in enumerate(self.slots)
                if slot is not None and slot.conversation.conversation_id in local_ids]
        own = {i for i, _ in mine}
        every = multihost.allgather_json(mine)
        counts = np.bincount([i for played in every for i, _ in played], minlength=self.size)
        live = [i for i, slot in enumerate(self.slots) if slot is not None]
        if any(counts[i] != 1 for i in live):
            raise multihost.ProcessMismatch(f"the pool's slots were played by {counts.tolist()} processes each "
                                            "(every live slot must be played by exactly one)")
        for process, played in enumerate(every):
            for i, data in played:
                if i not in own:
                    self.slots[i] = self._slot_from_json(data, f"process {process}'s turn")

    # ------------------------------------------------------------------------------- JSON

    def to_json(self) -> dict:
        return {"format": FORMAT, "size": self.size, "started": self.started,
                "slots": [None if slot is None else slot_to_json(slot) for slot in self.slots]}

    def load_json(self, document: dict, where: str = "checkpoint") -> None:
        """Replaces the pool with the one `document` (from to_json) describes."""
        if document.get("format") != FORMAT:
            raise ValueError(f"{where}: conversation pool format {document.get('format')!r}, this code reads {FORMAT}")
        if document["size"] != self.size:
            raise ValueError(f"{where}: the saved conversation pool has {document['size']} slots but "
                             f"rollout.conversations={self.size}; resume with the run's own value")
        self.started = int(document["started"])
        self.slots = [None if data is None else self._slot_from_json(data, where) for data in document["slots"]]

    def _slot_from_json(self, data: dict, where: str) -> Slot:
        persona, switch = data["persona"], data["switch_persona"]
        if max(persona, -1 if switch is None else switch) >= len(self.personas):
            raise ValueError(f"{where}: conversation {data['id']} plays training persona {max(persona, switch or 0)} "
                             f"but there are {len(self.personas)}; resume with the run's own data settings")
        user = user_state_from_json(data["user"], self.personas[persona],
                                    None if switch is None else self.personas[switch])
        history = [Message(**message) for message in data["history"]]
        conversation = Conversation(int(data["id"]), self.personas[persona], user, history, bool(data["active"]))
        return Slot(conversation, persona, switch)


def slot_to_json(slot: Slot) -> dict:
    """One slot as JSON; "turn" is for a reader (loading counts the history's assistant turns)."""
    c = slot.conversation
    return {"id": c.conversation_id, "persona": slot.persona, "switch_persona": slot.switch_persona,
            "active": c.active, "turn": turns_played(c), "user": user_state_to_json(c.user),
            "history": [dataclasses.asdict(message) for message in c.history]}
