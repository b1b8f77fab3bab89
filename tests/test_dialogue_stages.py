"""The kind tables for simulated users and judges: every kind builds from its config section,
an unknown kind fails naming the key and the valid kinds, a new simulated user is one class plus
one table entry, and the item-matching judge interface is declared where rl relies on it."""

from __future__ import annotations

import asyncio
from typing import Sequence

import pytest
from openai_server import OpenAIServer

from rlpa_jax.config.llm_sections import LLMRoleSection, LLMSection
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import JudgeConfig, UserConfig
from rlpa_jax.dialogue import judges, users
from rlpa_jax.dialogue.chat import Message
from rlpa_jax.dialogue.judges import JUDGES, ItemMatchingJudge, build_judges
from rlpa_jax.dialogue.judges.llm import LLMProfileJudge, LLMResponseJudge
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.users import (
    OPENING_MESSAGE,
    USER_SIMULATORS,
    UserSimulator,
    UserState,
    build_user,
    revealed_items,
)
from rlpa_jax.dialogue.users.base import StatefulUser
from rlpa_jax.dialogue.users.llm import LLMUser
from rlpa_jax.dialogue.users.scripted import ScriptedUser
from rlpa_jax.rl.environment import start_conversations


def run(coroutine):
    return asyncio.run(coroutine)


def test_every_user_kind_builds_from_its_section():
    assert sorted(USER_SIMULATORS) == ["llm", "scripted"]
    assert type(build_user(UserConfig(kind="scripted"))) is ScriptedUser
    section = UserConfig(kind="llm", llm=LLMSection(base_url="http://127.0.0.1:9/v1", model="user-sim", timeout_s=7.0))
    user = build_user(section)
    assert type(user) is LLMUser and isinstance(user, UserSimulator)
    assert (user.client.config.base_url, user.client.config.model, user.client.config.timeout_s) == (
        "http://127.0.0.1:9/v1", "user-sim", 7.0)


def test_every_judge_kind_builds_from_its_section():
    assert sorted(JUDGES) == ["embedded", "llm"]
    profile_judge, response_judge = build_judges(JudgeConfig(kind="embedded"))
    assert type(profile_judge) is EmbeddedProfileJudge and type(response_judge) is EmbeddedResponseJudge
    shared = LLMSection(base_url="http://127.0.0.1:9/v1", model="judge", max_retries=1, rpm=600)
    profile_judge, response_judge = build_judges(JudgeConfig(kind="llm", llm=shared))
    assert type(profile_judge) is LLMProfileJudge and type(response_judge) is LLMResponseJudge
    # A client per role (its own metrics); one endpoint, so one rate limiter between them.
    assert profile_judge.client is not response_judge.client
    assert profile_judge.client.limiter is response_judge.client.limiter
    assert (profile_judge.client.config.model, profile_judge.client.config.max_retries) == ("judge", 1)


def test_each_judge_may_have_its_own_endpoint_and_inherits_the_rest():
    section = JudgeConfig(kind="llm", llm=LLMSection(base_url="http://127.0.0.1:9/v1", model="judge", timeout_s=9.0),
                          profile=LLMRoleSection(LLMSection(base_url="http://127.0.0.1:10/v1", rpm=60)),
                          response=LLMRoleSection(LLMSection(model="strict-judge")))
    profile_judge, response_judge = build_judges(section)
    profile, response = profile_judge.client.config, response_judge.client.config
    assert (profile.base_url, profile.model, profile.timeout_s, profile.rpm) == ("http://127.0.0.1:10/v1", "judge", 9.0, 60)
    assert (response.base_url, response.model, response.timeout_s, response.rpm) == (
        "http://127.0.0.1:9/v1", "strict-judge", 9.0, None)
    assert profile_judge.client.limiter is not response_judge.client.limiter  # two endpoints, two budgets
    with pytest.raises(ConfigError, match=r"judges\.profile\.llm: no base_url"):
        build_judges(JudgeConfig(kind="llm", llm=LLMSection(model="judge")))


