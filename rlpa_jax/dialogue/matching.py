"""Profile item matching: when an inferred item means the same as a true item.

Slots are compared by canonical name, values by stemmed content tokens after synonym mapping
(list-like values element by element, ages within a tolerance), and inferred items are paired
one-to-one with true items. The embedded profile judge counts these matches; the scripted user
and the criteria use mentioned_item_indices to see which items a message talks about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rlpa_jax.dialogue.profile import SLOTS, ProfileItem, normalize_text
from rlpa_jax.dialogue.profile import canonical_slot as profile_canonical_slot
from rlpa_jax.dialogue.text import SLOT_KEYWORD_STEMS, STOPWORDS, content_tokens, stem

# Phrases that mean the same thing in a profile; each group maps to its first entry.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("software engineer", "software developer", "programmer", "developer", "coder", "software engineering"),
    ("female", "woman", "girl", "lady"),
    ("male", "man", "guy"),
    ("doctor", "physician", "medical doctor"),
    ("lawyer", "attorney"),
    ("teacher", "educator", "schoolteacher"),
    ("nurse", "registered nurse"),
    ("chef", "cook"),
    ("single", "unmarried", "not married"),
    ("children", "kids", "child", "kid"),
    ("movies", "movie", "films", "film", "cinema"),
    ("reading", "books"),
    ("video games", "gaming"),
    ("running", "jogging"),
    ("hiking", "trekking"),
    ("outgoing", "extroverted", "extrovert", "sociable"),
    ("introverted", "introvert", "shy", "reserved"),
    ("united states", "usa", "america"),
    ("new york", "new york city", "nyc"),
    ("san francisco", "sf"),
    ("bachelor", "bachelors", "ba", "bs", "bsc", "undergraduate degree"),
    ("master", "masters", "ma", "ms", "msc"),
    ("phd", "doctorate"),
)

# Names profile.canonical_slot leaves alone but people (and models) use for canonical slots.
_EXTRA_SLOT_ALIASES: dict[str, str] = {
    "work": "Occupation",
    "occupation job": "Occupation",
    "marital": "Marital Status",
    "city": "Location",
    "hometown": "Location",
    "place of residence": "Location",
    "where they live": "Location",
}


def canonical_slot(slot: str) -> str:
    """A canonical slot name from SLOTS, or the normalised free-form key (for matching)."""
    named = profile_canonical_slot(slot)
    if named in SLOTS:
        return named
    key = normalize_text(named)
    return _EXTRA_SLOT_ALIASES.get(key, key)


def slot_keyword_stems(slot: str) -> frozenset[str]:
    """Keyword stems for a canonical slot; a free-form key is its own keywords."""
    canonical = canonical_slot(slot)
    if canonical in SLOT_KEYWORD_STEMS:
        return SLOT_KEYWORD_STEMS[canonical] | frozenset(content_tokens(canonical))
    return frozenset(content_tokens(slot))


def _synonym_pattern() -> tuple[re.Pattern[str], dict[str, str]]:
    canonical_of = {phrase: group[0].replace(" ", "_") for group in SYNONYM_GROUPS for phrase in group}
    # Longest phrase first, so "new york city" wins over "new york" at the same position.
    phrases = sorted(canonical_of, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(phrase) for phrase in phrases) + r")\b"), canonical_of


_SYNONYM_PATTERN, _CANONICAL_OF = _synonym_pattern()
_CANONICAL_TOKENS = frozenset(_CANONICAL_OF.values())


def canonicalize_phrases(text: str) -> str:
    """Normalise `text` and map known synonym phrases onto one token each (one pass, so a
    replacement is never rewritten again)."""
    return _SYNONYM_PATTERN.sub(lambda found: _CANONICAL_OF[found.group(1)], normalize_text(text))


def value_tokens(text: str) -> set[str]:
    """Stemmed content tokens of a profile value after synonym mapping."""
    return {
        stem(word)
        for word in re.findall(r"[a-z0-9_]+", canonicalize_phrases(text))
        if word in _CANONICAL_TOKENS or (word not in STOPWORDS and (len(word) > 1 or word.isdigit()))
    }


def value_elements(value: str) -> list[str]:
    """The parts of a list-like value: 'hiking, yoga and chess' -> three elements."""
    parts = re.split(r"[,;/&]|\band\b|\bplus\b", value, flags=re.IGNORECASE)
    elements = [part.strip() for part in parts if value_tokens(part)]
    return elements or [value]


def token_f1(first: set[str], second: set[str]) -> float:
    if not first or not second:
        return 0.0
    overlap = len(first & second)
    return 2 * overlap / (len(first) + len(second))


def age_range(value: str) -> tuple[float, float] | None:
    """Ages a value allows: '34' -> (34, 34); '30s'/'thirties' -> (30, 39); None if no age."""
    lowered = value.lower()
    decade = re.search(r"\b(\d)0'?s\b", lowered)
    if decade:
        low = int(decade.group(1)) * 10
        return float(low), float(low + 9)
    decade_words = {"twenties": 20, "thirties": 30, "forties": 40, "fifties": 50, "sixties": 60, "seventies": 70}
    for word, low in decade_words.items():
        if word in lowered:
            return float(low), float(low + 9)
    numbers = [int(number) for number in re.findall(r"\b\d{1,3}\b", lowered)]
    if not numbers:
        return None
    return float(min(numbers)), float(max(numbers))


def ages_match(inferred: str, true: str, tolerance_years: float = 2.0) -> bool | None:
    """Whether two age values agree within the tolerance; None if either holds no age."""
    first, second = age_range(inferred), age_range(true)
    if first is None or second is None:
        return None
    return first[0] - tolerance_years <= second[1] and second[0] - tolerance_years <= first[1]


@dataclass(frozen=True)
class MatchRules:
    element_threshold: float = 0.6  # token F1 for two list elements to be the same thing
    item_fraction: float = 0.5  # share of an inferred item's elements that must match
    age_tolerance_years: float = 2.0


def element_similarity(inferred: str, true: str) -> float:
    if normalize_text(inferred) == normalize_text(true):
        return 1.0
    return token_f1(value_tokens(inferred), value_tokens(true))


def item_match_score(
    inferred: ProfileItem,
    true: ProfileItem,
    rules: MatchRules = MatchRules(),
) -> float | None:
    """Similarity of two items, or None when they do not match (slot differs or values differ)."""
    slot = canonical_slot(inferred.slot)
    if slot != canonical_slot(true.slot):
        return None
    if slot == "Age":
        agreed = ages_match(inferred.value, true.value, rules.age_tolerance_years)
        if agreed is not None:
            return 1.0 if agreed else None
    inferred_elements = value_elements(inferred.value)
    true_elements = value_elements(true.value)
    best_scores = [
        max(element_similarity(element, other) for other in true_elements)
        for element in inferred_elements
    ]
    matched = sum(1 for score in best_scores if score >= rules.element_threshold)
    # Precision inside an item: "Interests: everything you can think of" must not match.
    if matched == 0 or matched / len(inferred_elements) < rules.item_fraction:
        return None
    return sum(best_scores) / len(best_scores)


def matched_item_indices(
    inferred: Sequence[ProfileItem],
    true: Sequence[ProfileItem],
    rules: MatchRules = MatchRules(),
) -> frozenset[int]:
    """Which inferred items match a true item, by one-to-one greedy matching: best-scoring pairs
    first, each true item used once."""
    candidates = []
    for i, inferred_item in enumerate(inferred):
        for j, true_item in enumerate(true):
            score = item_match_score(inferred_item, true_item, rules)
            if score is not None:
                candidates.append((-score, i, j))
    candidates.sort()
    used_inferred: set[int] = set()
    used_true: set[int] = set()
    for _, i, j in candidates:
        if i not in used_inferred and j not in used_true:
            used_inferred.add(i)
            used_true.add(j)
    return frozenset(used_inferred)


def count_item_matches(
    inferred: Sequence[ProfileItem],
    true: Sequence[ProfileItem],
    rules: MatchRules = MatchRules(),
) -> int:
    """How many inferred items match a distinct true item (matched_item_indices, counted)."""
    return len(matched_item_indices(inferred, true, rules))


def mentioned_item_indices(items: Sequence[ProfileItem], text: str) -> set[int]:
    """Items whose value shows up in `text` (at least half the tokens of one element)."""
    text_tokens = value_tokens(text)
    found = set()
    for index, item in enumerate(items):
        if canonical_slot(item.slot) == "Age":
            if re.search(r"\b" + re.escape(normalize_text(item.value)) + r"\b", normalize_text(text)):
                found.add(index)
            continue
        for element in value_elements(item.value):
            tokens = value_tokens(element)
            if tokens and len(tokens & text_tokens) / len(tokens) >= 0.5:
                found.add(index)
                break
    return found

