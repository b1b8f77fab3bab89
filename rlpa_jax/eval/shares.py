"""Which of an evaluation's conversations each process plays (launch/eval.py started as several
processes; README "Several hosts").

Our model samples through the generation engine, whose calls split their rows over every
process's devices: conversation i sits in row i of a call (row i % max_batch_size of call
i // max_batch_size when the conversations are cut into calls), and the process whose devices hold
that row plays it (generation/placement.py): it renders the prompt, reads back the sampled turn,
and makes the conversation's simulated-user and judge calls.

A policy without device work (openai:<model>) splits the conversations into contiguous blocks
(`contiguous_share`): any split gives the same result, this one mirrors the row layout.
"""

from __future__ import annotations

import math
from typing import Sequence

from rlpa_jax.runtime import multihost


def contiguous_share(count: int, process: int, processes: int) -> list[int]:
    """Process `process`'s block of `count` conversations split into `processes` contiguous blocks
    of ceil(count / processes) (the last ones shorter or empty)."""
    block = math.ceil(count / processes)
    return list(range(min(count, process * block), min(count, (process + 1) * block)))


def check_partition(share: Sequence[int], count: int) -> None:
    """Every conversation is played by exactly one process (a collective). A mesh whose tensor axis
    spans hosts puts the same rows on several processes, which this does not split."""
    every = multihost.allgather_json(list(share))
    played = sorted(i for mine in every for i in mine)
    if played != list(range(count)):
        twice = sorted({i for i in played if played.count(i) > 1})
        missing = sorted(set(range(count)) - set(played))
        raise ValueError(f"the processes' shares of {count} conversations overlap at {twice[:8]} or miss "
                         f"{missing[:8]}: each batch row must live on one process's devices (keep mesh.tensor "
                         "within a host)")


def conversation_share(policy, count: int) -> list[int]:
    """The dialogues of `count` this process plays (`policy`: an eval/policies.py Policy): all of
    them in one process; with several, the policy's own share when it has one (JaxPolicy: its
    sampler rows; a baseline wrapper asks its `base`), else a contiguous block."""
    inner = policy
    while not callable(getattr(inner, "share", None)) and getattr(inner, "base", None) is not None:
        inner = inner.base
    if callable(getattr(inner, "share", None)):
        return list(inner.share(count))
    return contiguous_share(count, multihost.process_index(), multihost.process_count())
