"""The strict <profile>/<response> turn format, prompt rendering, and prompt files."""

from __future__ import annotations

import json

import pytest

from rlpa_jax.dialogue.chat import (
    PROMPTS_DIR,
    Message,
    ParsedTurn,
    assistant_message,
    format_turn,
    load_prompt,
    parse_turn,
    render_messages,
)
from rlpa_jax.dialogue.profile import ProfileItem

WELL_FORMED = """<profile>
- Occupation: graphic designer
- Interests: hiking, yoga
</profile>

<response>
Nice! Which trail did you do last?
</response>"""

MALFORMED = ParsedTurn(profile=None, response=None, well_formed=False)


def test_well_formed_turn_parses_profile_items_and_reply() -> None:
    parsed = parse_turn(WELL_FORMED)
    assert parsed.well_formed
    assert parsed.profile == [
        ProfileItem("Occupation", "graphic designer"),
        ProfileItem("Interests", "hiking"),
        ProfileItem("Interests", "yoga"),
    ]
    assert parsed.response == "Nice! Which trail did you do last?"


def test_surrounding_and_separating_whitespace_is_tolerated() -> None:
    compact = WELL_FORMED.replace("</profile>\n\n<response>", "</profile><response>")
    assert parse_turn(f"\n\n  {WELL_FORMED}\n \t") == parse_turn(WELL_FORMED) == parse_turn(compact)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(WELL_FORMED.replace("<profile>", ""), id="missing-profile-open"),
        pytest.param(WELL_FORMED.replace("</profile>", ""), id="unclosed-profile"),
        pytest.param(WELL_FORMED.replace("</response>", ""), id="unclosed-response"),
        pytest.param(WELL_FORMED.split("<response>")[0], id="no-response-block"),
        pytest.param("<response>\nHi there!\n</response>", id="no-profile-block"),
        pytest.param("Nice! Which trail did you do last?", id="plain-text"),
        pytest.param("Sure.\n" + WELL_FORMED, id="text-before"),
        pytest.param(WELL_FORMED + "\nAnything else?", id="text-after"),
        pytest.param(WELL_FORMED.replace("</profile>\n\n", "</profile>\nOK.\n"), id="text-between"),
        pytest.param(
            "<response>\nHi!\n</response>\n\n<profile>\n- Age: 30\n</profile>", id="reversed-order"
        ),
        pytest.param(WELL_FORMED + "\n<response>\nagain\n</response>", id="duplicated-response"),
        pytest.param("<profile>\n- Age: 30\n</profile>\n" + WELL_FORMED, id="duplicated-profile"),
        pytest.param("<profile>\n- Age: 30\n</profile>\n<response>\n   \n</response>", id="empty-response"),
        pytest.param("<profile>\n<response>\nHi\n</response>\n</profile>", id="nested"),
        pytest.param(WELL_FORMED.replace("<profile>", "<Profile>").replace("</profile>", "</Profile>"), id="tag-case"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_turns(text: str) -> None:
    assert parse_turn(text) == MALFORMED


def test_empty_profile_block_is_well_formed_with_no_items() -> None:
    parsed = parse_turn("<profile>\n</profile>\n\n<response>\nHi! How was your day?\n</response>")
    assert parsed == ParsedTurn(profile=[], response="Hi! How was your day?", well_formed=True)


def test_profile_block_with_only_prose_is_well_formed_with_no_items() -> None:
    parsed = parse_turn("<profile>\nNothing known yet.\n</profile>\n<response>\nHello!\n</response>")
    assert parsed.well_formed and parsed.profile == [] and parsed.response == "Hello!"


def test_json_slot_template_inside_the_profile_block() -> None:
    template = json.dumps({"Age": "34", "Interests": ["hiking", "yoga"], "Location": None}, indent=2)
    parsed = parse_turn(f"<profile>\n{template}\n</profile>\n\n<response>\nHow long have you hiked?\n</response>")
    assert parsed.well_formed
    assert parsed.profile == [
        ProfileItem("Age", "34"),
        ProfileItem("Interests", "hiking"),
        ProfileItem("Interests", "yoga"),
    ]


def test_format_turn_round_trips_and_writes_the_canonical_shape() -> None:
    profile = [ProfileItem("Age", "34"), ProfileItem("Interests", "hiking")]
    text = format_turn(profile, "  Which trail?  ")
    assert text == "<profile>\n- Age: 34\n- Interests: hiking\n</profile>\n\n<response>\nWhich trail?\n</response>"
    assert parse_turn(text) == ParsedTurn(profile=profile, response="Which trail?", well_formed=True)
    assert parse_turn(format_turn([], "Hi")) == ParsedTurn(profile=[], response="Hi", well_formed=True)


def conversation() -> list[Message]:
    return [
        Message("user", "Hi, I just got back from a hike."),
        assistant_message([ProfileItem("Interests", "hiking")], "Welcome back! Where did you go?"),
        Message("user", "Mount Si. I'm a nurse, so I hike on my days off."),
        assistant_message(
            [ProfileItem("Interests", "hiking"), ProfileItem("Occupation", "nurse")],
            "Mount Si is a great climb. Do you go alone?",
        ),
        Message("user", "Usually with my dog."),
    ]


def test_render_keeps_only_the_latest_assistant_profile() -> None:
    rendered = render_messages("SYSTEM", conversation())
    assert [message["role"] for message in rendered] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert rendered[0] == {"role": "system", "content": "SYSTEM"}
    assert rendered[2]["content"] == "Welcome back! Where did you go?"
    latest = rendered[4]["content"]
    assert latest == (
        "<profile>\n- Interests: hiking\n- Occupation: nurse\n</profile>\n\n"
        "<response>\nMount Si is a great climb. Do you go alone?\n</response>"
    )
    assert parse_turn(latest).well_formed
    assert sum("<profile>" in message["content"] for message in rendered) == 1
    assert rendered[5] == {"role": "user", "content": "Usually with my dog."}


def test_render_when_the_history_ends_with_the_assistant_and_without_assistants() -> None:
    history = conversation()[:4]
    rendered = render_messages("S", history)
    assert rendered[-1]["content"].startswith("<profile>\n- Interests: hiking\n- Occupation: nurse")
    assert render_messages("S", conversation()[:1]) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi, I just got back from a hike."},
    ]


