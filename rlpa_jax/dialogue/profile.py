"""Profile items: parsing the two profile formats, canonical slot names, and the profile F1.

A profile is a flat list of ProfileItem(slot, value). Two written formats reach us:

- lines, as the policy writes them inside <profile>:  "- Occupation: nurse"
- the JSON slot template used for the ground truth:     {"Age": "34", "Interests": ["hiking"]}

Both are counted the same way: a list-like slot contributes one item per element, so
"- Interests: hiking, yoga" and {"Interests": ["hiking", "yoga"]} are both two items.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileItem:
    slot: str  # canonical slot name ("Occupation") or a free-form key
    value: str


SLOTS: tuple[str, ...] = (
    "Age",
    "Gender",
    "Interests",
    "Education Background",
    "Personality Traits",
    "Occupation",
    "Marital Status",
    "Family Background",
    "Location",
    "Other Information",
)

# Slots whose values are naturally lists; a comma/semicolon-separated value splits into items.
LIST_SLOTS: frozenset[str] = frozenset({"Interests", "Personality Traits", "Other Information"})

_SLOT_ALIASES: dict[str, str] = {
    **{slot.lower(): slot for slot in SLOTS},
    "sex": "Gender",
    "interest": "Interests",
    "hobby": "Interests",
    "hobbies": "Interests",
    "hobbies and interests": "Interests",
    "interests and hobbies": "Interests",
    "education": "Education Background",
    "educational background": "Education Background",
    "personality": "Personality Traits",
    "personality trait": "Personality Traits",
    "traits": "Personality Traits",
    "job": "Occupation",
    "profession": "Occupation",
    "career": "Occupation",
    "relationship status": "Marital Status",
    "family": "Family Background",
    "residence": "Location",
    "others": "Other Information",
    "other": "Other Information",
    "other info": "Other Information",
    "additional information": "Other Information",
}

# Placeholders a model writes for "I don't know yet"; they are not information about the user.
_EMPTY_VALUES: frozenset[str] = frozenset(
    {"", "unknown", "none", "null", "n a", "na", "not mentioned", "not specified", "unspecified"}
)

_BULLET_LINE = re.compile(r"^\s*(?:[-*\u2022])\s*(?P<slot>[^:]+?)\s*:\s*(?P<value>.*?)\s*$")
_JSON_FENCE = re.compile(r"^```(?:json)?\s*\n?(?P<body>.*?)\n?```$", re.DOTALL | re.IGNORECASE)
_LIST_SEPARATOR = re.compile(r"\s*[;,]\s*")
_LEADING_CONJUNCTION = re.compile(r"^(?:and|or)\s+", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: the form two values are compared in."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def canonical_slot(name: str) -> str:
    """Map a slot name to its canonical form, case-insensitively; unknown names are kept as written."""
    cleaned = " ".join(name.replace("_", " ").strip().strip("\"'*").split())
    return _SLOT_ALIASES.get(cleaned.lower(), cleaned)


def is_list_slot(slot: str) -> bool:
    """True for list-like slots and for free-form keys (both split comma/semicolon lists)."""
    return slot in LIST_SLOTS or slot not in SLOTS


def split_value(slot: str, value: str) -> list[str]:
    """One slot value as its list of item values (a single element for scalar slots)."""
    value = value.strip()
    if not is_list_slot(slot):
        return [value]
    parts = (_LEADING_CONJUNCTION.sub("", part.strip()) for part in _LIST_SEPARATOR.split(value))
    return [part.strip(" .") for part in parts]


def dedupe_key(item: ProfileItem) -> tuple[str, str] | None:
    """What two items are the same item by: (slot, value) normalised; None for a placeholder."""
    value_key = normalize_text(item.value)
    if value_key in _EMPTY_VALUES or not item.slot:
        return None
    return normalize_text(item.slot), value_key


def dedupe_items(items: Iterable[ProfileItem]) -> list[ProfileItem]:
    """Drop placeholder values and repeats of (slot, normalised value), keeping first occurrences."""
    seen: set[tuple[str, str]] = set()
    kept: list[ProfileItem] = []
    for item in items:
        key = dedupe_key(item)
        if key is not None and key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def _items_from_slot_value(slot_name: str, value: object) -> list[ProfileItem]:
    slot = canonical_slot(slot_name)
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [ProfileItem(slot, str(value))]
    if isinstance(value, str):
        return [ProfileItem(slot, part) for part in split_value(slot, value)]
    if isinstance(value, list):
        return [
            ProfileItem(slot, str(element).strip())
            for element in value
            if isinstance(element, (str, int, float)) and not isinstance(element, bool)
        ]
    # Nested objects are not part of the slot template; they carry no countable item.
    return []


def items_from_json_object(profile: dict) -> list[ProfileItem]:
    """Items of a decoded JSON slot template (list values give one item per element)."""
    items: list[ProfileItem] = []
    for slot_name, value in profile.items():
        items.extend(_items_from_slot_value(str(slot_name), value))
    return dedupe_items(items)


def strip_json_fence(text: str) -> str:
    """The body of a ```json fenced block, or the text unchanged."""
    stripped = text.strip()
    match = _JSON_FENCE.match(stripped)
    return match.group("body").strip() if match else stripped


def _try_json_object(text: str) -> dict | None:
    body = strip_json_fence(text)
    if not body.startswith("{"):
        return None
    try:
        decoded = json.loads(body)
    except json.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


def bullet_lines(text: str) -> list[tuple[int, int, list[ProfileItem]]]:
    """Every "- Slot: value" line of `text` as (start, end, its items), character offsets into
    `text` (end excludes the newline); items before de-duplication, in the order written."""
    lines, start = [], 0
    for line in text.splitlines(keepends=True):
        match = _BULLET_LINE.match(line.rstrip("\r\n"))
        if match:
            items = _items_from_slot_value(match.group("slot"), match.group("value"))
            lines.append((start, start + len(line.rstrip("\r\n")), items))
        start += len(line)
    return lines


def _items_from_lines(text: str) -> list[ProfileItem]:
    return [item for _, _, items in bullet_lines(text) for item in items]


def parse_profile(text: str) -> list[ProfileItem]:
    """Items from "- Slot: value" lines or a JSON slot template (optionally ```json fenced).

    Lenient by design: this reads model output, so lines that are not "- Slot: value" bullets
    and JSON values that are neither strings, numbers nor lists are ignored rather than fatal.
    """
    decoded = _try_json_object(text)
    if decoded is not None:
        return items_from_json_object(decoded)
    return dedupe_items(_items_from_lines(text))


def format_profile(items: Sequence[ProfileItem]) -> str:
    """One "- Slot: value" line per item; parse_profile reads it back to the same items."""
    return "\n".join(f"- {item.slot}: {item.value}" for item in items)


def profile_f1(num_matched: int, num_inferred: int, num_true: int) -> float:
    """F1 of an inferred profile against the true one, from item counts.

    P = m / |inferred|, R = m / |true|, F1 = 2PR / (P + R), and 0 when m = 0. The matched
    count m is clamped to min(|inferred|, |true|) so a judge that over-counts matches cannot
    push F1 above 1. The paper's released code counts one line too many when sizing a profile
    and its score can exceed 1; we deliberately do not copy that.
    """
    for name, count in (("num_matched", num_matched), ("num_inferred", num_inferred), ("num_true", num_true)):
        if count < 0:
            raise ValueError(f"profile_f1: {name} must be >= 0, got {count}")
    matched = min(num_matched, num_inferred, num_true)
    if matched == 0:
        return 0.0
    precision = matched / num_inferred
    recall = matched / num_true
    return 2 * precision * recall / (precision + recall)


def item_credits(matched: Sequence[bool], num_true: int) -> list[float]:
    """Each inferred item's share of the profile F1: F1 with the item minus F1 without it.

    F1 = 2m / (|inferred| + |true|), so a matched item is worth about 2 / (|inferred| + |true|)
    and a wrong one costs only the precision it dilutes (2m / ((n + T)(n + T - 1))): the same
    trade-off the turn's F1 makes, told item by item instead of once for the whole block.
    """
    num_matched, num_inferred = sum(matched), len(matched)
    full = profile_f1(num_matched, num_inferred, num_true)
    return [full - profile_f1(num_matched - int(hit), num_inferred - 1, num_true) for hit in matched]
