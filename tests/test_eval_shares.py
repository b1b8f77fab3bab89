"""Which process plays which evaluation users, and which rows of a sampler call it fills
(rlpa_jax/eval/shares.py), for processes simulated by their row maps; the share through a
baseline wrapper, and a wrapper's calls with no conversation."""

from __future__ import annotations

import numpy as np
import pytest

from rlpa_jax.dialogue.llm.client import run_sync
from rlpa_jax.eval import shares
from rlpa_jax.eval.baselines import BASELINES, make_baseline
from rlpa_jax.eval.policies import PolicyTurn
from rlpa_jax.eval.shares import RowShare, contiguous_share, conversation_share


def rows_of(process: int, processes: int = 2):
    """A batch split evenly over processes in order, as a mesh of equal hosts splits its rows."""
    return lambda rows: np.arange(process * rows // processes, (process + 1) * rows // processes)


def test_contiguous_blocks_cover_every_user_once():
    assert [contiguous_share(3, p, 2) for p in range(2)] == [[0, 1], [2]]
    assert [contiguous_share(5, p, 3) for p in range(3)] == [[0, 1], [2, 3], [4]]
    assert [contiguous_share(1, p, 2) for p in range(2)] == [[0], []]


@pytest.mark.parametrize("max_batch_size, count, expected", [
    (None, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (None, 6, [[0, 1, 2, 3], [4, 5]]),  # rows 6, 7 of the 8-row call are padding
    (None, 3, [[0, 1, 2], []]),  # one 8-row call: process 1's rows are all padding
    (None, 10, [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]),  # a 16-row call
    (6, 8, [[0, 1, 2, 3, 6, 7], [4, 5]]),  # calls of users 0-5 and 6-7, 8 rows each
    (2, 5, [[0, 1, 2, 3, 4], []]),
])
def test_each_user_is_played_where_its_row_lives(max_batch_size, count, expected):
    got = [RowShare(rows_of(p), 8, max_batch_size).conversations(count) for p in range(2)]
    assert got == expected
    assert sorted(got[0] + got[1]) == list(range(count))


def test_one_process_fills_rows_as_its_sampler_calls_are_cut(monkeypatch):
    alone = RowShare(lambda rows: np.arange(rows), 8, None)
    assert alone.calls(3) == (8, [[0, 1, 2]]) and alone.calls(9) == (16, [list(range(9))])
    assert alone.calls(0) == (0, [])  # no call when no process has a prompt
    assert RowShare(lambda rows: np.arange(rows), 8, 4).calls(10) == (8, [[0, 1, 2, 3]] * 2 + [[0, 1]])


def test_a_process_with_fewer_prompts_still_makes_every_call(monkeypatch):
    # Process 1 of 2 with max_batch_size 6 holds rows 4, 5 of each call; process 0 needs 2 calls.
    monkeypatch.setattr(shares.multihost, "agree_on_max", lambda mine: max(mine, 2))
    share = RowShare(rows_of(1), 8, 6)
    assert share.calls(2) == (8, [[4, 5], []])
    assert share.calls(0) == (8, [[], []])
    # Without max_batch_size the call is as large as the busiest process needs (4 rows each here).
    monkeypatch.setattr(shares.multihost, "agree_on_max", lambda mine: max(mine, 4))
    assert RowShare(rows_of(1), 8, None).calls(1) == (8, [[4]])
    with pytest.raises(ValueError, match="holds no row"):
        RowShare(rows_of(1), 8, 2).calls(1)


class SharedBase:
    """A promptable base policy with its own share (as JaxPolicy's rows give it), recording the
    batches it is asked for."""

    def __init__(self, batches=None, system_prompt="Be kind."):
        self.name, self.system_prompt = "base", system_prompt
        self.batches = [] if batches is None else batches

    def share(self, count):
        return [i for i in range(count) if i % 2]

    def with_system_prompt(self, system_prompt, name=None):
        return SharedBase(self.batches, system_prompt)

    async def respond(self, histories):
        return await self.respond_with_system_prompts(histories, [self.system_prompt] * len(histories))

    async def respond_with_system_prompts(self, histories, system_prompts):
        self.batches.append(len(histories))
        return [PolicyTurn(text="Revised reply: hi", response="Revised reply: hi", profile=None) for _ in histories]


@pytest.mark.parametrize("kind", list(BASELINES))
def test_a_baseline_plays_its_bases_share_and_calls_it_with_an_empty_batch(kind):
    base = SharedBase()
    policy = make_baseline(kind, base)
    assert conversation_share(policy, 5) == [1, 3]  # found through the wrapper's `base`
    assert run_sync(policy.respond([])) == []
    # Our model's sampler calls are collectives: a process with no conversation still makes each
    # of them (self_critic: the draft and the revision).
    assert base.batches == ([0, 0] if kind == "self_critic" else [0])


def test_a_policy_without_a_share_plays_a_contiguous_block(monkeypatch):
    class Api:
        name = "api"
    assert conversation_share(Api(), 5) == [0, 1, 2, 3, 4]  # one process: everyone
    monkeypatch.setattr(shares.multihost, "process_count", lambda: 2)
    monkeypatch.setattr(shares.multihost, "process_index", lambda: 1)
    assert conversation_share(Api(), 5) == [3, 4]