def test_latest_assistant_with_empty_profile_and_without_profile_text() -> None:
    history = [Message("user", "hi"), assistant_message([], "Hello!"), Message("user", "how are you?")]
    assert render_messages("S", history)[2]["content"] == "<profile>\n</profile>\n\n<response>\nHello!\n</response>"
    history[1] = Message("assistant", "Hello!")
    assert render_messages("S", history)[2]["content"] == "Hello!"


def test_render_rejects_unknown_roles_naming_the_index() -> None:
    with pytest.raises(ValueError, match=r"history\[1\]\.role is 'system'"):
        render_messages("S", [Message("user", "hi"), Message("system", "psst")])


def test_policy_system_prompt_shows_the_two_block_format() -> None:
    prompt = load_prompt("policy_system")
    for tag in ("<profile>", "</profile>", "<response>", "</response>"):
        assert prompt.count(tag) == 1
    assert prompt.index("</profile>") < prompt.index("<response>")
    assert prompt == prompt.strip()


def test_missing_prompt_error_names_the_path_and_the_available_prompts() -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_prompt("no_such_prompt")
    message = str(error.value)
    assert str(PROMPTS_DIR / "no_such_prompt.txt") in message
    assert "policy_system" in message and "profile_extraction" in message


def test_prompt_names_cannot_leave_the_prompts_directory() -> None:
    with pytest.raises(FileNotFoundError):
        load_prompt("../prompts/policy_system")
