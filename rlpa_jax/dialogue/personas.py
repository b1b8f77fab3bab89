"""Personas: ALOE files, pairing, conversion to slot profiles, and synthetic personas.

RLPA builds each simulated user from an ALOE (profile paragraph, personality paragraph) pair and
a structured slot profile of that pair, which is the ground truth the Profile Reward scores
against. Two converters produce that slot profile:

- extract_profile_rules: an embedded, rule-based reader of ALOE's regular English (no network);
- LLMProfileExtractor: an OpenAI-compatible model filling the JSON slot template, validated,
  retried on invalid output and cached to JSONL so a pool is converted once.

synthetic_personas composes personas from small vocabularies for the embedded world, written so
that the rule-based extractor recovers exactly their true items.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.llm import LLMCallError, LLMClient
from rlpa_jax.dialogue.profile import ProfileItem, dedupe_items, items_from_json_object, strip_json_fence


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

_PRONOUN = re.compile(r"\b(she|he|they)\b", re.IGNORECASE)
_GENDER_OF_PRONOUN = {"she": "female", "he": "male", "they": "non-binary"}


def subject_gender(text: str) -> str | None:
    """"female" / "male" / "non-binary" from the paragraph's first subject pronoun, else None."""
    match = _PRONOUN.search(text)
    return _GENDER_OF_PRONOUN[match.group(1).lower()] if match else None


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


