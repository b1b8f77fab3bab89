"""Reading ALOE's English: sentences, the subject pronoun, verb phrases and lists.

An ALOE paragraph is a handful of sentences with one subject ("She is a 34-year-old ... who
enjoys hiking, yoga, and painting. She lives in ..."). Each sentence is cut into verb phrases
at ", and VERB" / " and VERB" boundaries; the fact rules (profile_rules.py) and the trait rules
(trait_rules.py) then read each phrase by its verb. Values are put in neutral words.
"""

from __future__ import annotations

import re
import unicodedata

_PRONOUN = re.compile(r"\b(she|he|they)\b", re.IGNORECASE)
_GENDER_OF_PRONOUN = {"she": "female", "he": "male", "they": "non-binary"}


def subject_gender(text: str) -> str | None:
    """"female" / "male" / "non-binary" from the paragraph's first subject pronoun, else None."""
    match = _PRONOUN.search(text)
    return _GENDER_OF_PRONOUN[match.group(1).lower()] if match else None


_ADVERBS = (
    "also|often|frequently|now|just|regularly|sometimes|really|especially|always|currently|"
    "actively|still|recently|usually|even|particularly|deeply|happily"
)
_VERBS = (
    "is|are|has|have|holds|owns|enjoys|enjoy|loves|love|likes|like|adores|plays|collects|practices|"
    "knits|builds|brews|grows|writes|rides|runs|takes|makes|participates|attends|volunteers|works|"
    "lives|spends|studied|attended|completed|graduated|specializes|travels|teaches|coaches|hosts|"
    "goes|dreams|streams|organizes|competes|cooks|bakes|paints|swims|sings|reads|customizes|"
    "experiments|creates|designs|sells|performs|exhibits|tours|gives|conducts|shares|plans|got|"
    "never|keeps|sews|draws|composes|surfs|hikes|jogs|trains|visits|tries|finds|speaks|studies|"
    "helps|founded|opened|started|won|published|can|will|would|values|seeks|prefers|tends|dropped|"
    "documents|fosters|mentors|manages|leads|supports|flies|maintains|oversees|captures|encourages|"
    "talks|collaborates|brings|solves|develops"
)
CLAUSE_BOUNDARY = re.compile(
    rf"(?:,\s*(?:and\s+)?|\s+and\s+)(?=(?:(?:{_ADVERBS})\s+)*(?:{_VERBS})\b|(?:{_ADVERBS})\s+\w+s\b)"
    rf"|,?\s+and\s+(?:they|she|he)\s+",
    re.IGNORECASE,
)
_SUBJECT = re.compile(r"^(?:[^,]{0,60},\s*)?(?:she|he|they)(?P<contraction>'s|'re)?\s+", re.IGNORECASE)
LEADING_ADVERBS = re.compile(rf"^(?:(?:{_ADVERBS})\s+)+", re.IGNORECASE)
_UNSPLITTABLE = re.compile(r"arts and crafts|rock and roll|drum and bass|hide and seek", re.IGNORECASE)
_TRAILING_TIME = re.compile(
    r"(?:\s+(?:in (?:their|his|her) (?:free|spare) time|in (?:their|his|her) downtime|"
    r"during (?:their|his|her) free time|on (?:the )?weekends?|"
    r"regularly|frequently|often|daily|for (?:\w+ ){0,2}years|since [\w\s]+|as a hobby|"
    r"every (?:\w+ )?(?:night|day|week|morning|evening)))+$",
    re.IGNORECASE,
)


def _clean_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\bPh\.D\.?", "PhD", text)  # keep the sentence split off its full stops
    return " ".join(text.split())


def paragraph_sentences(text: str) -> list[str]:
    return [sentence.strip().rstrip(".!") for sentence in re.split(r"(?<=[.!?])\s+", _clean_text(text)) if sentence]


