"""Where a generation call's rows sit: over the mesh's batch devices and over processes.

A call's batch rows are split over the mesh's data x fsdp devices (padded to a multiple of them).
With several processes each process places only its own requests, in the rows its devices hold,
and reads back only those rows: the requests a process serves are those whose rows land on its
devices (`share`), and every call is a collective that every process makes, in the same order,
an empty share included.

Each call fills a process's rows with its requests in order and pads the rest (`calls`). While
every request of a batch is present, the rows are exactly the one-process run's, so a greedy call
gives that run's tokens and a sampled one draws the same random numbers; once a dialogue stops, the
one-process run closes the gap over every row while a process can only close it over its own, and
the rows (so the random draws) of sampled calls differ.

With `max_batch_size` the requests are cut into calls of that many rows (rounded up to the
devices): request i sits in row i % max_batch_size of call i // max_batch_size.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from rlpa_jax.runtime import multihost, parallel


def padded(count: int, multiple: int) -> int:
    """`count` rounded up to a multiple of `multiple`."""
    return -(-count // multiple) * multiple


class RowPlacement:
    """A mesh's batch rows (None: one device, numpy in and out) as this process sees them."""

    def __init__(self, mesh: Mesh | None):
        if mesh is None and multihost.process_count() > 1:
            raise ValueError("generation over several processes needs a mesh (a call's rows span every process)")
        self.mesh = mesh
        self.row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

    @property
    def collective(self) -> bool:
        """Whether every call is a collective over processes (made by all, in the same order)."""
        return multihost.process_count() > 1

    def rows_here(self, rows: int) -> list[int]:
        """The rows of a `rows`-row call that land on this process's devices, ascending."""
        if self.mesh is None:
            return list(range(rows))
        sharding = parallel.batch_sharding(self.mesh, 2)
        return [int(i) for i in multihost.local_row_indices(sharding, (rows, 1))]

    def shard_of(self, row: int, rows: int) -> int:
        """Which block of the row split (one per data x fsdp device) holds `row` of a `rows`-row call."""
        return row * self.row_multiple // rows

    def chunk_rows(self, max_batch_size: int) -> tuple[int, list[int]]:
        """With max_batch_size: (rows of every call, this process's rows that hold requests)."""
        rows = padded(max_batch_size, self.row_multiple)
        return rows, [i for i in self.rows_here(rows) if i < max_batch_size]

    def share(self, count: int, max_batch_size: int | None = None) -> list[int]:
        """This process's requests of `count`: those whose row lands on its devices."""
        if max_batch_size is None:
            mine = set(self.rows_here(padded(count, self.row_multiple)))
            return [i for i in range(count) if i in mine]
        mine = set(self.chunk_rows(max_batch_size)[1])
        return [i for i in range(count) if i % max_batch_size in mine]

    def any_left(self, count_here: int) -> bool:
        """Whether any process still has requests (a collective with several processes)."""
        return (multihost.agree_on_max(count_here) if self.collective else count_here) > 0

    def calls(self, count_here: int, max_batch_size: int | None = None) -> tuple[int, list[list[int]]]:
        """How this process's `count_here` requests go into calls: (rows of every call, for each
        call the rows this process fills, in request order). A collective with several processes:
        every process gets the same number of calls (some fill no rows)."""
        if max_batch_size is None:
            most = multihost.agree_on_max(count_here) if self.collective else count_here
            if most == 0:
                return 0, []
            rows = padded(most, self.row_multiple)
            while len(self.rows_here(rows)) < most:  # processes hold equal numbers of rows
                rows += self.row_multiple
            return rows, [self.rows_here(rows)[:count_here]]
        rows, mine = self.chunk_rows(max_batch_size)
        if count_here and not mine:
            raise ValueError(f"{count_here} requests on a process that holds no row of a "
                             f"max_batch_size={max_batch_size} call")
        calls = math.ceil(count_here / len(mine)) if mine else 0
        calls = multihost.agree_on_max(calls) if self.collective else calls
        return rows, [mine[: max(0, min(len(mine), count_here - c * len(mine)))] for c in range(calls)]

    def put(self, local: np.ndarray, rows: int):
        """The call's global array whose rows on this process's devices are `local` (rows
        `rows_here(rows)`, in order); numpy as it is without a mesh."""
        if self.mesh is None:
            return local
        sharding = parallel.batch_sharding(self.mesh, np.ndim(local))
        return multihost.global_from_local_rows(local, sharding, rows)

    def read(self, array) -> dict[int, np.ndarray]:
        """This process's rows of a call's output, by global row index (no collective)."""
        if not isinstance(array, jax.Array):
            return dict(enumerate(np.asarray(array)))
        return multihost.rows_by_index(array)
