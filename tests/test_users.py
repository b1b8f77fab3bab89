"""Simulated users: the scripted user's reveal budget, relatedness, determinism, profile switch,
long runs and call-outs; the LLM user's flipped roles, visible-reply-only view and failures
(against a real OpenAI-compatible HTTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import re

import pytest
from openai_server import OpenAIServer, Reply

from rlpa_jax.dialogue.chat import Message, format_turn
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.matching import canonical_slot
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.profile import ProfileItem, normalize_text
from rlpa_jax.dialogue.text import sentences
from rlpa_jax.dialogue.users import OPENING_MESSAGE, UserSimulator, UserState, revealed_items
from rlpa_jax.dialogue.users.llm import LLMUser, clean_user_reply
from rlpa_jax.dialogue.users.scripted import ScriptedUser, reveal_budget

NURSE = Persona(
    persona_id="nurse",
    profile_text="Maya is a 34-year-old nurse in Seattle who hikes and makes pottery.",
    personality_text="Warm and direct, with a dry sense of humour.",
    items=(
        ProfileItem("Age", "34"),
        ProfileItem("Gender", "female"),
        ProfileItem("Occupation", "nurse"),
        ProfileItem("Interests", "hiking"),
        ProfileItem("Interests", "pottery"),
        ProfileItem("Location", "Seattle"),
        ProfileItem("Marital Status", "married"),
        ProfileItem("Education Background", "bachelor's degree in nursing"),
        ProfileItem("Family Background", "two younger brothers"),
        ProfileItem("Personality Traits", "outgoing"),
        ProfileItem("Other Information", "allergic to cats"),
    ),
)
CHEF = Persona(
    persona_id="chef",
    profile_text="Sam is a 34-year-old chef in Chicago who loves jazz.",
    personality_text="Calm and precise.",
    items=(
        ProfileItem("Age", "34"),
        ProfileItem("Gender", "female"),
        ProfileItem("Occupation", "chef"),
        ProfileItem("Interests", "jazz"),
        ProfileItem("Location", "Chicago"),
    ),
)
TINY = Persona("tiny", "Lee teaches.", "", (ProfileItem("Occupation", "teacher"), ProfileItem("Pet", "a beagle")))

QUESTION_FOR_SLOT = {
    "Age": "How old are you, if you don't mind me asking?",
    "Gender": "How would you describe your gender?",
    "Occupation": "What do you do for work?",
    "Interests": "What hobbies do you have?",
    "Location": "Which city do you live in?",
    "Marital Status": "Are you married or single?",
    "Education Background": "Where did you go to school?",
    "Family Background": "Tell me about your family!",
    "Personality Traits": "How would you describe your personality?",
    "Other Information": "Any other information about you I should know?",
}
# Mentions nearly every slot at once: the strongest pull to over-share.
EVERYTHING_QUESTION = (
    "Tell me everything: your job, hobbies, age, family, where you live, your school, "
    "your personality, whether you're married, and any other information!"
)
VARIED_REPLIES = (
    "Hi! What do you do for work?",
    "That sounds busy. What do you like to do on weekends?",
    "Where do you live these days?",
    "Do you have a big family?",
    "What did you study at college?",
    "How would you describe your personality?",
    "Are you in a relationship?",
    "Is there anything else you'd like me to know?",
    "How old are you?",
)


def run(coroutine):
    return asyncio.run(coroutine)


def user_says(user: ScriptedUser, state: UserState, history: list[Message]) -> str:
    reply = run(user.respond([state], [history]))[0]
    assert isinstance(reply, str)
    history.append(Message("user", reply))
    return reply


def item_keys(items) -> set[tuple[str, str]]:
    return {(canonical_slot(item.slot), normalize_text(item.value)) for item in items}


def play(user: ScriptedUser, state: UserState, assistant_replies, turns: int) -> tuple[list[str], list[set]]:
    """Alternate user and assistant for `turns` user messages; returns the messages and, for each,
    the keys of the items revealed by that message."""
    history: list[Message] = []
    messages, new_per_turn = [], []
    for turn in range(turns):
        before = item_keys(revealed_items(state))
        messages.append(user_says(user, state, history))
        new_per_turn.append(item_keys(revealed_items(state)) - before)
        history.append(Message("assistant", assistant_replies[turn % len(assistant_replies)]))
    return messages, new_per_turn


# ---------------------------------------------------------------------------------- scripted


def test_scripted_user_satisfies_the_protocol_and_opens_cold():
    user = ScriptedUser()
    assert isinstance(user, UserSimulator)
    state = user.start(NURSE, seed=0)
    assert run(user.respond([state], [[]])) == [OPENING_MESSAGE]
    assert state.turn == 1 and state.revealed == set()


def test_reveal_budget_is_ceil_of_fifteen_percent():
    assert [reveal_budget(n) for n in (0, 1, 6, 7, 11, 20, 21)] == [1, 1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("persona", [NURSE, CHEF, TINY], ids=lambda persona: persona.persona_id)
def test_scripted_user_never_exceeds_its_reveal_budget(seed, persona):
    user = ScriptedUser(unprompted_reveal_probability=1.0)
    state = user.start(persona, seed=seed)
    budget = reveal_budget(len(persona.items))
    messages, new_per_turn = play(user, state, [EVERYTHING_QUESTION], turns=30)
    assert max(len(new) for new in new_per_turn) <= budget
    assert any(len(new) == budget for new in new_per_turn)  # the pull to over-share is real
    assert all(len(sentences(message)) <= 3 for message in messages)
    assert item_keys(revealed_items(state)) == item_keys(persona.items)


def test_scripted_user_reveals_what_the_assistant_asks_about():
    user = ScriptedUser(unprompted_reveal_probability=0.0, acknowledgement_probability=0.0)
    state = user.start(NURSE, seed=11)
    history: list[Message] = []
    user_says(user, state, history)
    history.append(Message("assistant", "Nice to meet you! What do you do for work?"))
    reply = user_says(user, state, history)
    assert revealed_items(state) == [ProfileItem("Occupation", "nurse")]
    assert "nurse" in reply


def test_scripted_user_reveals_everything_when_asked_about_each_slot():
    user = ScriptedUser(unprompted_reveal_probability=0.0)
    state = user.start(NURSE, seed=5)
    history: list[Message] = []
    user_says(user, state, history)
    for item in NURSE.items:
        if item in revealed_items(state):
            continue
        history.append(Message("assistant", QUESTION_FOR_SLOT[item.slot]))
        reply = user_says(user, state, history)
        assert item in revealed_items(state), (item, reply)
        if item.slot != "Gender":  # "female" is said as "I'm a woman."
            assert item.value.lower() in reply.lower()
    assert set(revealed_items(state)) == set(NURSE.items)


def test_scripted_user_without_related_questions_keeps_quiet_when_told_to():
    user = ScriptedUser(unprompted_reveal_probability=0.0)
    state = user.start(NURSE, seed=2)
    messages, _ = play(user, state, ["I see. Could you say a little more?"], turns=6)
    assert revealed_items(state) == []
    assert all(message for message in messages)


def transcript(seed: int, persona: Persona = NURSE) -> list[str]:
    user = ScriptedUser()
    state = user.start(persona, seed=seed)
    messages, _ = play(user, state, VARIED_REPLIES, turns=15)
    return messages


def test_scripted_user_is_deterministic_under_a_seed():
    assert transcript(7) == transcript(7)
    assert len({tuple(transcript(seed)) for seed in range(5)}) > 1


def test_scripted_user_switches_profile_at_switch_turn():
    user = ScriptedUser(unprompted_reveal_probability=1.0)
    state = user.start(NURSE, seed=3, switch_turn=4, switch_persona=CHEF)
    messages, new_per_turn = play(user, state, VARIED_REPLIES, turns=14)
    assert all("Actually" not in message for message in messages[:4])
    assert "Actually, I've switched jobs" in messages[4] and "chef" in messages[4]
    assert state.switched and state.persona is CHEF
    assert set(revealed_items(state)) <= set(CHEF.items)
    nurse_only = {item.value.lower() for item in NURSE.items} - {item.value.lower() for item in CHEF.items}
    for message in messages[4:]:
        assert not any(re.search(r"\b" + re.escape(value) + r"\b", message.lower()) for value in nurse_only)
    assert max(len(new) for new in new_per_turn[:4]) <= reveal_budget(len(NURSE.items))
    assert max(len(new) for new in new_per_turn[4:]) <= reveal_budget(len(CHEF.items))
    assert set(revealed_items(state)) == set(CHEF.items)


def test_scripted_user_runs_seventy_turns():
    user = ScriptedUser()
    state = user.start(NURSE, seed=21, switch_turn=40, switch_persona=CHEF)
    messages, new_per_turn = play(user, state, VARIED_REPLIES, turns=72)
    assert state.turn == 72
    assert all(isinstance(message, str) and message.strip() for message in messages)
    assert all(1 <= len(sentences(message)) <= 3 for message in messages)
    assert set(revealed_items(state)) == set(CHEF.items)
    assert all(not new for new in new_per_turn[-10:])  # everything told: chat goes on without new facts


def test_scripted_user_calls_out_repetition_and_flattery():
    user = ScriptedUser(unprompted_reveal_probability=0.0)
    state = user.start(NURSE, seed=4)
    history: list[Message] = []
    user_says(user, state, history)
    history.append(Message("assistant", "Nice to meet you. How is your week going so far?"))
    first = user_says(user, state, history)
    assert not re.search(r"repeat|already said|flatter|praise|butter", first, re.IGNORECASE)
    history.append(Message("assistant", "Nice to meet you. How is your week going so far?"))
    repeated = user_says(user, state, history)
    assert re.search(r"repeat|already said|just say that", repeated, re.IGNORECASE)
    history.append(Message("assistant", "You are amazing, wonderful and truly incredible, a fantastic person!"))
    flattered = user_says(user, state, history)
    assert re.search(r"flatter|praise|butter", flattered, re.IGNORECASE)


def test_scripted_user_sees_only_the_response_block():
    user = ScriptedUser(unprompted_reveal_probability=0.0)
    state = user.start(NURSE, seed=9)
    history: list[Message] = []
    user_says(user, state, history)
    # The profile block talks about work; the visible reply does not, so nothing work-related is told.
    history.append(
        Message("assistant", format_turn([ProfileItem("Occupation", "job work career")], "Hmm, okay."))
    )
    user_says(user, state, history)
    assert revealed_items(state) == []


def test_start_rejects_a_half_specified_switch():
    user = ScriptedUser()
    with pytest.raises(ValueError, match="switch_turn"):
        user.start(NURSE, seed=0, switch_turn=3)
    with pytest.raises(ValueError, match="switch_turn must be >= 1"):
        user.start(NURSE, seed=0, switch_turn=0, switch_persona=CHEF)


def test_synthetic_personas_work_with_the_scripted_user():
    from rlpa_jax.dialogue.personas import synthetic_personas

    personas = synthetic_personas(4, seed=0)
    user = ScriptedUser(unprompted_reveal_probability=1.0)
    for index, persona in enumerate(personas):
        state = user.start(persona, seed=index)
        _, new_per_turn = play(user, state, [EVERYTHING_QUESTION], turns=25)
        assert max(len(new) for new in new_per_turn) <= reveal_budget(len(persona.items))
        assert item_keys(revealed_items(state)) == item_keys(persona.items)


# ---------------------------------------------------------------------------------- LLM user


def llm_client(server: OpenAIServer, max_retries: int = 0) -> LLMClient:
    return LLMClient(
        LLMConfig(base_url=server.base_url, model="user-sim", max_retries=max_retries, backoff_initial_s=0.0,
                  backoff_max_s=0.0, timeout_s=60.0)  # timeout_s: a hang guard
    )


async def respond_and_close(user: LLMUser, client: LLMClient, states, histories):
    try:
        return await user.respond(states, histories)
    finally:
        await client.aclose()


def test_llm_user_flips_roles_and_shows_only_the_response_text():
    with OpenAIServer(lambda request: "Sure. I'm a nurse in Seattle.") as server:
        client = llm_client(server)
        user = LLMUser(client)
        state = user.start(NURSE, seed=0)
        history = [
            Message("user", "Hello"),
            Message("assistant", "Hi! What do you do?", profile_text="- Occupation: SECRET-PROFILE-GUESS"),
            Message("user", "Mostly long shifts."),
            Message(
                "assistant",
                format_turn([ProfileItem("Occupation", "SECRET-PROFILE-GUESS")], "Long shifts where?"),
                profile_text="- Occupation: SECRET-PROFILE-GUESS",
            ),
        ]
        [reply] = run(respond_and_close(user, client, [state], [history]))
        assert reply == "Sure. I'm a nurse in Seattle."
        [request] = server.requests
    messages = request["messages"]
    assert [message["role"] for message in messages] == ["system", "assistant", "user", "assistant", "user"]
    assert [message["content"] for message in messages[1:]] == [
        "Hello",
        "Hi! What do you do?",
        "Mostly long shifts.",
        "Long shifts where?",
    ]
    assert NURSE.profile_text in messages[0]["content"] and NURSE.personality_text in messages[0]["content"]
    assert "SECRET-PROFILE-GUESS" not in str(messages) and "<profile>" not in str(messages)
    assert "change" not in messages[0]["content"].lower()  # the change note only after a switch
    assert state.turn == 3
    locations = [index for index, item in enumerate(NURSE.items) if item.slot in ("Occupation", "Location")]
    assert state.revealed == set(locations)  # read back from what the model said


def test_llm_user_batches_conversations_and_marks_failures_none():
    def handler(request: dict) -> Reply:
        last = request["messages"][-1]["content"]
        if "FAIL" in last:
            return Reply(status=500)
        return Reply(content=f"Reply to: {last}")

    with OpenAIServer(handler) as server:
        client = llm_client(server)
        user = LLMUser(client)
        states = [user.start(NURSE, seed=seed) for seed in range(4)]
        histories = [
            [],
            [Message("user", "Hello"), Message("assistant", "What do you do?")],
            [Message("user", "Hello"), Message("assistant", "FAIL please")],
            [Message("user", "Hello"), Message("assistant", "Where do you live?")],
        ]
        replies = run(respond_and_close(user, client, states, histories))
        assert len(server.requests) == 3  # the cold start needs no request
    assert replies == [OPENING_MESSAGE, "Reply to: What do you do?", None, "Reply to: Where do you live?"]
    assert [state.turn for state in states] == [1, 2, 1, 2]  # the failed one sent nothing new
    assert user.failures == 1


def test_llm_user_empty_output_is_a_failure():
    with OpenAIServer(lambda request: '  "  "  ') as server:
        client = llm_client(server)
        user = LLMUser(client)
        state = user.start(NURSE, seed=0)
        history = [Message("user", "Hello"), Message("assistant", "How are you?")]
        assert run(respond_and_close(user, client, [state], [history])) == [None]


def test_llm_user_switch_uses_the_new_persona_and_the_change_note():
    with OpenAIServer(lambda request: "Actually, I cook for a living now.") as server:
        client = llm_client(server)
        user = LLMUser(client)
        state = user.start(NURSE, seed=0, switch_turn=1, switch_persona=CHEF)
        history = [Message("user", "Hello"), Message("assistant", "What do you do?")]
        run(respond_and_close(user, client, [state], [history]))
        system = server.requests[0]["messages"][0]["content"]
    assert CHEF.profile_text in system and NURSE.profile_text not in system
    assert "changed" in system.lower()
    assert state.switched and state.persona is CHEF


def test_clean_user_reply_strips_labels_quotes_and_long_answers():
    assert clean_user_reply('User: "I live in Seattle. I hike. I make pots. I have two brothers."') == (
        "I live in Seattle. I hike. I make pots."
    )
    assert clean_user_reply("   ") is None