# ---------------------------------------------------------------------------
# Rule-based extraction (ALOE's English)
#
# An ALOE profile is a handful of sentences with one subject ("She is a 34-year-old ... who enjoys
# hiking, yoga, and painting. She lives in ..."). Each sentence is cut into verb phrases at
# ", and VERB" / " and VERB" boundaries and each phrase is read by the rule for its verb. Phrases
# no rule recognises are skipped: a missing item costs recall, a wrong one costs the reward's
# precision for every policy trained on it.

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
_CLAUSE_BOUNDARY = re.compile(
    rf"(?:,\s*(?:and\s+)?|\s+and\s+)(?=(?:(?:{_ADVERBS})\s+)*(?:{_VERBS})\b|(?:{_ADVERBS})\s+\w+s\b)"
    rf"|,?\s+and\s+(?:they|she|he)\s+",
    re.IGNORECASE,
)
_SUBJECT = re.compile(r"^(?:[^,]{0,60},\s*)?(?:she|he|they)(?P<contraction>'s|'re)?\s+", re.IGNORECASE)
_LEADING_ADVERBS = re.compile(rf"^(?:(?:{_ADVERBS})\s+)+", re.IGNORECASE)
_OBJECT_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+(?=(?:a|an|one|two|three|four|five|six|\d+)\b)")
# Companions in "lives with her husband and their daughter": split before a determiner only, so
# "two cats named Pixel and Scribble" and "her golden retriever, Daisy" stay whole.
_COMPANION_SPLIT = re.compile(
    r"(?:,\s*(?:and\s+)?|\s+and\s+)(?=(?:a|an|one|two|three|four|five|six|\d+|his|her|their|my)\b)"
)
_UNSPLITTABLE = re.compile(r"arts and crafts|rock and roll|drum and bass|hide and seek", re.IGNORECASE)
_TRAILING_TIME = re.compile(
    r"(?:\s+(?:in (?:their|his|her) (?:free|spare) time|in (?:their|his|her) downtime|"
    r"during (?:their|his|her) free time|on (?:the )?weekends?|"
    r"regularly|frequently|often|daily|for (?:\w+ ){0,2}years|since [\w\s]+|as a hobby|"
    r"every (?:\w+ )?(?:night|day|week|morning|evening)))+$",
    re.IGNORECASE,
)
_ANIMALS = re.compile(
    r"\b(?:cats?|kittens?|dogs?|pupp(?:y|ies)|parrots?|ferrets?|rabbits?|hamsters?|turtles?|tortoises?|"
    r"snakes?|fish|horses?|birds?|retrievers?|dachshunds?|beagles?|bulldogs?|pit bulls?|labradors?|"
    r"poodles?|corgis?|terriers?|huskies|husky|lizards?|iguanas?|geckos?|guinea pigs?|chinchillas?|"
    r"hedgehogs?|canar(?:y|ies)|budgies?|parakeets?|cockatiels?|aquarium)\b",
    re.IGNORECASE,
)
_RELATIVES = re.compile(
    r"\b(?:children|child|kids?|sons?|daughters?|sisters?|brothers?|twins?|grandchildren|grandsons?|"
    r"granddaughters?|toddler|siblings?|wife|husband|girlfriend|boyfriend|fianc[ée]e?|parents|mother|"
    r"father|mom|dad|stepsons?|stepdaughters?|baby|nephews?|nieces?)\b",
    re.IGNORECASE,
)
_HOUSEMATES = re.compile(
    r"\b(?:roommates?|friends?|bandmates?|housemates?|flatmates?|gamers|partner|family|colleagues?)\b",
    re.IGNORECASE,
)
_EDUCATION_WORDS = re.compile(
    r"\b(?:degree|diploma|certificate|certification|mba|phd|ph\.d|doctorate|bachelor'?s|master'?s|"
    r"associate)\b",
    re.IGNORECASE,
)
_ACTIVITY_GERUNDS = {
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
_LIKE_VERBS = frozenset({"enjoys", "enjoy", "loves", "love", "likes", "like", "adores"})
_OTHER_VERBS = frozenset({"volunteers", "specializes", "teaches", "coaches", "dreams", "plans", "speaks",
                          "fosters", "mentors", "founded", "opened", "designs", "sells", "gives", "conducts"})


def _clean_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\bPh\.D\.?", "PhD", text)  # keep the sentence split off its full stops
    return " ".join(text.split())


def _sentences(text: str) -> list[str]:
    return [sentence.strip().rstrip(".!") for sentence in re.split(r"(?<=[.!?])\s+", _clean_text(text)) if sentence]


def _neutral(value: str, article: bool = False) -> str:
    """A value in neutral words: his/her -> their, no trailing time words, no leading a/an
    unless `article`."""
    value = re.sub(r"\b(?:his|her)\b", "their", value.strip(" ,.;"), flags=re.IGNORECASE)
    value = _TRAILING_TIME.sub("", value)
    if not article:
        value = re.sub(r"^(?:a|an)\s+", "", value, flags=re.IGNORECASE)
    return value.strip(" ,.;")


def _predicate_segments(sentence: str) -> list[str]:
    """The sentence's verb phrases with the subject pronoun removed ("is a ...", "enjoys ...")."""
    match = _SUBJECT.match(sentence)
    if match is None:
        return []
    predicate = sentence[match.end():]
    if match.group("contraction"):
        predicate = "is " + predicate
    segments = [_LEADING_ADVERBS.sub("", segment.strip()) for segment in _CLAUSE_BOUNDARY.split(predicate)]
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


def _split_list(text: str) -> list[str]:
    if _UNSPLITTABLE.search(text):
        return [_neutral(text)]
    pieces = [part for comma_piece in re.split(r",\s*(?:and\s+)?|\s+as well as\s+", text)
              for part in _split_on_and(comma_piece) if part.strip()]
    return [part for part in (_neutral(piece) for piece in pieces) if part]


_OBJECT_NEEDING_GERUNDS = frozenset({
    "playing", "making", "taking", "going", "participating", "attending", "trying", "visiting", "hosting",
    "creating", "organizing", "collecting", "building", "riding", "exhibiting", "documenting", "spending",
})
_BASE_VERB_GERUNDS = {
    "play": "playing", "build": "building", "read": "reading", "cook": "cooking", "travel": "traveling",
    "explore": "exploring", "write": "writing", "paint": "painting", "hike": "hiking", "visit": "visiting",
    "watch": "watching", "try": "trying", "collect": "collecting", "bake": "baking", "swim": "swimming",
    "dance": "dancing", "sing": "singing", "draw": "drawing", "learn": "learning", "make": "making",
    "take": "taking", "run": "running", "attend": "attending", "spend": "spending", "host": "hosting",
    "photograph": "photographing",
}


def _as_activity(part: str) -> str:
    """"go fishing" -> "fishing"; "play video games" -> "playing video games"."""
    part = re.sub(r"^go\s+(?=\w+ing\b)", "", part)
    first, _, rest = part.partition(" ")
    gerund = _BASE_VERB_GERUNDS.get(first.lower())
    return f"{gerund} {rest}".strip() if gerund else part


def _interests(text: str) -> list[ProfileItem]:
    text = re.sub(r"^to\s+", "", text.strip())
    text = re.sub(r"\s+(?:for|with) them\b", "", text)
    parts = [_as_activity(part) for part in _split_list(text)]
    # A part opening with an adverb is a verb phrase the clause split did not know ("often
    # collaborates"); a part about "it"/"them" or a bare "playing" means nothing on its own.
    return [
        ProfileItem("Interests", part)
        for part in parts
        if not _LEADING_ADVERBS.match(part)
        and not re.search(r"^\w+ (?:it|them)\b", part)
        and part not in _OBJECT_NEEDING_GERUNDS
    ]


def _pet_or_family(phrase: str, prefix: str = "") -> list[ProfileItem]:
    """A pet (Other Information) or relatives (Family Background) when the phrase's head names one:
    "a yearly tradition of making quilts for her grandchildren" is about neither."""
    value = _neutral(phrase)
    head = re.split(r"\s+(?:who|of|for|in|at|that|where)\b", phrase, maxsplit=1)[0]
    if _ANIMALS.search(head):
        value = re.sub(r",\s+([A-Z][\w-]*)$", r" named \1", re.sub(r"^their\s+", "", value))
        return [ProfileItem("Other Information", value)]
    if _RELATIVES.search(head):
        items = [ProfileItem("Family Background", prefix + value)]
        if re.search(r"\b(?:wife|husband)\b", phrase, re.IGNORECASE):
            items.append(ProfileItem("Marital Status", "married"))
        elif re.search(r"\b(?:girlfriend|boyfriend)\b", phrase, re.IGNORECASE):
            items.append(ProfileItem("Marital Status", "in a relationship"))
        return items
    return []


def _relatives_after_with(rest: str) -> list[ProfileItem]:
    """Family members in "... with two teenage sons" or "... to a nurse" after a marital word."""
    items: list[ProfileItem] = []
    spouse = re.match(r"^\s*to\s+(?P<who>an?\s+[\w\s'-]+?)(?:\s+with\b|,|$)", rest)
    if spouse:
        items.append(ProfileItem("Family Background", "partner is " + _neutral(spouse.group("who"), article=True)))
    with_match = re.search(r"\bwith\s+(?P<who>.+)$", rest)
    if with_match:
        for part in _OBJECT_SPLIT.split(with_match.group("who")):
            items.extend(_pet_or_family(part))
    return items


_MARITAL_PATTERNS = (
    (re.compile(r"^(?:got|been) married\b|^married\b", re.I), "married"),
    (re.compile(r"^single\b", re.I), "single"),
    (re.compile(r"^divorced\b", re.I), "divorced"),
    (re.compile(r"^widowed\b|^a widow(?:er)?\b", re.I), "widowed"),
    (re.compile(r"^engaged\b", re.I), "engaged"),
    (re.compile(r"^in an? (?:[\w-]+ )?relationship\b", re.I), None),
)


def _marital_items(phrase: str) -> list[ProfileItem] | None:
    """Marital status (and family) from "married with two kids", "single mother of two", ...; None if not marital."""
    for pattern, status in _MARITAL_PATTERNS:
        match = pattern.match(phrase)
        if match is None:
            continue
        rest = phrase[match.end():]
        items = [ProfileItem("Marital Status", status or match.group(0).strip())]
        parent = re.match(r"^\s+((?:mother|father|parent|mom|dad)\b.*)$", rest, re.IGNORECASE)
        if parent:
            items.append(ProfileItem("Family Background", _neutral(parent.group(1))))
        elif status in (None, "engaged"):
            partner = re.match(r"^\s*(?:to|with)\s+(?P<who>.+)$", rest)
            if partner:
                partner_text = _neutral(partner.group("who"), article=True)
                items.append(ProfileItem("Family Background", "partner is " + partner_text))
        else:
            items.extend(_relatives_after_with(rest))
        return items
    return None


def _occupation_phrase_items(rest: str) -> list[ProfileItem]:
    """Items from what follows "is a 34-year-old": the occupation and its trailing clauses."""
    head, _, relative = rest.partition(" who ")
    parts = [part.strip() for part in head.split(",") if part.strip()]
    items: list[ProfileItem] = []
    first = parts[0] if parts else ""
    occupation = re.split(r"\s+(?:at|studying|majoring|working|with|in|for|from)\b", first, maxsplit=1)
    marital = _marital_items(first)
    if marital is not None:
        items.extend(marital)
    elif occupation[0]:
        items.append(ProfileItem("Occupation", _neutral(occupation[0])))
    tail = first[len(occupation[0]):].strip()
    for clause in ([tail] if tail else []) + parts[1:]:
        items.extend(_trailing_clause_items(clause))
    if relative:
        for segment in _CLAUSE_BOUNDARY.split(relative):
            items.extend(_segment_items(_LEADING_ADVERBS.sub("", segment.strip())))
    return items


def _trailing_clause_items(clause: str) -> list[ProfileItem]:
    clause = re.sub(r"^and\s+", "", clause.strip())
    if re.match(r"^(?:studying|majoring in|pursuing)\b", clause):
        return [ProfileItem("Education Background", _neutral(clause))]
    working = re.match(r"^(?:working|who works)\s+(?:part-time\s+)?as\s+(?P<job>.+)$", clause)
    if working:
        return [ProfileItem("Occupation", _neutral(working.group("job")))]
    if clause.startswith("at "):
        return [ProfileItem("Other Information", "works " + _neutral(clause))]
    avid = re.match(r"^an?\s+(?:avid|passionate|amateur|keen)\s+(?P<what>.+)$", clause)
    if avid:
        return [ProfileItem("Interests", _avid_interest(avid.group("what")))]
    return _segment_items(clause)


def _avid_interest(noun_phrase: str) -> str:
    """"reader of mystery novels" -> "reading mystery novels"; "fan of jazz" -> "jazz"."""
    phrase = re.sub(r"\s+who\s+.*$", "", noun_phrase.strip())
    reader = re.match(r"^reader of (.+)$", phrase)
    if reader:
        return "reading " + _neutral(reader.group(1))
    fan = re.match(r"^fan of (.+)$", phrase)
    return _neutral(fan.group(1) if fan else phrase)


_ItemRule = tuple[re.Pattern[str], Callable[[re.Match[str]], list[ProfileItem]]]
# Rules for "is ..." phrases other than the age/occupation opener, tried in order.
_IS_RULES: tuple[_ItemRule, ...] = (
    (re.compile(r"^an?\s+(?P<single>single\s+)?"
                r"(?P<v>(?:mother|father|parent|grandmother|grandfather|grandparent)\b.*)$"),
     lambda m: [ProfileItem("Family Background", _neutral(m.group("v")))]
     + ([ProfileItem("Marital Status", "single")] if m.group("single") else [])),
    (re.compile(r"^(?:a |an )?(?P<v>vegan|vegetarian|pescatarian|(?:gluten|lactose) intolerant)\b(?P<rest>.*)$"),
     lambda m: [ProfileItem("Other Information", m.group("v"))] + _lover_items(m.group("rest"))),
    (re.compile(r"^(?P<v>fluent in .+|learning .+|training for .+|an advocate for .+|a volunteer .+)$"),
     lambda m: [ProfileItem("Other Information", _neutral(m.group("v")))]),
    (re.compile(r"^(?:an?\s+)?(?:active\s+)?(?:part|member) of (?P<v>.+)$"),
     lambda m: [ProfileItem("Other Information", "member of " + _neutral(m.group("v")))]),
    (re.compile(r"^(?:passionate about|interested in) (?P<v>.+)$"),
     lambda m: _interests(m.group("v"))),
    (re.compile(r"^(?:deeply )?involved in (?P<v>.+)$"),
     lambda m: [ProfileItem("Other Information", "involved in " + _neutral(m.group("v")))]),
    (re.compile(r"^(?:studying|majoring in|pursuing|completing|currently studying) .+$"),
     lambda m: [ProfileItem("Education Background", _neutral(m.group(0)))]),
    (re.compile(r"^(?:originally )?from (?P<v>[A-Z].+)$"),
     lambda m: [ProfileItem("Location", _neutral(m.group("v")))]),
    (re.compile(r"^an?\s+(?:avid|passionate|amateur|keen)\s+(?:amateur\s+)?(?P<v>.+)$"),
     lambda m: [ProfileItem("Interests", _avid_interest(m.group("v")))]),
)


def _is_items(phrase: str) -> list[ProfileItem]:
    """Items of an "is ..." phrase: marital status first, then the first matching rule."""
    marital = _marital_items(phrase)
    if marital is not None:
        return marital
    for pattern, build in _IS_RULES:
        match = pattern.match(phrase)
        if match:
            return build(match)
    return []


def _lover_items(rest: str) -> list[ProfileItem]:
    lover = re.match(r"^,\s*(?P<v>[\w\s-]+?)\s+lover$", rest)
    return [ProfileItem("Interests", lover.group("v").replace("-", " "))] if lover else []


def _has_items(obj: str) -> list[ProfileItem]:
    """Rules for "has ..." / "owns ..." / "holds ..." objects."""
    been = re.match(r"^been\s+(?P<v>\w+ing\b.*)$", obj)
    if been:
        return _interests(been.group("v"))
    if re.match(r"^been married\b", obj):
        return [ProfileItem("Marital Status", "married")]
    if re.match(r"^(?:visited|been to|traveled to)\s+", obj):
        return [ProfileItem("Other Information", "has " + _neutral(obj))]
    items: list[ProfileItem] = []
    for part in _OBJECT_SPLIT.split(obj):
        items.extend(_has_object_items(part.strip()))
    return items


def _has_object_items(part: str) -> list[ProfileItem]:
    part = re.sub(r"\s+where\s+.*$", "", part)
    if _EDUCATION_WORDS.search(part) and not re.search(r"\bbelt\b", part):
        return [ProfileItem("Education Background", _neutral(part))]
    collection = re.search(r"\bcollection of (?P<v>.+)$", part)
    if collection:
        return [ProfileItem("Interests", "collecting " + _neutral(collection.group("v")))]
    interest = re.match(r"^an?\s+(?:strong\s+|keen\s+|deep\s+)?(?:interest in|passion for)\s+(?P<v>.+)$", part)
    if interest:
        return _interests(interest.group("v"))
    job = re.match(r"^an?\s+part-time job\s+(?P<v>(?:at|in|as)\s+.+)$", part)
    if job:
        where = _neutral(job.group("v"))
        if where.startswith("as "):
            return [ProfileItem("Occupation", "part-time " + _neutral(where[3:]))]
        return [ProfileItem("Occupation", "part-time job " + where)]
    if re.match(r"^an?\s+(?:black belt|goal|dream)\b", part):
        return [ProfileItem("Other Information", _neutral(part))]
    if re.search(r"\b(?:blog|youtube channel|instagram|podcast|online shop|side business)\b", part, re.IGNORECASE):
        return [ProfileItem("Other Information", "has " + _neutral(part))]
    return _pet_or_family(part)


def _lives_items(obj: str) -> list[ProfileItem]:
    """Location, family, pets and flatmates from "lives in X with Y" / "lives with Y in X"."""
    items: list[ProfileItem] = []
    where = re.match(r"^(?P<prep>in|near|by|on)\s+(?P<place>.+?)(?:\s+with\s+(?P<who>.+))?$", obj)
    if where:
        # "in a loft" names the place; "near the beach" keeps its preposition to make sense.
        place = where.group("place") if where.group("prep") == "in" else obj.split(" with ")[0]
        items.append(ProfileItem("Location", _neutral(place)))
        who = where.group("who")
    else:
        with_match = re.match(r"^with\s+(?P<who>.+?)(?:\s+in\s+(?P<place>(?:a|an|the)\s+.+))?$", obj)
        if with_match is None:
            return []
        who = with_match.group("who")
        if with_match.group("place"):
            items.append(ProfileItem("Location", _neutral(with_match.group("place"))))
    if not who:
        return items
    if not (_ANIMALS.search(who) or _RELATIVES.search(who) or _HOUSEMATES.search(who)):
        if items:  # "an apartment with a view of the skyline" describes the place
            items[0] = ProfileItem("Location", f"{items[0].value} with {_neutral(who, article=True)}")
        return items
    for companion in _COMPANION_SPLIT.split(who):
        if _ANIMALS.search(companion) or _RELATIVES.search(companion):
            items.extend(_pet_or_family(companion, prefix="lives with "))
        elif _HOUSEMATES.search(companion):
            items.append(ProfileItem("Other Information", "lives with " + _neutral(companion)))
    return items


def _works_items(obj: str) -> list[ProfileItem]:
    as_job = re.match(r"^(?P<part>part-time\s+)?as\s+(?P<job>.+)$", obj)
    if as_job:
        prefix = "part-time " if as_job.group("part") else ""
        return [ProfileItem("Occupation", prefix + _neutral(as_job.group("job")))]
    part_time = re.match(r"^part-time\s+(?P<where>(?:at|in)\s+.+)$", obj)
    if part_time:
        return [ProfileItem("Occupation", "part-time job " + _neutral(part_time.group("where")))]
    if re.match(r"^(?:at|for|in|with)\s+", obj):
        return [ProfileItem("Other Information", "works " + _neutral(obj))]
    return []


def _education_verb_items(verb: str, obj: str) -> list[ProfileItem]:
    if verb == "never":
        went = re.match(r"^went to (?P<v>college|university|school)\b", obj)
        return [ProfileItem("Education Background", "never went to " + went.group("v"))] if went else []
    return [ProfileItem("Education Background", f"{verb} {_neutral(obj)}")]


def _segment_items(segment: str) -> list[ProfileItem]:
    """Items of one verb phrase ("enjoys hiking and yoga", "has a dog named Max", ...)."""
    match = re.match(r"^(?P<verb>[\w'-]+)\s+(?P<obj>.+)$", segment.strip())
    if match is None:
        return []
    verb, obj = match.group("verb").lower(), _LEADING_ADVERBS.sub("", match.group("obj").strip())
    age = re.match(r"^(?:an?\s+)(?P<age>\d{1,3})-year-old\s+(?P<rest>.+)$", obj)
    if verb == "is" and age:
        return [ProfileItem("Age", age.group("age"))] + _occupation_phrase_items(age.group("rest"))
    if verb == "is":
        return _is_items(obj)
    if verb in _LIKE_VERBS:
        return _interests(obj)
    if verb in ("has", "have", "owns", "holds"):
        return _has_items(obj) if verb != "owns" or _ANIMALS.search(obj) else [
            ProfileItem("Other Information", "owns " + _neutral(obj))]
    if verb == "lives":
        return _lives_items(obj)
    if verb == "works":
        return _works_items(obj)
    if verb in ("studied", "attended", "completed", "graduated", "never", "dropped"):
        return _education_verb_items(verb, obj)
    if verb == "got" and obj.startswith("married"):
        return [ProfileItem("Marital Status", "married")]
    if verb == "runs":
        if re.search(r"\bmarathons?\b|^in\b|^with\b|^daily\b", obj):
            return _interests("running " + obj)
        return [ProfileItem("Other Information", "runs " + _neutral(obj))]
    if verb == "travels":
        if re.search(r"\bfor (?:work|competitions|matches|archaeological)\b", obj):
            return [ProfileItem("Other Information", "travels " + _neutral(obj))]
        return _interests("traveling " + obj)
    if verb == "goes":
        gerund = re.match(r"^(?:on\s+)?(?P<v>\w+ing\b.*)$", obj)
        return _interests(gerund.group("v")) if gerund else []
    if verb == "spends":
        spend = re.match(
            r"^(?:their |his |her |most )?(?:free |spare |most of (?:his|her) )?"
            r"(?:time|weekends|mornings|evenings|summers|days)\s+(?P<v>\w+ing\b.*)$", obj)
        return _interests(spend.group("v")) if spend else []
    if verb in _ACTIVITY_GERUNDS:
        return _interests(f"{_ACTIVITY_GERUNDS[verb]} {obj}")
    if verb in _OTHER_VERBS:
        # A trailing ", teaching kids about ..." elaborates; the fact is the part before it.
        return [ProfileItem("Other Information", f"{verb} {_neutral(obj.split(', ')[0])}")]
    return []


# Personality traits ---------------------------------------------------------

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
    for sentence in _sentences(personality_text):
        possessive = re.match(r"^(?:her|his|their) (?P<adj>[\w-]+) (?:nature|thinking|spirit)\b", sentence, re.I)
        if possessive:
            traits.append(possessive.group("adj").lower())
        for segment in _predicate_segments(sentence):
            traits.extend(_trait_segment(segment))
    return traits


def extract_profile_rules(profile_text: str, personality_text: str) -> list[ProfileItem]:
    """The slot profile of an ALOE-style (profile, personality) pair, by rules; no network.

    Reads age ("34-year-old"), gender (subject pronoun), occupation, education, interests,
    marital status and family, pets and other facts (Other Information), location, and
    personality traits from the personality paragraph. Phrases no rule recognises are skipped.
    """
    items: list[ProfileItem] = []
    gender = subject_gender(profile_text)
    if gender:
        items.append(ProfileItem("Gender", gender))
    for sentence in _sentences(profile_text):
        for segment in _predicate_segments(sentence):
            items.extend(_segment_items(segment))
    if not any(item.slot == "Age" for item in items):
        age = re.search(r"\b(\d{1,3})-year-old\b", profile_text)
        if age:
            items.append(ProfileItem("Age", age.group(1)))
    items.extend(ProfileItem("Personality Traits", trait) for trait in personality_traits(personality_text))
    return dedupe_items(item for item in items if item.value)


# ---------------------------------------------------------------------------
# Synthetic personas (the embedded world)
#
# Vocabularies are chosen so extract_profile_rules reads the written paragraphs back to exactly
# the true items: interests are single activities without "and", traits are single adjectives.

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


# ---------------------------------------------------------------------------
# LLM conversion


class ProfileExtractionError(RuntimeError):
    """Some pairs could not be converted after every attempt (their reasons are listed)."""


def slot_template_problems(decoded: object) -> list[str]:
    """What is wrong with a decoded JSON slot template (empty when it is valid).

    Valid: an object with non-empty string keys whose values are a string, a list of strings,
    or null, and at least one item in all.
    """
    if not isinstance(decoded, dict):
        return [f"expected a JSON object, got a JSON {type(decoded).__name__}"]
    problems = []
    for key, value in decoded.items():
        if not isinstance(key, str) or not key.strip():
            problems.append(f"key {key!r} must be a non-empty string")
        elif not (value is None or isinstance(value, str)
                  or (isinstance(value, list) and all(isinstance(element, str) for element in value))):
            problems.append(f"value of {key!r} must be a string, a list of strings or null")
    if not problems and not items_from_json_object(decoded):
        problems.append("the object holds no profile items (every value is empty or unknown)")
    return problems


def parse_slot_template(text: str) -> tuple[dict | None, str]:
    """(decoded object, "") for a valid slot template reply, else (None, what is wrong)."""
    try:
        decoded = json.loads(strip_json_fence(text))
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    problems = slot_template_problems(decoded)
    return (None, "; ".join(problems)) if problems else (decoded, "")


class LLMProfileExtractor:
    """Converts (profile, personality) pairs to slot profiles with an OpenAI-compatible model.

    Each reply must be a valid JSON slot template; an invalid one is sent back with the reason
    and asked again, at most `max_attempts` times per pair. Valid results are appended to a JSONL
    cache keyed by a hash of the prompt and the pair, so a pool is converted once and a rerun
    after a failure only asks for the missing pairs.
    """

    def __init__(self, client: LLMClient, cache_path: str | Path, *, max_attempts: int = 3,
                 prompt_name: str = "profile_extraction") -> None:
        if max_attempts < 1:
            raise ValueError(f"LLMProfileExtractor: max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.cache_path = Path(cache_path)
        self.max_attempts = max_attempts
        self.system_prompt = load_prompt(prompt_name)
        self._cache = self._load_cache()

    def _key(self, profile_text: str, personality_text: str) -> str:
        payload = json.dumps([self.system_prompt, profile_text, personality_text], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _load_cache(self) -> dict[str, dict]:
        cache: dict[str, dict] = {}
        if not self.cache_path.exists():
            return cache
        with self.cache_path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key, profile = record["key"], record["profile"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"{self.cache_path}:{line_number}: expected a JSON object with 'key' and 'profile' "
                        f"(delete the line to convert that pair again)"
                    ) from None
                if slot_template_problems(profile):
                    raise ValueError(f"{self.cache_path}:{line_number}: cached profile is not a valid slot template")
                cache[key] = profile
        return cache

    def _store(self, key: str, profile: dict) -> None:
        self._cache[key] = profile
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "profile": profile}, ensure_ascii=False) + "\n")

    def _first_messages(self, profile_text: str, personality_text: str) -> list[dict[str, str]]:
        user = f"Profile:\n{profile_text}\n\nPersonality:\n{personality_text}"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    async def extract_many(self, pairs: Sequence[tuple[str, str]]) -> list[list[ProfileItem]]:
        """The slot profile of every pair, in order; cached pairs cost no request.

        Raises ProfileExtractionError naming the pairs still invalid after max_attempts (the
        valid ones are cached by then, so a rerun asks only for those).
        """
        keys = [self._key(profile, personality) for profile, personality in pairs]
        conversations = {
            key: self._first_messages(*pair) for key, pair in zip(keys, pairs) if key not in self._cache
        }
        last_problem: dict[str, str] = {}
        for _attempt in range(self.max_attempts):
            if not conversations:
                break
            pending = list(conversations)
            replies = await self.client.complete_many([conversations[key] for key in pending], json_mode=True)
            for key, reply in zip(pending, replies):
                if isinstance(reply, LLMCallError):
                    last_problem[key] = f"request failed: {reply}"
                    continue
                decoded, problem = parse_slot_template(reply)
                if decoded is not None:
                    self._store(key, decoded)
                    del conversations[key]
                    continue
                last_problem[key] = problem
                # Showing the model its reply and what was wrong also changes the request, so a
                # response cache cannot hand back the same invalid answer.
                conversations[key] = conversations[key] + [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"That reply is invalid: {problem}. Answer again with only "
                                                f"the JSON object, using the keys of the template."},
                ]
        if conversations:
            failed = [index for index, key in enumerate(keys) if key in conversations]
            details = "; ".join(f"pair {index}: {last_problem[keys[index]]}" for index in failed[:5])
            raise ProfileExtractionError(
                f"{len(conversations)} pair(s) not converted after {self.max_attempts} attempt(s): {details}"
            )
        return [items_from_json_object(self._cache[key]) for key in keys]
