"""The rule-based reader of ALOE personality paragraphs: trait words ("curious", "good listener").

ALOE writes "She is <trait>, <explanation>." so the first part after "is" is read generously and
later parts only as single trait-like words; "values X", "has a Y sense of humor" and "her Z
nature" give traits too.
"""

from __future__ import annotations

import re

from rlpa_jax.dialogue.personas.english import paragraph_sentences, predicate_segments

_INTENSIFIERS = re.compile(
    r"^(?:(?:very|highly|really|quite|extremely|incredibly|remarkably|deeply|also|always|truly|so|"
    r"a little bit|a little|a bit|generally|usually|fairly|pretty|super|particularly|rather|somewhat|"
    r"genuinely|consistently|surprisingly|naturally|exceptionally|an|a)\s+)+",
    re.IGNORECASE,
)
_TRAIT_CUT = re.compile(
    r"\s+(?:in|to|with|at|for|about|of|when|than|from|by|towards|despite|who|that|which|on|as)\b.*$",
    re.IGNORECASE,
)
_TRAIT_NOUNS = frozenset({"leader", "listener", "communicator", "conversationalist", "thinker", "planner",
                          "friend", "problem-solver", "storyteller"})
_GENERIC_NOUNS = re.compile(r"\s+(?:individual|person|soul|type|guy|woman|man)$", re.IGNORECASE)
_NOT_TRAITS = frozenset({"known", "able", "there", "full", "someone", "one", "not", "the", "always", "never",
                         "ready", "willing", "free", "home", "in", "on", "quick"})
_ING_TRAITS = frozenset({"caring", "nurturing", "outgoing", "easygoing", "charming", "inspiring", "hardworking",
                         "understanding", "forgiving", "daring", "amusing", "engaging", "calming", "giving",
                         "accommodating", "enterprising", "uplifting", "easy-going", "fun-loving",
                         "hard-working"})
_VALUE_TRAITS = {"creativity": "creative", "honesty": "honest", "loyalty": "loyal",
                 "collaboration": "collaborative", "independence": "independent", "punctuality": "punctual",
                 "kindness": "kind", "organization": "organized", "fairness": "fair"}
_QUALITY_NOUNS = {"spirit": None, "mind": None, "side": None, "nature": None, "presence": None,
                  "personality": None, "attitude": None, "heart": None, "wit": "witty"}


def _looks_like_trait(word: str) -> bool:
    lowered = word.lower()
    if lowered in _NOT_TRAITS or not re.fullmatch(r"[a-z][a-z'-]*", lowered):
        return False
    if lowered.endswith("s") and not lowered.endswith(("ous", "ss")):
        return False
    return not lowered.endswith("ing") or lowered in _ING_TRAITS or "-" in lowered


def _trait_from_chunk(chunk: str, leading: bool) -> str | None:
    """A trait from one coordinated chunk; `leading` chunks (right after "is") may be 2 words."""
    chunk = re.sub(r"^and\s+", "", chunk.strip())
    if leading:
        chunk = _INTENSIFIERS.sub("", chunk)
    chunk = _GENERIC_NOUNS.sub("", _TRAIT_CUT.sub("", chunk)).strip(" .")
    words = chunk.split()
    if len(words) == 1 and _looks_like_trait(words[0]):
        return words[0].lower()
    if leading and len(words) == 2 and _looks_like_trait(words[1]):
        first = words[0].lower()
        if words[1].lower() in _TRAIT_NOUNS or first.endswith("ly") or first in ("great", "good", "natural",
                                                                                 "natural-born", "excellent"):
            return f"{first} {words[1].lower()}"
    return None


def _traits_after_is(phrase: str) -> list[str]:
    """Traits of "is curious and open-minded, rational and ...".

    ALOE writes "She is <trait>, <explanation>." so only the first comma part is read generously;
    later parts must be single trait-like words ("down-to-earth, humble") and reading stops at the
    first explanation ("patient, never rushing things").
    """
    traits: list[str] = []
    for index, part in enumerate(phrase.split(",")):
        for chunk in re.split(r"\s+and\s+", part):
            trait = _trait_from_chunk(chunk, leading=index == 0)
            if trait:
                traits.append(trait)
            elif index > 0:
                break
    return traits


def _trait_segment(segment: str) -> list[str]:
    match = re.match(r"^(?P<verb>is|can be|values|has)\s+(?P<obj>.+)$", segment, re.IGNORECASE)
    if match is None:
        return []
    verb, obj = match.group("verb").lower(), match.group("obj")
    if verb in ("is", "can be"):
        return _traits_after_is(obj)
    if verb == "values":
        noun = obj.split()[0].lower().strip(",.")
        return [_VALUE_TRAITS.get(noun, f"values {noun}")]
    humor = re.match(r"^an?\s+(?P<adj>[\w-]+)\s+(?P<noun>sense of humou?r|memory)\b", obj, re.IGNORECASE)
    if humor:
        return [f"{humor.group('adj').lower()} {humor.group('noun').lower()}"]
    quality = re.match(r"^an?\s+(?P<adj>[\w-]+)\s+(?P<noun>\w+)\b", obj, re.IGNORECASE)
    if quality and quality.group("noun").lower() in _QUALITY_NOUNS:
        replacement = _QUALITY_NOUNS[quality.group("noun").lower()]
        return [replacement or quality.group("adj").lower()]
    return []


def personality_traits(personality_text: str) -> list[str]:
    """Trait words of an ALOE personality paragraph ("curious", "well-organized", "good listener")."""
    traits: list[str] = []
    for sentence in paragraph_sentences(personality_text):
        possessive = re.match(r"^(?:her|his|their) (?P<adj>[\w-]+) (?:nature|thinking|spirit)\b", sentence, re.I)
        if possessive:
            traits.append(possessive.group("adj").lower())
        for segment in predicate_segments(sentence):
            traits.extend(_trait_segment(segment))
    return traits
