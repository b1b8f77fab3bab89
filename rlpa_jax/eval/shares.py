"""Which of an evaluation's conversations each process plays, and where their rows sit in a
sampler call (launch/eval.py started as several processes; README "Several hosts").

Our model samples on a mesh whose batch rows are split over every process's devices. Conversation
i sits in row i of the sampler call (row i % max_batch_size of call i // max_batch_size when the
conversations are cut into calls), as in the one-process run, and the process whose devices hold
that row plays it: it renders the prompt, reads back the sampled turn, and makes the conversation's
simulated-user and judge calls. Each call then fills a process's own rows with its conversations
still talking, in order, padding the rest (`RowShare.calls`): while every conversation talks the
rows are exactly the one-process run's, so a greedy evaluation is that run's and a sampled one
draws the same random numbers; after a dialogue stops, the one-process run closes the gap and the
rows (so the random draws) of a sampled evaluation differ.

A policy without device work (openai:<model>) splits the conversations into contiguous blocks
(`contiguous_share`): any split gives the same result, this one mirrors the row layout.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from rlpa_jax.runtime import multihost


def padded(count: int, multiple: int) -> int:
    """`count` rounded up to a multiple of `multiple`."""
    return -(-count // multiple) * multiple


def contiguous_share(count: int, process: int, processes: int) -> list[int]:
    """Process `process`'s block of `count` conversations split into `processes` contiguous blocks
    of ceil(count / processes) (the last ones shorter or empty)."""
    block = math.ceil(count / processes)
    return list(range(min(count, process * block), min(count, (process + 1) * block)))


class RowShare:
    """A process's rows of the sampler calls over `row_multiple`-row-aligned batches.

    `row_indices(rows)`: the rows of a `rows`-row batch that land on this process's devices
    (multihost.local_row_indices over the mesh's batch sharding); `row_multiple`: the devices
    the batch is split over (mesh data x fsdp); `max_batch_size`: conversations per call (None:
    all in one call)."""

    def __init__(self, row_indices: Callable[[int], np.ndarray], row_multiple: int, max_batch_size: int | None):
        self.row_indices, self.row_multiple, self.max_batch_size = row_indices, row_multiple, max_batch_size

    def _rows(self, rows: int) -> list[int]:
        return [int(i) for i in self.row_indices(rows)]

    def chunk_rows(self) -> tuple[int, list[int]]:
        """With max_batch_size: (rows of every call, this process's rows that hold conversations)."""
        rows = padded(self.max_batch_size, self.row_multiple)
        return rows, [i for i in self._rows(rows) if i < self.max_batch_size]

    def conversations(self, count: int) -> list[int]:
        """This process's conversations of `count`: those whose row lands on its devices."""
        if self.max_batch_size is None:
            mine = set(self._rows(padded(count, self.row_multiple)))
            return [i for i in range(count) if i in mine]
        mine = set(self.chunk_rows()[1])
        return [i for i in range(count) if i % self.max_batch_size in mine]

    def calls(self, count_here: int) -> tuple[int, list[list[int]]]:
        """How this process's `count_here` prompts of one policy turn go into the turn's sampler
        calls: (rows of every call, for each call the rows this process fills, in prompt order).
        A collective: every process gets the same number of calls (some fill no rows)."""
        if self.max_batch_size is None:
            most = multihost.agree_on_max(count_here)
            if most == 0:
                return 0, []
            rows = padded(most, self.row_multiple)
            while len(self._rows(rows)) < most:  # processes hold equal numbers of rows
                rows += self.row_multiple
            return rows, [self._rows(rows)[:count_here]]
        rows, mine = self.chunk_rows()
        if count_here and not mine:
            raise ValueError(f"{count_here} conversations on a process that holds no row of a "
                             f"max_batch_size={self.max_batch_size} call")
        calls = multihost.agree_on_max(math.ceil(count_here / len(mine)) if mine else 0)
        filled = [mine[: max(0, min(len(mine), count_here - c * len(mine)))] for c in range(calls)]
        return rows, filled


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