def neutral(value: str, article: bool = False) -> str:
    """A value in neutral words: his/her -> their, no trailing time words, no leading a/an
    unless `article`."""
    value = re.sub(r"\b(?:his|her)\b", "their", value.strip(" ,.;"), flags=re.IGNORECASE)
    value = _TRAILING_TIME.sub("", value)
    if not article:
        value = re.sub(r"^(?:a|an)\s+", "", value, flags=re.IGNORECASE)
    return value.strip(" ,.;")


def predicate_segments(sentence: str) -> list[str]:
    """The sentence's verb phrases with the subject pronoun removed ("is a ...", "enjoys ...")."""
    match = _SUBJECT.match(sentence)
    if match is None:
        return []
    predicate = sentence[match.end():]
    if match.group("contraction"):
        predicate = "is " + predicate
    segments = [LEADING_ADVERBS.sub("", segment.strip()) for segment in CLAUSE_BOUNDARY.split(predicate)]
    return [segment for segment in segments if segment]


def _split_on_and(piece: str) -> list[str]:
    """Split "X and Y" unless Y shares X's verb: a gerund phrase on the left and no gerund on the
    right, and a plural (or "family") closing the right side ("attending tech meetups and
    conferences", "fermenting pickles and hot sauces"; but "playing basketball and photography")."""
    parts = re.split(r"\s+and\s+", piece)
    merged = [parts[0]]
    for right in parts[1:]:
        left_words = merged[-1].split()
        right_words = right.split()
        shared_object = (
            len(left_words) >= 2
            and left_words[0].endswith("ing")
            and not right_words[0].endswith("ing")
            and (right_words[-1].endswith("s") or right_words[-1] == "family")
        )
        if shared_object:
            merged[-1] = f"{merged[-1]} and {right}"
        else:
            merged.append(right)
    return merged


def split_list(text: str) -> list[str]:
    if _UNSPLITTABLE.search(text):
        return [neutral(text)]
    pieces = [part for comma_piece in re.split(r",\s*(?:and\s+)?|\s+as well as\s+", text)
              for part in _split_on_and(comma_piece) if part.strip()]
    return [part for part in (neutral(piece) for piece in pieces) if part]


# Verb forms: "plays chess" and "play chess" both become the activity "playing chess".
ACTIVITY_GERUNDS = {
    "plays": "playing", "collects": "collecting", "practices": "practicing", "knits": "knitting",
    "builds": "building", "brews": "brewing", "grows": "growing", "writes": "writing",
    "rides": "riding", "takes": "taking", "makes": "making", "participates": "participating",
    "attends": "attending", "hosts": "hosting", "cooks": "cooking", "bakes": "baking",
    "paints": "painting", "swims": "swimming", "sings": "singing", "reads": "reading",
    "customizes": "customizing", "experiments": "experimenting", "creates": "creating",
    "streams": "streaming", "organizes": "organizing", "competes": "competing", "sews": "sewing",
    "draws": "drawing", "composes": "composing", "surfs": "surfing", "hikes": "hiking",
    "jogs": "jogging", "performs": "performing", "exhibits": "exhibiting", "documents": "documenting",
    "visits": "visiting", "tries": "trying",
}
_BASE_VERB_GERUNDS = {
    "play": "playing", "build": "building", "read": "reading", "cook": "cooking", "travel": "traveling",
    "explore": "exploring", "write": "writing", "paint": "painting", "hike": "hiking", "visit": "visiting",
    "watch": "watching", "try": "trying", "collect": "collecting", "bake": "baking", "swim": "swimming",
    "dance": "dancing", "sing": "singing", "draw": "drawing", "learn": "learning", "make": "making",
    "take": "taking", "run": "running", "attend": "attending", "spend": "spending", "host": "hosting",
    "photograph": "photographing",
}


def as_activity(part: str) -> str:
    """"go fishing" -> "fishing"; "play video games" -> "playing video games"."""
    part = re.sub(r"^go\s+(?=\w+ing\b)", "", part)
    first, _, rest = part.partition(" ")
    gerund = _BASE_VERB_GERUNDS.get(first.lower())
    return f"{gerund} {rest}".strip() if gerund else part
