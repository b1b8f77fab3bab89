"""Which process plays which evaluation users, and which rows of a sampler call it fills
(rlpa_jax/eval/shares.py), for processes simulated by their row maps; the share through a
baseline wrapper, and a wrapper's calls with no conversation."""

from __future__ import annotations

import pytest

from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.eval import shares
from rlpa_jax.eval.baselines import BASELINES, make_baseline
from rlpa_jax.eval.policies import PolicyTurn
from rlpa_jax.eval.shares import contiguous_share, conversation_share


def test_contiguous_blocks_cover_every_user_once():
    assert [contiguous_share(3, p, 2) for p in range(2)] == [[0, 1], [2]]
    assert [contiguous_share(5, p, 3) for p in range(3)] == [[0, 1], [2, 3], [4]]
    assert [contiguous_share(1, p, 2) for p in range(2)] == [[0], []]


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
