"""Profile items: both written formats, slot aliases, deduplication, and the F1 against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlpa_jax.dialogue.profile import (
    SLOTS,
    ProfileItem,
    canonical_slot,
    format_profile,
    normalize_text,
    parse_profile,
    profile_f1,
)


def items(*pairs: tuple[str, str]) -> list[ProfileItem]:
    return [ProfileItem(slot, value) for slot, value in pairs]


def test_line_format_splits_list_slots_only() -> None:
    text = """
- Age: 34
- Occupation: freelance graphic designer
- Interests: hiking, yoga, and painting
- Location: Portland, Oregon
- Personality Traits: curious; open-minded
"""
    assert parse_profile(text) == items(
        ("Age", "34"),
        ("Occupation", "freelance graphic designer"),
        ("Interests", "hiking"),
        ("Interests", "yoga"),
        ("Interests", "painting"),
        ("Location", "Portland, Oregon"),
        ("Personality Traits", "curious"),
        ("Personality Traits", "open-minded"),
    )


def test_json_template_counts_one_item_per_list_element_and_drops_empty_values() -> None:
    template = {
        "Age": 34,
        "Gender": "female",
        "Interests": ["hiking", "yoga", ""],
        "Education Background": None,
        "Personality Traits": ["creative"],
        "Occupation": "unknown",
        "Marital Status": "",
        "Family Background": [],
        "Location": "N/A",
        "Other Information": ["two cats named Pixel and Scribble"],
    }
    assert parse_profile(json.dumps(template)) == items(
        ("Age", "34"),
        ("Gender", "female"),
        ("Interests", "hiking"),
        ("Interests", "yoga"),
        ("Personality Traits", "creative"),
        ("Other Information", "two cats named Pixel and Scribble"),
    )


def test_json_in_a_code_fence_parses_like_bare_json() -> None:
    body = json.dumps({"Occupation": "nurse", "Interests": ["chess"]}, indent=2)
    assert parse_profile(f"```json\n{body}\n```") == parse_profile(body) == items(
        ("Occupation", "nurse"), ("Interests", "chess")
    )


def test_both_formats_count_items_the_same_way() -> None:
    lines = "- Interests: hiking, yoga\n- Other Information: vegan; owns a cat\n- Occupation: nurse"
    template = {"Interests": ["hiking", "yoga"], "Other Information": ["vegan", "owns a cat"], "Occupation": "nurse"}
    assert parse_profile(lines) == parse_profile(json.dumps(template))
    # A comma-separated string inside the template is read like the line format.
    split_string = parse_profile(json.dumps({"Interests": "hiking, yoga"}))
    assert split_string == items(("Interests", "hiking"), ("Interests", "yoga"))


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("Job", "Occupation"),
        ("hobbies", "Interests"),
        ("EDUCATION", "Education Background"),
        ("Family", "Family Background"),
        ("personality", "Personality Traits"),
        ("Others", "Other Information"),
        ("marital_status", "Marital Status"),
        ("  occupation ", "Occupation"),
        ("Pets", "Pets"),
        ("Favorite Food", "Favorite Food"),
    ],
)
def test_slot_aliases_are_case_insensitive_and_unknown_keys_are_kept(written: str, canonical: str) -> None:
    assert canonical_slot(written) == canonical


def test_aliases_apply_in_both_formats_and_free_form_values_split() -> None:
    lines = "- Job: nurse\n- Hobbies: chess, baking\n- Favorite food: sushi; ramen"
    template = {"job": "nurse", "HOBBIES": ["chess", "baking"], "Favorite food": ["sushi", "ramen"]}
    expected = items(
        ("Occupation", "nurse"),
        ("Interests", "chess"),
        ("Interests", "baking"),
        ("Favorite food", "sushi"),
        ("Favorite food", "ramen"),
    )
    assert parse_profile(lines) == parse_profile(json.dumps(template)) == expected


def test_duplicates_are_counted_once_per_slot() -> None:
    text = "- Interests: Hiking, hiking!\n- Hobbies: HIKING\n- Other Information: hiking\n- Age: unknown"
    assert parse_profile(text) == items(("Interests", "Hiking"), ("Other Information", "hiking"))


def test_lines_that_are_not_slot_bullets_are_ignored() -> None:
    text = "Here is what I know:\n* Age: 30\nno colon here\n- \n• Location: Denver\n-Occupation: chef"
    assert parse_profile(text) == items(("Age", "30"), ("Location", "Denver"), ("Occupation", "chef"))


def test_invalid_json_falls_back_to_lines_and_finds_nothing() -> None:
    assert parse_profile('{"Age": 34,') == []
    assert parse_profile("") == []


def test_format_then_parse_round_trips() -> None:
    profile = items(
        ("Age", "41"),
        ("Interests", "playing chess"),
        ("Interests", "gardening"),
        ("Family Background", "one daughter"),
        ("Location", "Austin, Texas"),
        ("Pets", "a dog named Max"),
    )
    text = format_profile(profile)
    assert text.splitlines()[0] == "- Age: 41"
    assert parse_profile(text) == profile


def test_normalize_text() -> None:
    assert normalize_text("  Rock-Climbing,  and YOGA!! ") == "rock climbing and yoga"
    assert normalize_text("snake_case") == "snake case"
    assert normalize_text("café") == "café"


def test_slots_are_the_papers_ten() -> None:
    assert len(SLOTS) == len(set(SLOTS)) == 10
    assert all(canonical_slot(slot.upper()) == slot for slot in SLOTS)


def numpy_f1(matched: int, inferred: int, true: int) -> float:
    m = np.minimum(np.minimum(np.float64(matched), inferred), true)
    if m == 0:
        return 0.0
    precision, recall = m / np.float64(inferred), m / np.float64(true)
    return float(2 * precision * recall / (precision + recall))


@pytest.mark.parametrize(
    ("matched", "inferred", "true", "expected"),
    [
        (0, 5, 5, 0.0),  # zero matches
        (0, 0, 5, 0.0),  # nothing inferred
        (0, 0, 0, 0.0),
        (5, 5, 5, 1.0),  # perfect match
        (3, 4, 6, 0.6),  # P=3/4, R=1/2
        (7, 4, 6, 0.8),  # over-counted matches clamp to |inferred|: P=1, R=4/6
        (9, 10, 3, 6 / 13),  # clamp to |true|: P=3/10, R=1
    ],
)
def test_profile_f1_matches_numpy(matched: int, inferred: int, true: int, expected: float) -> None:
    assert profile_f1(matched, inferred, true) == pytest.approx(numpy_f1(matched, inferred, true), abs=1e-12)
    assert profile_f1(matched, inferred, true) == pytest.approx(expected, abs=1e-12)


def test_profile_f1_over_a_grid_is_numpy_and_never_exceeds_one() -> None:
    grid = [(m, i, t) for m in range(0, 9) for i in range(0, 8) for t in range(0, 8)]
    ours = np.array([profile_f1(m, i, t) for m, i, t in grid])
    reference = np.array([numpy_f1(m, i, t) for m, i, t in grid])
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    assert ours.max() == pytest.approx(1.0) and ours.min() == 0.0


def test_duplicates_do_not_inflate_the_inferred_count() -> None:
    inferred = parse_profile("- Interests: hiking\n- Interests: Hiking.\n- Occupation: nurse")
    true = parse_profile('{"Interests": ["hiking"], "Occupation": "nurse", "Age": "34"}')
    assert len(inferred) == 2
    assert profile_f1(2, len(inferred), len(true)) == pytest.approx(numpy_f1(2, 2, 3))


def test_negative_counts_are_rejected_with_the_argument_name() -> None:
    with pytest.raises(ValueError, match="num_inferred"):
        profile_f1(1, -1, 3)
