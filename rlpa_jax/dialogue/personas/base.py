"""Personas: the Persona type, ALOE files, (profile, personality) pairing and persona building.

RLPA builds each simulated user from an ALOE (profile paragraph, personality paragraph) pair and
a structured slot profile of that pair, which is the ground truth the Profile Reward scores
against. The slot profile comes from the rules (profile_rules.py) or an LLM (extraction.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlpa_jax.dialogue.personas.english import subject_gender
from rlpa_jax.dialogue.personas.profile_rules import extract_profile_rules
from rlpa_jax.dialogue.profile import ProfileItem, dedupe_items


@dataclass(frozen=True)
class Persona:
    persona_id: str
    profile_text: str  # ALOE profile paragraph (or synthetic)
    personality_text: str
    items: tuple[ProfileItem, ...]  # the true slot profile


# ---------------------------------------------------------------------------
# ALOE files

ALOE_FILES = {
    "train": ("profile.jsonl", "personality.jsonl"),
    "eval": ("profile_eval.jsonl", "personality_eval.jsonl"),
}
EVAL_PERSONALITIES_PER_PROFILE = 5  # ALOE pairs each eval profile with the first 5 personalities


def load_aloe(path: str | Path) -> list[str]:
    """The strings of an ALOE JSONL file: one JSON string per line, blank lines skipped.

    One line of ALOE's profile.jsonl (line 6) holds two JSON strings back to back with no
    newline between them; we read every string on a line, so that file gives 331 profiles.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            position = 0
            while position < len(line):
                try:
                    value, position = decoder.raw_decode(line, position)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{line_number}: expected a JSON string per line (ALOE format), "
                        f"could not decode at column {error.colno}: {error.msg}"
                    ) from None
                if not isinstance(value, str):
                    raise ValueError(
                        f"{path}:{line_number}: expected a JSON string per line (ALOE format), "
                        f"got a JSON {type(value).__name__}"
                    )
                if not value.strip():
                    raise ValueError(f"{path}:{line_number}: an empty persona ({value!r}); every entry must "
                                     "describe someone")
                texts.append(value)
                while position < len(line) and line[position].isspace():
                    position += 1
    return texts


def load_aloe_pool(directory: str | Path, split: str = "train") -> tuple[list[str], list[str]]:
    """(profiles, personalities) of ALOE's train split (profile.jsonl, personality.jsonl) or
    eval split (profile_eval.jsonl, personality_eval.jsonl) in `directory`."""
    if split not in ALOE_FILES:
        raise ValueError(f"load_aloe_pool: split={split!r}; expected one of {sorted(ALOE_FILES)}")
    directory = Path(directory)
    profile_name, personality_name = ALOE_FILES[split]
    for name in (profile_name, personality_name):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"ALOE {split} split needs {directory / name}, which does not exist")
    return load_aloe(directory / profile_name), load_aloe(directory / personality_name)


# ---------------------------------------------------------------------------
# Pairing


def pair_for_training(
    profiles: Sequence[str],
    personalities: Sequence[str],
    n: int,
    seed: int,
    *,
    match_pronouns: bool = True,
) -> list[tuple[str, str]]:
    """n random (profile, personality) pairs, deterministic under `seed`.

    Profiles are drawn without replacement until the pool is used up (then reshuffled), so every
    profile appears before any repeats. With match_pronouns, a profile written with "she" gets a
    personality written with "she" (and so on) whenever one exists, so the simulated user never
    reads two paragraphs about different people.
    """
    if n < 0:
        raise ValueError(f"pair_for_training: n must be >= 0, got {n}")
    if not profiles or not personalities:
        raise ValueError(
            f"pair_for_training: needs non-empty pools, got {len(profiles)} profiles and "
            f"{len(personalities)} personalities"
        )
    rng = random.Random(seed)
    by_gender: dict[str | None, list[str]] = {}
    for personality in personalities:
        by_gender.setdefault(subject_gender(personality), []).append(personality)
    pairs: list[tuple[str, str]] = []
    order: list[str] = []
    while len(pairs) < n:
        if not order:
            order = list(profiles)
            rng.shuffle(order)
        profile = order.pop()
        candidates = by_gender.get(subject_gender(profile)) if match_pronouns else None
        pairs.append((profile, rng.choice(candidates or list(personalities))))
    return pairs


def pair_for_evaluation(
    profiles: Sequence[str],
    personalities: Sequence[str],
    personalities_per_profile: int = EVAL_PERSONALITIES_PER_PROFILE,
) -> list[tuple[str, str]]:
    """Every eval profile with each of the first 5 eval personalities, as ALOE evaluates."""
    if len(personalities) < personalities_per_profile:
        raise ValueError(
            f"pair_for_evaluation: needs at least {personalities_per_profile} personalities, "
            f"got {len(personalities)}"
        )
    chosen = personalities[:personalities_per_profile]
    return [(profile, personality) for profile in profiles for personality in chosen]


# ---------------------------------------------------------------------------
# Personas


def pair_key(profile_text: str, personality_text: str) -> str:
    """A stable hex digest of a (profile, personality) pair."""
    payload = json.dumps([profile_text, personality_text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def make_persona(
    persona_id: str, profile_text: str, personality_text: str, items: Iterable[ProfileItem]
) -> Persona:
    """A Persona whose items are deduplicated (same slot and normalised value counted once)."""
    return Persona(
        persona_id=persona_id,
        profile_text=profile_text,
        personality_text=personality_text,
        items=tuple(dedupe_items(items)),
    )


def personas_from_items(
    pairs: Sequence[tuple[str, str]], items_per_pair: Sequence[Sequence[ProfileItem]], prefix: str = "aloe"
) -> list[Persona]:
    """Personas from pairs and their already-extracted items (e.g. from LLMProfileExtractor)."""
    if len(pairs) != len(items_per_pair):
        raise ValueError(f"personas_from_items: {len(pairs)} pairs but {len(items_per_pair)} item lists")
    return [
        make_persona(f"{prefix}-{index:04d}-{pair_key(*pair)[:8]}", pair[0], pair[1], items)
        for index, (pair, items) in enumerate(zip(pairs, items_per_pair))
    ]


def personas_from_pairs(
    pairs: Sequence[tuple[str, str]],
    extractor: Callable[[str, str], Sequence[ProfileItem]] | None = None,
    prefix: str = "aloe",
) -> list[Persona]:
    """Personas from (profile, personality) pairs, items from `extractor` (default: the rules)."""
    extract = extractor or extract_profile_rules
    return personas_from_items(pairs, [extract(profile, personality) for profile, personality in pairs], prefix)
