"""Synthetic personas for the embedded world, composed from small vocabularies.

Vocabularies are chosen so extract_profile_rules reads the written paragraphs back to exactly
the true items: interests are single activities without "and", traits are single adjectives.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlpa_jax.dialogue.personas.base import Persona, make_persona
from rlpa_jax.dialogue.profile import ProfileItem

_SYNTHETIC_OCCUPATIONS = (
    "nurse", "graphic designer", "software engineer", "high school teacher", "chef", "accountant",
    "librarian", "electrician", "pharmacist", "architect", "journalist", "veterinarian", "barista",
    "car mechanic", "dentist", "photographer", "firefighter", "data analyst", "yoga instructor", "carpenter",
)
_SYNTHETIC_INTERESTS = (
    "hiking", "painting", "playing chess", "baking", "cycling", "gardening", "rock climbing",
    "playing the guitar", "reading mystery novels", "swimming", "photography", "knitting", "birdwatching",
    "cooking Thai food", "running marathons", "kayaking", "pottery", "skiing", "woodworking", "salsa dancing",
    "fishing", "yoga", "watching documentaries", "playing video games",
)
_SYNTHETIC_LOCATIONS = (
    "Seattle", "Austin", "Boston", "Denver", "Chicago", "Portland", "San Diego", "Toronto", "Melbourne", "Dublin",
)
_SYNTHETIC_MARITAL = ("married", "single", "divorced", "engaged")
# (as written after "has", the item value the extractor gives)
_SYNTHETIC_FAMILY = (
    ("two daughters", "two daughters"), ("a teenage son", "teenage son"), ("three children", "three children"),
    ("a twin sister", "twin sister"), ("two younger brothers", "two younger brothers"),
    ("a grown daughter", "grown daughter"), ("a young son", "young son"),
)
_SYNTHETIC_PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "golden retriever")
_SYNTHETIC_PET_NAMES = ("Pixel", "Max", "Kiwi", "Luna", "Biscuit", "Shelly", "Mango", "Olive", "Rocky", "Ziggy")
_SYNTHETIC_TRAITS = {
    "curious": "always eager to learn something new",
    "patient": "never rushing things",
    "organized": "keeping everything in its place",
    "outgoing": "enjoying the company of others",
    "empathetic": "understanding how others feel",
    "creative": "always coming up with new ideas",
    "reliable": "someone friends can count on",
    "adventurous": "seeking out new experiences",
    "thoughtful": "considering others before acting",
    "humorous": "making others laugh with ease",
    "calm": "staying composed under pressure",
    "ambitious": "always striving for more",
    "independent": "rarely relying on others",
    "generous": "sharing freely with others",
    "optimistic": "seeing the bright side of things",
    "reserved": "rarely speaking up in large groups",
    "practical": "focusing on what works",
    "meticulous": "paying attention to every detail",
}
SYNTHETIC_AGES = (19, 68)  # inclusive
_OPTIONAL_FACETS = ("interest", "interest", "trait", "location", "marital", "family", "pet")


def _join_english(parts: Sequence[str]) -> str:
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + ", and " + parts[-1]


def _synthetic_persona(rng: random.Random, persona_id: str) -> Persona:
    pronoun, gender = rng.choice((("She", "female"), ("He", "male")))
    age = rng.randint(*SYNTHETIC_AGES)
    occupation = rng.choice(_SYNTHETIC_OCCUPATIONS)
    total_items = rng.randint(5, 9)
    facets = ["interest", "trait"] + rng.sample(_OPTIONAL_FACETS, total_items - 5)
    interests = rng.sample(_SYNTHETIC_INTERESTS, facets.count("interest"))
    traits = rng.sample(sorted(_SYNTHETIC_TRAITS), facets.count("trait"))
    items = [ProfileItem("Age", str(age)), ProfileItem("Gender", gender), ProfileItem("Occupation", occupation)]
    items += [ProfileItem("Interests", interest) for interest in interests]
    sentences = [f"{pronoun} is a {age}-year-old {occupation} who enjoys {_join_english(interests)}."]
    if "location" in facets:
        city = rng.choice(_SYNTHETIC_LOCATIONS)
        items.append(ProfileItem("Location", city))
        sentences.append(f"{pronoun} lives in {city}.")
    if "marital" in facets:
        status = rng.choice(_SYNTHETIC_MARITAL)
        items.append(ProfileItem("Marital Status", status))
        sentences.append(f"{pronoun} is {status}.")
    if "family" in facets:
        written, value = rng.choice(_SYNTHETIC_FAMILY)
        items.append(ProfileItem("Family Background", value))
        sentences.append(f"{pronoun} has {written}.")
    if "pet" in facets:
        pet = f"{rng.choice(_SYNTHETIC_PETS)} named {rng.choice(_SYNTHETIC_PET_NAMES)}"
        items.append(ProfileItem("Other Information", pet))
        sentences.append(f"{pronoun} has a {pet}.")
    items += [ProfileItem("Personality Traits", trait) for trait in traits]
    personality = " ".join(f"{pronoun} is {trait}, {_SYNTHETIC_TRAITS[trait]}." for trait in traits)
    return make_persona(persona_id, " ".join(sentences), personality, items)


def synthetic_values() -> list[str]:
    """Every value a synthetic persona can hold (ages included): the words a tiny tokenizer for the
    embedded world should keep whole."""
    ages = [str(age) for age in range(SYNTHETIC_AGES[0], SYNTHETIC_AGES[1] + 1)]
    return [*_SYNTHETIC_OCCUPATIONS, *_SYNTHETIC_INTERESTS, *_SYNTHETIC_LOCATIONS, *_SYNTHETIC_MARITAL,
            *(value for _, value in _SYNTHETIC_FAMILY), *_SYNTHETIC_PETS, *_SYNTHETIC_PET_NAMES,
            *_SYNTHETIC_TRAITS, *ages]


def synthetic_personas(n: int, seed: int) -> list[Persona]:
    """n distinct personas with 5-9 true items each, deterministic under `seed`."""
    if n < 0:
        raise ValueError(f"synthetic_personas: n must be >= 0, got {n}")
    rng = random.Random(seed)
    personas: list[Persona] = []
    seen: set[tuple[str, str]] = set()
    while len(personas) < n:
        persona = _synthetic_persona(rng, f"synthetic-{seed}-{len(personas):04d}")
        if (persona.profile_text, persona.personality_text) not in seen:
            seen.add((persona.profile_text, persona.personality_text))
            personas.append(persona)
    return personas