def test_llm_kinds_talk_to_the_configured_endpoint():
    def handler(request: dict) -> str:
        return "\\boxed{1}" if request["model"] == "judge" else "I'm a nurse."

    with OpenAIServer(handler) as server:
        def section(model: str) -> LLMSection:
            return LLMSection(base_url=server.base_url, model=model, max_retries=0, timeout_s=60.0)  # a hang guard

        user = build_user(UserConfig(kind="llm", llm=section("user-sim")))
        profile_judge, _ = build_judges(JudgeConfig(kind="llm", llm=section("judge")))
        [persona] = synthetic_personas(1, seed=0)

        async def talk_and_judge():
            try:
                state = user.start(persona, seed=0)
                history = [Message("user", OPENING_MESSAGE), Message("assistant", "Hi! What do you do?")]
                replies = await user.respond([state], [history])
                counts = await profile_judge.count_matches([([ProfileItem("Occupation", "nurse")], persona.items)])
                return replies, counts
            finally:
                await user.client.aclose()
                await profile_judge.client.aclose()

        assert run(talk_and_judge()) == (["I'm a nurse."], [1])
    assert [request["model"] for request in server.requests] == ["user-sim", "judge"]


def test_an_unknown_kind_names_the_key_the_value_and_the_valid_kinds():
    with pytest.raises(ConfigError, match=r"user\.kind='telepathic'.*\['llm', 'scripted'\]"):
        build_user(UserConfig(kind="telepathic"))
    with pytest.raises(ConfigError, match=r"judges\.kind='oracle'.*\['embedded', 'llm'\]"):
        build_judges(JudgeConfig(kind="oracle"))
    config = load_config(overrides=["user.kind=telepathic"])  # the config itself accepts any kind name
    with pytest.raises(ConfigError, match=r"user\.kind='telepathic'"):
        build_user(config.user)


class InOrderUser(StatefulUser):
    """A new simulated user: reveals its items one per message, in the persona's order."""

    def reply(self, state: UserState, history: Sequence[Message]) -> str:
        opening = self.opening_if_cold_start(state, history)
        if opening is not None:
            return opening
        state.turn += 1
        index = len(state.revealed)
        if index == len(state.persona.items):
            return "That's all about me."
        state.revealed.add(index)
        item = state.persona.items[index]
        return f"My {item.slot.lower()} is {item.value}."


def test_a_new_user_is_one_class_and_one_table_entry(monkeypatch):
    monkeypatch.setitem(USER_SIMULATORS, "in_order", lambda section: InOrderUser())
    user = build_user(load_config(overrides=["user.kind=in_order"]).user)
    assert type(user) is InOrderUser and isinstance(user, UserSimulator)

    personas = synthetic_personas(2, seed=3)
    conversations = start_conversations(personas, user, seeds=[11, 12])
    for _ in range(3):
        for conversation in conversations:
            conversation.history.append(Message("assistant", "Tell me more about you?"))
        replies = run(user.respond([c.user for c in conversations], [c.history for c in conversations]))
        for conversation, reply in zip(conversations, replies):
            conversation.history.append(Message("user", reply))

    for conversation, persona in zip(conversations, personas):
        user_messages = [m.content for m in conversation.history if m.role == "user"]
        assert user_messages[0] == OPENING_MESSAGE
        assert user_messages[1:] == [f"My {item.slot.lower()} is {item.value}." for item in persona.items[:3]]
        assert revealed_items(conversation.user) == list(persona.items[:3])
        assert conversation.user.turn == 4


def test_the_embedded_profile_judge_declares_item_matching_and_the_llm_judge_does_not():
    client = LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="judge"))
    embedded = EmbeddedProfileJudge()
    assert isinstance(embedded, ItemMatchingJudge)
    assert not isinstance(LLMProfileJudge(client), ItemMatchingJudge)
    true = [ProfileItem("Occupation", "nurse"), ProfileItem("Location", "Seattle")]
    inferred = [ProfileItem("Location", "Denver"), ProfileItem("Job", "registered nurse")]
    assert run(embedded.match_items([(inferred, true)])) == [frozenset({1})]
    assert run(embedded.count_matches([(inferred, true)])) == [1]


def test_the_packages_export_the_interfaces_and_tables():
    assert {"JUDGES", "build_judges", "ProfileJudge", "ResponseJudge", "ItemMatchingJudge"} <= set(judges.__all__)
    assert {"USER_SIMULATORS", "build_user", "UserSimulator", "UserState"} <= set(users.__all__)
