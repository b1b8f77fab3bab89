"""The rule-based reader of ALOE profile paragraphs: verb phrases to slot items, no network.

Each verb phrase of a profile sentence (english.py) is read by the rule for its verb: "is a
34-year-old nurse", "enjoys hiking and yoga", "has a dog named Max", "lives in Denver with
two kids", ... Phrases no rule recognises are skipped: a missing item costs recall, a wrong one
costs the reward's precision for every policy trained on it. extract_profile_rules adds the
personality traits (trait_rules.py) to the facts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rlpa_jax.dialogue.personas.english import (
    ACTIVITY_GERUNDS,
    CLAUSE_BOUNDARY,
    LEADING_ADVERBS,
    as_activity,
    neutral,
    paragraph_sentences,
    predicate_segments,
    split_list,
    subject_gender,
)
from rlpa_jax.dialogue.personas.trait_rules import personality_traits
from rlpa_jax.dialogue.profile import ProfileItem, dedupe_items

_OBJECT_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+(?=(?:a|an|one|two|three|four|five|six|\d+)\b)")
# Companions in "lives with her husband and their daughter": split before a determiner only, so
# "two cats named Pixel and Scribble" and "her golden retriever, Daisy" stay whole.
_COMPANION_SPLIT = re.compile(
    r"(?:,\s*(?:and\s+)?|\s+and\s+)(?=(?:a|an|one|two|three|four|five|six|\d+|his|her|their|my)\b)"
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
_LIKE_VERBS = frozenset({"enjoys", "enjoy", "loves", "love", "likes", "like", "adores"})
_OTHER_VERBS = frozenset({"volunteers", "specializes", "teaches", "coaches", "dreams", "plans", "speaks",
                          "fosters", "mentors", "founded", "opened", "designs", "sells", "gives", "conducts"})
_OBJECT_NEEDING_GERUNDS = frozenset({
    "playing", "making", "taking", "going", "participating", "attending", "trying", "visiting", "hosting",
    "creating", "organizing", "collecting", "building", "riding", "exhibiting", "documenting", "spending",
})


def _interests(text: str) -> list[ProfileItem]:
    text = re.sub(r"^to\s+", "", text.strip())
    text = re.sub(r"\s+(?:for|with) them\b", "", text)
    parts = [as_activity(part) for part in split_list(text)]
    # A part opening with an adverb is a verb phrase the clause split did not know ("often
    # collaborates"); a part about "it"/"them" or a bare "playing" means nothing on its own.
    return [
        ProfileItem("Interests", part)
        for part in parts
        if not LEADING_ADVERBS.match(part)
        and not re.search(r"^\w+ (?:it|them)\b", part)
        and part not in _OBJECT_NEEDING_GERUNDS
    ]


def _pet_or_family(phrase: str, prefix: str = "") -> list[ProfileItem]:
    """A pet (Other Information) or relatives (Family Background) when the phrase's head names one:
    "a yearly tradition of making quilts for her grandchildren" is about neither."""
    value = neutral(phrase)
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
        items.append(ProfileItem("Family Background", "partner is " + neutral(spouse.group("who"), article=True)))
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
            items.append(ProfileItem("Family Background", neutral(parent.group(1))))
        elif status in (None, "engaged"):
            partner = re.match(r"^\s*(?:to|with)\s+(?P<who>.+)$", rest)
            if partner:
                partner_text = neutral(partner.group("who"), article=True)
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
        items.append(ProfileItem("Occupation", neutral(occupation[0])))
    tail = first[len(occupation[0]):].strip()
    for clause in ([tail] if tail else []) + parts[1:]:
        items.extend(_trailing_clause_items(clause))
    if relative:
        for segment in CLAUSE_BOUNDARY.split(relative):
            items.extend(_segment_items(LEADING_ADVERBS.sub("", segment.strip())))
    return items


def _trailing_clause_items(clause: str) -> list[ProfileItem]:
    clause = re.sub(r"^and\s+", "", clause.strip())
    if re.match(r"^(?:studying|majoring in|pursuing)\b", clause):
        return [ProfileItem("Education Background", neutral(clause))]
    working = re.match(r"^(?:working|who works)\s+(?:part-time\s+)?as\s+(?P<job>.+)$", clause)
    if working:
        return [ProfileItem("Occupation", neutral(working.group("job")))]
    if clause.startswith("at "):
        return [ProfileItem("Other Information", "works " + neutral(clause))]
    avid = re.match(r"^an?\s+(?:avid|passionate|amateur|keen)\s+(?P<what>.+)$", clause)
    if avid:
        return [ProfileItem("Interests", _avid_interest(avid.group("what")))]
    return _segment_items(clause)


def _avid_interest(noun_phrase: str) -> str:
    """"reader of mystery novels" -> "reading mystery novels"; "fan of jazz" -> "jazz"."""
    phrase = re.sub(r"\s+who\s+.*$", "", noun_phrase.strip())
    reader = re.match(r"^reader of (.+)$", phrase)
    if reader:
        return "reading " + neutral(reader.group(1))
    fan = re.match(r"^fan of (.+)$", phrase)
    return neutral(fan.group(1) if fan else phrase)


_ItemRule = tuple[re.Pattern[str], Callable[[re.Match[str]], list[ProfileItem]]]
# Rules for "is ..." phrases other than the age/occupation opener, tried in order.
_IS_RULES: tuple[_ItemRule, ...] = (
    (re.compile(r"^an?\s+(?P<single>single\s+)?"
                r"(?P<v>(?:mother|father|parent|grandmother|grandfather|grandparent)\b.*)$"),
     lambda m: [ProfileItem("Family Background", neutral(m.group("v")))]
     + ([ProfileItem("Marital Status", "single")] if m.group("single") else [])),
    (re.compile(r"^(?:a |an )?(?P<v>vegan|vegetarian|pescatarian|(?:gluten|lactose) intolerant)\b(?P<rest>.*)$"),
     lambda m: [ProfileItem("Other Information", m.group("v"))] + _lover_items(m.group("rest"))),
    (re.compile(r"^(?P<v>fluent in .+|learning .+|training for .+|an advocate for .+|a volunteer .+)$"),
     lambda m: [ProfileItem("Other Information", neutral(m.group("v")))]),
    (re.compile(r"^(?:an?\s+)?(?:active\s+)?(?:part|member) of (?P<v>.+)$"),
     lambda m: [ProfileItem("Other Information", "member of " + neutral(m.group("v")))]),
    (re.compile(r"^(?:passionate about|interested in) (?P<v>.+)$"),
     lambda m: _interests(m.group("v"))),
    (re.compile(r"^(?:deeply )?involved in (?P<v>.+)$"),
     lambda m: [ProfileItem("Other Information", "involved in " + neutral(m.group("v")))]),
    (re.compile(r"^(?:studying|majoring in|pursuing|completing|currently studying) .+$"),
     lambda m: [ProfileItem("Education Background", neutral(m.group(0)))]),
    (re.compile(r"^(?:originally )?from (?P<v>[A-Z].+)$"),
     lambda m: [ProfileItem("Location", neutral(m.group("v")))]),
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
        return [ProfileItem("Other Information", "has " + neutral(obj))]
    items: list[ProfileItem] = []
    for part in _OBJECT_SPLIT.split(obj):
        items.extend(_has_object_items(part.strip()))
    return items


def _has_object_items(part: str) -> list[ProfileItem]:
    part = re.sub(r"\s+where\s+.*$", "", part)
    if _EDUCATION_WORDS.search(part) and not re.search(r"\bbelt\b", part):
        return [ProfileItem("Education Background", neutral(part))]
    collection = re.search(r"\bcollection of (?P<v>.+)$", part)
    if collection:
        return [ProfileItem("Interests", "collecting " + neutral(collection.group("v")))]
    interest = re.match(r"^an?\s+(?:strong\s+|keen\s+|deep\s+)?(?:interest in|passion for)\s+(?P<v>.+)$", part)
    if interest:
        return _interests(interest.group("v"))
    job = re.match(r"^an?\s+part-time job\s+(?P<v>(?:at|in|as)\s+.+)$", part)
    if job:
        where = neutral(job.group("v"))
        if where.startswith("as "):
            return [ProfileItem("Occupation", "part-time " + neutral(where[3:]))]
        return [ProfileItem("Occupation", "part-time job " + where)]
    if re.match(r"^an?\s+(?:black belt|goal|dream)\b", part):
        return [ProfileItem("Other Information", neutral(part))]
    if re.search(r"\b(?:blog|youtube channel|instagram|podcast|online shop|side business)\b", part, re.IGNORECASE):
        return [ProfileItem("Other Information", "has " + neutral(part))]
    return _pet_or_family(part)


def _lives_items(obj: str) -> list[ProfileItem]:
    """Location, family, pets and flatmates from "lives in X with Y" / "lives with Y in X"."""
    items: list[ProfileItem] = []
    where = re.match(r"^(?P<prep>in|near|by|on)\s+(?P<place>.+?)(?:\s+with\s+(?P<who>.+))?$", obj)
    if where:
        # "in a loft" names the place; "near the beach" keeps its preposition to make sense.
        place = where.group("place") if where.group("prep") == "in" else obj.split(" with ")[0]
        items.append(ProfileItem("Location", neutral(place)))
        who = where.group("who")
    else:
        with_match = re.match(r"^with\s+(?P<who>.+?)(?:\s+in\s+(?P<place>(?:a|an|the)\s+.+))?$", obj)
        if with_match is None:
            return []
        who = with_match.group("who")
        if with_match.group("place"):
            items.append(ProfileItem("Location", neutral(with_match.group("place"))))
    if not who:
        return items
    if not (_ANIMALS.search(who) or _RELATIVES.search(who) or _HOUSEMATES.search(who)):
        if items:  # "an apartment with a view of the skyline" describes the place
            items[0] = ProfileItem("Location", f"{items[0].value} with {neutral(who, article=True)}")
        return items
    for companion in _COMPANION_SPLIT.split(who):
        if _ANIMALS.search(companion) or _RELATIVES.search(companion):
            items.extend(_pet_or_family(companion, prefix="lives with "))
        elif _HOUSEMATES.search(companion):
            items.append(ProfileItem("Other Information", "lives with " + neutral(companion)))
    return items


def _works_items(obj: str) -> list[ProfileItem]:
    as_job = re.match(r"^(?P<part>part-time\s+)?as\s+(?P<job>.+)$", obj)
    if as_job:
        prefix = "part-time " if as_job.group("part") else ""
        return [ProfileItem("Occupation", prefix + neutral(as_job.group("job")))]
    part_time = re.match(r"^part-time\s+(?P<where>(?:at|in)\s+.+)$", obj)
    if part_time:
        return [ProfileItem("Occupation", "part-time job " + neutral(part_time.group("where")))]
    if re.match(r"^(?:at|for|in|with)\s+", obj):
        return [ProfileItem("Other Information", "works " + neutral(obj))]
    return []


def _education_verb_items(verb: str, obj: str) -> list[ProfileItem]:
    if verb == "never":
        went = re.match(r"^went to (?P<v>college|university|school)\b", obj)
        return [ProfileItem("Education Background", "never went to " + went.group("v"))] if went else []
    return [ProfileItem("Education Background", f"{verb} {neutral(obj)}")]


def _segment_items(segment: str) -> list[ProfileItem]:
    """Items of one verb phrase ("enjoys hiking and yoga", "has a dog named Max", ...)."""
    match = re.match(r"^(?P<verb>[\w'-]+)\s+(?P<obj>.+)$", segment.strip())
    if match is None:
        return []
    verb, obj = match.group("verb").lower(), LEADING_ADVERBS.sub("", match.group("obj").strip())
    age = re.match(r"^(?:an?\s+)(?P<age>\d{1,3})-year-old\s+(?P<rest>.+)$", obj)
    if verb == "is" and age:
        return [ProfileItem("Age", age.group("age"))] + _occupation_phrase_items(age.group("rest"))
    if verb == "is":
        return _is_items(obj)
    if verb in _LIKE_VERBS:
        return _interests(obj)
    if verb in ("has", "have", "owns", "holds"):
        return _has_items(obj) if verb != "owns" or _ANIMALS.search(obj) else [
            ProfileItem("Other Information", "owns " + neutral(obj))]
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
        return [ProfileItem("Other Information", "runs " + neutral(obj))]
    if verb == "travels":
        if re.search(r"\bfor (?:work|competitions|matches|archaeological)\b", obj):
            return [ProfileItem("Other Information", "travels " + neutral(obj))]
        return _interests("traveling " + obj)
    if verb == "goes":
        gerund = re.match(r"^(?:on\s+)?(?P<v>\w+ing\b.*)$", obj)
        return _interests(gerund.group("v")) if gerund else []
    if verb == "spends":
        spend = re.match(
            r"^(?:their |his |her |most )?(?:free |spare |most of (?:his|her) )?"
            r"(?:time|weekends|mornings|evenings|summers|days)\s+(?P<v>\w+ing\b.*)$", obj)
        return _interests(spend.group("v")) if spend else []
    if verb in ACTIVITY_GERUNDS:
        return _interests(f"{ACTIVITY_GERUNDS[verb]} {obj}")
    if verb in _OTHER_VERBS:
        # A trailing ", teaching kids about ..." elaborates; the fact is the part before it.
        return [ProfileItem("Other Information", f"{verb} {neutral(obj.split(', ')[0])}")]
    return []


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
    for sentence in paragraph_sentences(profile_text):
        for segment in predicate_segments(sentence):
            items.extend(_segment_items(segment))
    if not any(item.slot == "Age" for item in items):
        age = re.search(r"\b(\d{1,3})-year-old\b", profile_text)
        if age:
            items.append(ProfileItem("Age", age.group(1)))
    items.extend(ProfileItem("Personality Traits", trait) for trait in personality_traits(personality_text))
    return dedupe_items(item for item in items if item.value)
