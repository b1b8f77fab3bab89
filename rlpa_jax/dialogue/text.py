"""Words and text heuristics shared by the judges, the simulated users and the teacher.

Everything here reads text as plain data: stems and content words, sentences, praise counts,
near-duplicates, instruction-like text aimed at a grader, and what a user sees of an assistant
message (its <response>, never its <profile>).
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

from rlpa_jax.dialogue.chat import Message
from rlpa_jax.dialogue.profile import normalize_text

STOPWORDS = frozenset(
    """
    a about above after again all also am an and any are as at be because been before being
    both but by can could did do does doing don during each few for from had has have having
    he her here hers him his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours out over own same she should so some
    such than that the their theirs them then there these they this those through to too
    under until up very was we were what when which while who whom why will with would you
    your yours yourself s t m re ve ll d oh hi hello hey yeah yes ok okay sure well really
    like love thanks thank think know get got make lot lots thing things something anything
    sound sounds nice good great cool tell share hear bit little much many kind one let us
    enjoy actually maybe always often usually way today day
    """.split()
)

PRAISE_WORDS = frozenset(
    """
    amazing wonderful fantastic incredible awesome brilliant impressive excellent outstanding
    remarkable extraordinary marvelous marvellous superb admirable inspiring genius phenomenal
    spectacular stunning fabulous terrific perfect great beautiful magnificent exceptional
    """.split()
)

# Words that point a message at one profile slot ("what do you do for work?" -> Occupation).
SLOT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "Age": ("age", "old", "young", "born", "birthday", "older", "younger"),
    "Gender": ("gender", "woman", "man", "guy", "girl", "lady"),
    "Interests": ("interest", "hobby", "hobbies", "fun", "free", "weekend", "pastime", "passion", "leisure"),
    "Education Background": (
        "education", "study", "studied", "school", "college", "university", "degree", "major", "graduate", "student",
    ),
    "Personality Traits": (
        "personality", "describe", "character", "introvert", "extrovert", "temperament", "trait", "traits",
    ),
    "Occupation": ("occupation", "work", "job", "career", "profession", "office", "company", "colleague", "boss"),
    "Marital Status": (
        "marital", "married", "marriage", "partner", "spouse", "single", "relationship", "wife", "husband", "dating",
    ),
    "Family Background": (
        "family", "kid", "kids", "child", "children", "parent", "parents", "sibling", "siblings", "brother", "sister",
        "mom", "dad", "mother", "father", "raised", "grew",
    ),
    "Location": ("location", "live", "city", "town", "located", "hometown", "country", "area", "neighborhood", "where"),
    "Other Information": ("information", "facts"),
}

INJECTION_PATTERNS = (
    r"\bignore (all |the )?(above|previous|prior|earlier)",
    r"\bdisregard (all |the )?(above|previous|prior|instructions)",
    r"\b(system|judge) prompt\b",
    r"\boutput \\?boxed",
    r"\\boxed",
    r"\byou are (now )?(a|the) judge\b",
    r"\b(score|rate|grade) (this|my|the) (reply|response|answer)\b",
    r"\b(score|rate|grade) (this|it|me) (as )?(a |an )?(1|one|10|full|perfect|maximum)\b",
    r"\b(system|judge|grader|evaluator|instruction)s?\s*:",
    r"\b(score|reward|rating|grade|verdict)\s*(=|:)",
)

_WORD_RE = re.compile(r"[a-z0-9]+")
_RESPONSE_BLOCK_RE = re.compile(r"<response>(.*?)</response>", re.DOTALL | re.IGNORECASE)
_PROFILE_BLOCK_RE = re.compile(r"<profile>.*?</profile>", re.DOTALL | re.IGNORECASE)


def stem(word: str) -> str:
    """A tiny suffix stripper so 'hiking'/'hikes'/'hike' and 'works'/'working' meet."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, replacement in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            word = word[: len(word) - len(suffix)] + replacement
            if suffix in ("ing", "ed") and len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of `text`, in order."""
    return _WORD_RE.findall(text.lower())


def stemmed_words(text: str) -> set[str]:
    """All words of `text`, stemmed, stopwords kept (for keyword spotting)."""
    return {stem(word) for word in words(text)}


def content_tokens(text: str) -> set[str]:
    """Stemmed words that carry meaning (stopwords and single letters dropped)."""
    return {stem(word) for word in words(text) if word not in STOPWORDS and (len(word) > 1 or word.isdigit())}


# The stems behind message_topics (and matching.slot_keyword_stems), built once.
SLOT_KEYWORD_STEMS = {slot: frozenset(stem(word) for word in keywords) for slot, keywords in SLOT_KEYWORDS.items()}


def message_topics(text: str) -> set[str]:
    """Canonical slots that `text` talks about, by slot keywords."""
    stems = stemmed_words(text)
    return {slot for slot, keywords in SLOT_KEYWORD_STEMS.items() if stems & keywords}


def sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation; pieces without a word are dropped."""
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [piece.strip() for piece in pieces if _WORD_RE.search(piece.lower())]


def praise_count(text: str) -> int:
    return sum(1 for word in words(text) if word in PRAISE_WORDS)


def is_flattery_heavy(text: str) -> bool:
    """Three or more praise words, or two that make up a large share of a short reply."""
    count = praise_count(text)
    total = max(1, len(words(text)))
    return count >= 3 or (count >= 2 and count / total >= 0.15)


def near_duplicate(first: str, second: str, threshold: float = 0.85) -> bool:
    """Whether two replies are (almost) the same text after normalisation."""
    a, b = normalize_text(first), normalize_text(second)
    if not a or not b:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= threshold


def looks_like_injection(text: str) -> bool:
    """Instruction-like text aimed at a grader (reward-hacking attempt)."""
    lowered = text.lower()
    return any(re.search(pattern, lowered) for pattern in INJECTION_PATTERNS)


def visible_reply_text(content: str) -> str:
    """What a user sees of an assistant message: the <response> text, never the <profile>."""
    blocks = _RESPONSE_BLOCK_RE.findall(content)
    if blocks:
        return blocks[-1].strip()
    without_profile = _PROFILE_BLOCK_RE.sub(" ", content)
    return re.sub(r"</?\s*(profile|response)\s*>", " ", without_profile, flags=re.IGNORECASE).strip()


def assistant_replies(history: Sequence[Message]) -> list[str]:
    return [visible_reply_text(message.content) for message in history if message.role == "assistant"]


def user_messages(history: Sequence[Message]) -> list[str]:
    return [message.content for message in history if message.role == "user"]

