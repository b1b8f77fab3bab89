"""Simulated users, chosen by `user.kind` in the config.

USER_SIMULATORS maps each kind to a function of the config's `user` section that returns a
UserSimulator; a new kind is one new entry (a new host-side user subclasses
users.base.StatefulUser and writes reply()). The shared state and interface live in
users/base.py, the scripted user in users/scripted.py, the LLM user in users/llm.py.
"""

from __future__ import annotations

from typing import Callable

from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import UserConfig
from rlpa_jax.dialogue.llm.client import client_from_section
from rlpa_jax.dialogue.users.base import (
    OPENING_MESSAGE,
    UserSimulator,
    UserState,
    revealed_items,
    user_state_from_json,
    user_state_to_json,
)
from rlpa_jax.dialogue.users.llm import LLMUser
from rlpa_jax.dialogue.users.scripted import ScriptedUser


def scripted_user(section: UserConfig) -> UserSimulator:
    return ScriptedUser()


def llm_user(section: UserConfig) -> UserSimulator:
    # A user's turn is a few sentences: 160 tokens, unless user.llm (or llm) sets max_tokens.
    max_tokens = None if section.llm.max_tokens is not None else 160
    return LLMUser(client_from_section(section.llm, "user.llm"), prompt_name=section.prompt, max_tokens=max_tokens)


USER_SIMULATORS: dict[str, Callable[[UserConfig], UserSimulator]] = {
    "scripted": scripted_user,
    "llm": llm_user,
}


def build_user(section: UserConfig) -> UserSimulator:
    """The simulated user that `section.kind` names in USER_SIMULATORS."""
    if section.kind not in USER_SIMULATORS:
        raise ConfigError(
            f"user.kind={section.kind!r} is not a simulated user kind; expected one of {sorted(USER_SIMULATORS)}"
        )
    return USER_SIMULATORS[section.kind](section)


__all__ = [
    "OPENING_MESSAGE",
    "USER_SIMULATORS",
    "UserSimulator",
    "UserState",
    "build_user",
    "revealed_items",
    "user_state_from_json",
    "user_state_to_json",
]
