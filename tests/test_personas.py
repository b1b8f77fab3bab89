"""Personas: ALOE loading and pairing, the rule-based extractor on the real pool, synthetic
personas, and the LLM extractor against a real OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from openai_server import OpenAIServer, Reply, scripted

from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.personas import (
    LLMProfileExtractor,
    Persona,
    load_aloe_pool,
    make_persona,
    pair_for_evaluation,
    pair_for_training,
    personas_from_pairs,
    synthetic_personas,
)
from rlpa_jax.dialogue.personas.base import load_aloe
from rlpa_jax.dialogue.personas.english import subject_gender
from rlpa_jax.dialogue.personas.extraction import ProfileExtractionError, slot_template_problems
from rlpa_jax.dialogue.personas.profile_rules import extract_profile_rules
from rlpa_jax.dialogue.personas.trait_rules import personality_traits
from rlpa_jax.dialogue.profile import ProfileItem, normalize_text

# `aloe_dir` comes from conftest.py: ../shared/data/aloe next to the repo, skipping when absent.


@pytest.fixture(scope="module")
def train_pool(aloe_dir: Path) -> tuple[list[str], list[str]]:
    return load_aloe_pool(aloe_dir, "train")


@pytest.fixture(scope="module")
def eval_pool(aloe_dir: Path) -> tuple[list[str], list[str]]:
    return load_aloe_pool(aloe_dir, "eval")


def slot_values(items: list[ProfileItem], slot: str) -> list[str]:
    return [item.value for item in items if item.slot == slot]


# ---------------------------------------------------------------------------
# Loading


def test_real_pools_load(train_pool: tuple[list[str], list[str]], eval_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    # 330 lines; line 6 holds two JSON strings back to back, both kept.
    assert len(profiles) == 331 and len(personalities) == 71
    assert profiles[0].startswith("She is a 34-year-old freelance graphic designer")
    assert profiles[5].endswith("host a wedding party next month.")
    assert profiles[6].startswith("He is a 46-year-old high school history teacher")
    eval_profiles, eval_personalities = eval_pool
    assert len(eval_profiles) == 20 and len(eval_personalities) == 7
    assert all(isinstance(text, str) and text for text in profiles + personalities + eval_profiles)


def test_load_aloe_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text('"first"\n\n   \n"second \\u2019quoted\\u2019"\n"third""fourth"\n', encoding="utf-8")
    assert load_aloe(path) == ["first", "second \u2019quoted\u2019", "third", "fourth"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [('"unterminated', "could not decode"), ("{\"a\": 1}", "got a JSON dict"), ('"ok" trailing', "could not decode")],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "profile.jsonl"
    path.write_text(f'"one"\n\n{bad_line}\n"four"\n', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_aloe(path)
    message = str(error.value)
    assert f"{path}:3:" in message and "expected a JSON string per line" in message and reason in message


@pytest.mark.parametrize("empty", ['""', '"   "', '"\\n\\t"'])
def test_an_empty_persona_names_file_and_line(tmp_path: Path, empty: str) -> None:
    path = tmp_path / "profile.jsonl"
    path.write_text(f'"one"\n"two"\n{empty}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: an empty persona"):
        load_aloe(path)


def test_load_aloe_pool_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split='test'"):
        load_aloe_pool(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="profile_eval.jsonl"):
        load_aloe_pool(tmp_path, "eval")


# ---------------------------------------------------------------------------
# Pairing


def test_training_pairs_are_deterministic_and_seed_dependent(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    first = pair_for_training(profiles, personalities, n=50, seed=7)
    assert first == pair_for_training(profiles, personalities, n=50, seed=7)
    assert first != pair_for_training(profiles, personalities, n=50, seed=8)
    assert len(first) == 50


def test_training_pairs_use_every_profile_before_repeating(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    pairs = pair_for_training(profiles, personalities, n=len(profiles) + 10, seed=0)
    assert sorted(profile for profile, _ in pairs[: len(profiles)]) == sorted(profiles)
    assert len({personality for _, personality in pairs}) > 30


def test_training_pairs_match_pronouns_when_asked(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    matched = pair_for_training(profiles, personalities, n=200, seed=1)
    assert all(subject_gender(profile) == subject_gender(personality) for profile, personality in matched)
    unmatched = pair_for_training(profiles, personalities, n=200, seed=1, match_pronouns=False)
    assert any(subject_gender(profile) != subject_gender(personality) for profile, personality in unmatched)


def test_training_pairing_rejects_empty_pools() -> None:
    with pytest.raises(ValueError, match="0 personalities"):
        pair_for_training(["She is a nurse."], [], n=1, seed=0)


def test_evaluation_pairs_each_eval_profile_with_the_first_five_personalities(
    eval_pool: tuple[list[str], list[str]],
) -> None:
    profiles, personalities = eval_pool
    pairs = pair_for_evaluation(profiles, personalities)
    assert len(pairs) == len(profiles) * 5 == 100
    assert {personality for _, personality in pairs} == set(personalities[:5])
    assert pairs[:5] == [(profiles[0], personality) for personality in personalities[:5]]
    with pytest.raises(ValueError, match="at least 5 personalities"):
        pair_for_evaluation(profiles, personalities[:4])


# ---------------------------------------------------------------------------
# Rule-based extraction on known lines


def test_extracts_the_first_aloe_pair_exactly(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    extracted = extract_profile_rules(profiles[0], personalities[0])
    assert set(extracted) == {
        ProfileItem("Gender", "female"),
        ProfileItem("Age", "34"),
        ProfileItem("Occupation", "freelance graphic designer"),
        ProfileItem("Interests", "hiking"),
        ProfileItem("Interests", "yoga"),
        ProfileItem("Interests", "painting"),
        ProfileItem("Other Information", "vegan"),
        ProfileItem("Interests", "spicy food"),
        ProfileItem("Interests", "experimenting with new recipes"),
        ProfileItem("Interests", "traveling around the world"),
        ProfileItem("Interests", "natural scenery"),
        ProfileItem("Location", "small apartment in the city"),
        ProfileItem("Other Information", "two cats named Pixel and Scribble"),
        ProfileItem("Personality Traits", "creative"),
        ProfileItem("Personality Traits", "independent"),
        ProfileItem("Personality Traits", "reserved"),
        ProfileItem("Personality Traits", "well-organized"),
        ProfileItem("Personality Traits", "sensitive"),
    }
    assert len(extracted) == len(set(extracted))


def test_college_student_gets_occupation_and_education(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, personalities = train_pool
    extracted = extract_profile_rules(profiles[1], personalities[1])
    assert slot_values(extracted, "Age") == ["22"]
    assert slot_values(extracted, "Gender") == ["male"]
    assert slot_values(extracted, "Occupation") == ["college student"]
    assert slot_values(extracted, "Education Background") == ["studying anthropology"]
    assert {"different cultures", "playing the guitar", "indie films"} <= set(slot_values(extracted, "Interests"))
    assert slot_values(extracted, "Personality Traits") == [
        "curious", "open-minded", "sociable", "confident", "great sense of humor"
    ]


def test_single_mother_working_as_a_librarian(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, _ = train_pool
    extracted = extract_profile_rules(profiles[2], "")
    assert slot_values(extracted, "Marital Status") == ["single"]
    assert slot_values(extracted, "Family Background") == ["mother of two cute girls"]
    assert slot_values(extracted, "Occupation") == ["school librarian"]
    assert {"classic literature", "knitting"} <= set(slot_values(extracted, "Interests"))
    assert slot_values(extracted, "Personality Traits") == []


def test_retired_firefighter_with_a_second_job_and_grandchildren(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, _ = train_pool
    extracted = extract_profile_rules(profiles[8], "")
    assert slot_values(extracted, "Occupation") == ["retired firefighter", "part-time handyman"]
    assert slot_values(extracted, "Family Background") == ["grandfather to three young children"]
    assert {"fishing", "building model trains in their basement", "classic rock music"} <= set(
        slot_values(extracted, "Interests")
    )
    assert "volunteers at a local animal shelter" in slot_values(extracted, "Other Information")


def test_married_with_spouse_children_and_degree(train_pool: tuple[list[str], list[str]]) -> None:
    profiles, _ = train_pool
    extracted = extract_profile_rules(profiles[10], "")
    assert slot_values(extracted, "Marital Status") == ["married"]
    assert slot_values(extracted, "Family Background") == ["partner is a nurse", "one daughter"]
    assert {"playing chess", "gardening", "brewing their own coffee", "playing the piano"} <= set(
        slot_values(extracted, "Interests")
    )


def test_pets_and_location_phrasings() -> None:
    extracted = extract_profile_rules(
        "She is a 33-year-old pediatrician. She is single and lives with her golden retriever, Daisy. "
        "He lives in an apartment with a view of the city skyline. She is originally from Seattle.",
        "",
    )
    assert slot_values(extracted, "Other Information") == ["golden retriever named Daisy"]
    assert slot_values(extracted, "Location") == ["apartment with a view of the city skyline", "Seattle"]


# ---------------------------------------------------------------------------
# Rule-based extraction over the whole pool

MARITAL_WORDS = re.compile(r"\b(?:married|single|divorced|engaged|widow\w*|relationship|wife|husband)\b")


def test_every_profile_yields_core_slots(
    train_pool: tuple[list[str], list[str]], eval_pool: tuple[list[str], list[str]]
) -> None:
    profiles = train_pool[0] + eval_pool[0]
    item_counts = []
    for profile in profiles:
        extracted = extract_profile_rules(profile, "")
        item_counts.append(len(extracted))
        slots = {item.slot for item in extracted}
        ages = slot_values(extracted, "Age")
        assert ages and f"{ages[0]}-year-old" in profile, profile
        assert slot_values(extracted, "Gender") == [subject_gender(profile)], profile
        assert "Occupation" in slots and "Interests" in slots, profile
        if MARITAL_WORDS.search(profile):
            assert "Marital Status" in slots, profile
    assert min(item_counts) >= 5
    assert sum(item_counts) / len(item_counts) >= 9


def test_every_profile_with_a_year_old_has_its_age(train_pool: tuple[list[str], list[str]]) -> None:
    with_age = [profile for profile in train_pool[0] if "-year-old" in profile]
    assert len(with_age) == len(train_pool[0])
    for profile in with_age:
        expected = re.search(r"(\d+)-year-old", profile).group(1)
        assert slot_values(extract_profile_rules(profile, ""), "Age") == [expected]


# Traits read from "values creativity" or "has a quick wit" rather than written as adjectives.
DERIVED_TRAITS = {"creative", "honest", "loyal", "collaborative", "witty"}


def test_extracted_values_come_from_the_text(
    train_pool: tuple[list[str], list[str]], eval_pool: tuple[list[str], list[str]]
) -> None:
    """Precision proxy: occupations, locations and traits are words of their own paragraph."""
    profiles = train_pool[0] + eval_pool[0]
    personalities = train_pool[1] + eval_pool[1]
    for index, profile in enumerate(profiles):
        personality = personalities[index % len(personalities)]
        extracted = extract_profile_rules(profile, personality)
        profile_words, personality_words = normalize_text(profile), normalize_text(personality)
        for item in extracted:
            value = normalize_text(item.value)
            if item.slot == "Occupation" and not value.startswith("part time"):
                assert value in profile_words, (item, profile)
            if item.slot == "Location" and "their" not in value:
                assert value in profile_words, (item, profile)
            if item.slot == "Personality Traits":
                assert value in personality_words or value in DERIVED_TRAITS, (item, personality)


def test_every_personality_yields_traits(
    train_pool: tuple[list[str], list[str]], eval_pool: tuple[list[str], list[str]]
) -> None:
    counts = [len(personality_traits(text)) for text in train_pool[1] + eval_pool[1]]
    assert min(counts) >= 2
    assert sum(counts) / len(counts) >= 7
    # Explanations after the trait ("..., always eager to learn") are not traits.
    assert personality_traits("He is patient, never rushing. He is social, loving to connect.") == ["patient", "social"]


# ---------------------------------------------------------------------------
# Personas


def test_make_persona_dedupes_items() -> None:
    persona = make_persona(
        "p1", "profile", "personality",
        [ProfileItem("Interests", "Hiking"), ProfileItem("Interests", "hiking."), ProfileItem("Age", "30")],
    )
    assert persona.items == (ProfileItem("Interests", "Hiking"), ProfileItem("Age", "30"))


def test_personas_from_pairs_use_the_rules_by_default(train_pool: tuple[list[str], list[str]]) -> None:
    pairs = pair_for_training(*train_pool, n=20, seed=3)
    personas = personas_from_pairs(pairs)
    assert len({persona.persona_id for persona in personas}) == 20
    for persona, (profile, personality) in zip(personas, pairs):
        assert (persona.profile_text, persona.personality_text) == (profile, personality)
        assert list(persona.items) == extract_profile_rules(profile, personality)
    custom = personas_from_pairs(pairs[:2], extractor=lambda profile, _: [ProfileItem("Note", profile[:5])])
    assert custom[0].items == (ProfileItem("Note", pairs[0][0][:5]),)


def test_synthetic_personas_are_deterministic_and_seed_dependent() -> None:
    first = synthetic_personas(30, seed=11)
    assert first == synthetic_personas(30, seed=11)
    other = synthetic_personas(30, seed=12)
    assert [persona.profile_text for persona in first] != [persona.profile_text for persona in other]
    assert len({(persona.profile_text, persona.personality_text) for persona in first + other}) == 60
    assert len({persona.persona_id for persona in first + other}) == 60


def test_synthetic_personas_have_5_to_9_items_the_extractor_recovers() -> None:
    personas = synthetic_personas(200, seed=0)
    assert {len(persona.items) for persona in personas} == {5, 6, 7, 8, 9}
    for persona in personas:
        assert {"Age", "Gender", "Occupation", "Interests", "Personality Traits"} <= {
            item.slot for item in persona.items
        }
        recovered = extract_profile_rules(persona.profile_text, persona.personality_text)
        assert set(recovered) == set(persona.items), persona
    assert synthetic_personas(0, seed=0) == []


# ---------------------------------------------------------------------------
# LLM extractor (real HTTP server on 127.0.0.1)

VALID_TEMPLATE = {
    "Age": "34",
    "Gender": "female",
    "Interests": ["hiking", "yoga"],
    "Education Background": [],
    "Personality Traits": ["creative"],
    "Occupation": ["graphic designer"],
    "Marital Status": None,
    "Family Background": [],
    "Location": ["city apartment"],
    "Other Information": ["two cats"],
}
PAIRS = [
    ("She is a 34-year-old graphic designer who enjoys hiking.", "She values creativity."),
    ("He is a 22-year-old college student.", "He is curious."),
]


def run_extractor(base_url: str, cache_path: Path, pairs: list[tuple[str, str]], **kwargs: int) -> list:
    async def go() -> list:
        # timeout_s: a hang guard
        client = LLMClient(LLMConfig(base_url=base_url, model="test-model", max_retries=0, timeout_s=60))
        try:
            return await LLMProfileExtractor(client, cache_path, **kwargs).extract_many(pairs)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_llm_extractor_caches_results_so_a_second_run_sends_nothing(tmp_path: Path) -> None:
    cache_path = tmp_path / "conversion.jsonl"

    def answer_by_age(request: dict) -> Reply:
        age = re.search(r"(\d+)-year-old", request["messages"][-1]["content"]).group(1)
        return Reply(content=json.dumps({**VALID_TEMPLATE, "Age": age}))

    with OpenAIServer(answer_by_age) as server:
        first = run_extractor(server.base_url, cache_path, PAIRS)
        assert len(server.requests) == 2
        request = server.requests[0]
        assert request["response_format"] == {"type": "json_object"}
        assert request["messages"][0]["role"] == "system"
        assert "JSON" in request["messages"][0]["content"]
        assert {message["content"].split("\n")[1] for message in
                (r["messages"][1] for r in server.requests)} == {profile for profile, _ in PAIRS}
    assert [slot_values(items, "Age") for items in first] == [["34"], ["22"]]
    assert ProfileItem("Interests", "yoga") in first[0] and ProfileItem("Other Information", "two cats") in first[0]
    assert len(cache_path.read_text(encoding="utf-8").splitlines()) == 2

    with OpenAIServer(scripted(Reply(status=500))) as server:
        second = run_extractor(server.base_url, cache_path, list(reversed(PAIRS)))
        assert server.requests == []
    assert second == list(reversed(first))


def test_llm_extractor_retries_invalid_json_with_feedback(tmp_path: Path) -> None:
    replies = scripted("Sure! Here is the profile: Age 34", Reply(content=json.dumps(VALID_TEMPLATE)))
    with OpenAIServer(replies) as server:
        (items,) = run_extractor(server.base_url, tmp_path / "cache.jsonl", PAIRS[:1])
        assert len(server.requests) == 2
        retry_messages = server.requests[1]["messages"]
        assert retry_messages[2] == {"role": "assistant", "content": "Sure! Here is the profile: Age 34"}
        assert "not valid JSON" in retry_messages[3]["content"]
    assert ProfileItem("Occupation", "graphic designer") in items


def test_llm_extractor_gives_up_after_max_attempts_and_caches_nothing(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.jsonl"
    nested = json.dumps({"Age": {"years": 34}})
    with OpenAIServer(scripted(Reply(content=nested))) as server:
        with pytest.raises(ProfileExtractionError, match=r"pair 0: value of 'Age' must be a string"):
            run_extractor(server.base_url, cache_path, PAIRS[:1], max_attempts=2)
        assert len(server.requests) == 2
    assert not cache_path.exists() or cache_path.read_text(encoding="utf-8") == ""


def test_llm_extractor_failed_requests_are_reported(tmp_path: Path) -> None:
    with OpenAIServer(scripted(Reply(status=400))) as server:
        with pytest.raises(ProfileExtractionError, match="request failed"):
            run_extractor(server.base_url, tmp_path / "cache.jsonl", PAIRS[:1], max_attempts=2)
        assert len(server.requests) == 2


def test_corrupt_cache_line_names_file_and_line(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.jsonl"
    cache_path.write_text(json.dumps({"key": "k", "profile": VALID_TEMPLATE}) + "\nnot json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{cache_path}:2:")):
        run_extractor("http://127.0.0.1:9/v1", cache_path, PAIRS[:1])


@pytest.mark.parametrize(
    ("decoded", "problem"),
    [
        ([VALID_TEMPLATE], "expected a JSON object, got a JSON list"),
        ({"Age": 34}, "value of 'Age' must be a string"),
        ({"Interests": ["hiking", 3]}, "value of 'Interests' must be a string"),
        ({"": "x"}, "key '' must be a non-empty string"),
        ({"Age": None, "Interests": [], "Location": "unknown"}, "holds no profile items"),
    ],
)
def test_slot_template_validation(decoded: object, problem: str) -> None:
    problems = slot_template_problems(decoded)
    assert len(problems) == 1 and problem in problems[0]
    assert slot_template_problems(VALID_TEMPLATE) == []


def test_persona_type_is_frozen() -> None:
    persona = synthetic_personas(1, seed=5)[0]
    assert isinstance(persona, Persona)
    with pytest.raises(AttributeError):
        persona.persona_id = "other"  # type: ignore[misc]
