"""A scripted "ideal assistant" for the embedded world, and the dialogues it makes for SFT and DPO.

The teacher knows the ground truth the script knows: its profile block is exactly what the user
has revealed so far, and its reply acknowledges something the user just said (by its value) and
asks about a slot that has been neither revealed nor asked about yet. Phrasings are picked with a
seeded RNG, nothing is flattering, and a reply that comes close to an earlier one is re-drawn, so
the ScriptedUser never complains and the embedded judges accept most turns.

Two weak counterparts make the rejected side of DPO pairs: `misread_turn` (the teacher's turn with
the user's values swapped for someone else's: fluent, well-formed, wrong about the user) and
`bland_turn` (a generic reply that ignores the user, for the cold start where nothing is known).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

from rlpa_jax.dialogue.chat import Message, assistant_message, format_turn
from rlpa_jax.dialogue.matching import canonical_slot, mentioned_item_indices
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.profile import LIST_SLOTS, ProfileItem, normalize_text
from rlpa_jax.dialogue.text import near_duplicate, visible_reply_text
from rlpa_jax.dialogue.users import revealed_items
from rlpa_jax.dialogue.users.scripted import ScriptedUser, clean_value, with_article

# One (history before the turn, target turn text) pair; a dialogue is a list of them in order.
Example = tuple[list[Message], str]
Dialogue = list[Example]

# Slots in the order a curious person would ask about them; Gender is never asked.
ASK_ORDER: tuple[str, ...] = (
    "Occupation",
    "Interests",
    "Location",
    "Family Background",
    "Marital Status",
    "Personality Traits",
    "Age",
    "Other Information",
    "Education Background",
)

# Each question carries a keyword of its slot, which is what makes the user answer it.
SLOT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "Occupation": (
        "What do you do for work?",
        "What kind of job do you have?",
        "What line of work are you in?",
    ),
    "Interests": (
        "What do you enjoy doing in your free time?",
        "Do you have any hobbies you're into lately?",
        "What do you like to do on weekends?",
    ),
    "Location": (
        "Where do you live these days?",
        "Which city are you based in?",
        "What town or city do you call home?",
    ),
    "Family Background": (
        "Do you have any family nearby, like siblings or kids?",
        "Who's in your family?",
        "Tell me about your family, do you have kids or siblings?",
    ),
    "Marital Status": (
        "Are you married or in a relationship?",
        "Is there a partner or spouse in your life?",
    ),
    "Personality Traits": (
        "How would you describe your personality?",
        "How would your friends describe your character?",
    ),
    "Age": (
        "If you don't mind me asking, how old are you?",
        "What's your age, if you don't mind sharing?",
    ),
    "Other Information": (
        "Are there any other facts about you I should know, like a pet at home?",
        "Any other fun facts about your life you'd like to share?",
    ),
    "Education Background": (
        "What did you study in school?",
        "Did you go to college or university?",
    ),
}

# {value}: the item's value; {a_value}: with an article; {family}: a family phrase with an article.
ACKNOWLEDGEMENTS: dict[str, tuple[str, ...]] = {
    "Occupation": (
        "Working as {a_value} must keep your days full.",
        "Being {a_value} sounds like work with a lot of variety.",
        "I imagine being {a_value} comes with its own daily challenges.",
    ),
    "Interests": (
        "{value} sounds like a fun way to unwind.",
        "I can see why {value} would be relaxing after a long day.",
        "{value} takes real patience to get good at.",
    ),
    "Location": (
        "{value} seems like an interesting place to live.",
        "Living in {value} must have its perks.",
        "I hear {value} has a lot going on.",
    ),
    "Family Background": (
        "A family with {family} must keep life lively.",
        "Having {family} must make for a busy household.",
    ),
    "Marital Status": (
        "Thanks for telling me you're {value}.",
        "Being {value} shapes a lot of everyday life.",
    ),
    "Personality Traits": (
        "Being {value} probably helps in a lot of situations.",
        "I can see how being {value} would shape the way you do things.",
    ),
    "Age": (
        "{value} is a good age for trying new things.",
        "At {value}, you probably have plenty going on.",
    ),
    "Education Background": (
        "A background in {value} must come in handy.",
        "{value} sounds like a solid foundation.",
    ),
    "Other Information": (
        "Thanks for mentioning that: {value}.",
        "Good to know that {value} is part of your life.",
    ),
}
PET_ACKNOWLEDGEMENTS = ("{a_value} sounds like good company.", "A home with {a_value} is never boring.")
GENDER_ACKNOWLEDGEMENTS = (
    "Thanks for sharing that you're {person}.",
    "Good to know you're {person}, thanks for telling me.",
)
FREE_FORM_ACKNOWLEDGEMENTS = ("Thanks for sharing that about your {slot}.",)

# Follow-ups about what is already known, once every slot has been revealed or asked about.
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "Occupation": ("What do you like most about being {a_value}?", "How did you end up working as {a_value}?"),
    "Interests": ("How did you get started with {value}?", "What got you into {value}?"),
    "Location": ("What do you like most about living in {value}?",),
    "Family Background": ("What do you enjoy doing together as a family?",),
    "Personality Traits": ("Has being {value} helped you at work?",),
}
OPEN_QUESTIONS = (
    "What has been keeping you busy this week?",
    "What are you looking forward to this month?",
    "Is there anything on your mind you'd like to talk through?",
)
GREETINGS = ("Hi there!", "Hello, nice to meet you.", "Hi, good to meet you.")
NOTHING_NEW_OPENERS = ("No worries.", "Fair enough.", "That's fine.", "Okay, no problem.")

BLAND_REPLIES = (
    "That's interesting. Tell me more.",
    "I see. Tell me more.",
    "Okay, go on.",
    "Hmm, what else?",
    "Right. Anything else?",
    "Sounds nice. What else is new?",
)

NUMBER_WORDS = frozenset("two three four five six seven eight nine ten several many".split())
MAX_REDRAWS = 12  # attempts at a reply that is not a near-duplicate of an earlier one


def merged_profile(revealed: Sequence[ProfileItem]) -> list[ProfileItem]:
    """The revealed items as profile lines: a list slot's values share one comma-separated line
    (as the policy system prompt asks); parse_profile splits them back into the same items."""
    merged: dict[str, list[str]] = {}
    for item in revealed:
        merged.setdefault(item.slot, []).append(clean_value(item.value))
    lines: list[ProfileItem] = []
    for slot, values in merged.items():
        # A value that itself holds a separator would split differently when read back.
        joinable = canonical_slot(slot) in LIST_SLOTS and not any("," in v or ";" in v for v in values)
        if joinable:
            lines.append(ProfileItem(slot, ", ".join(values)))
        else:
            lines.extend(ProfileItem(slot, value) for value in values)
    return lines


def family_phrase(value: str) -> str:
    """'teenage son' -> 'a teenage son'; 'two daughters' stays as it is."""
    first_word = value.split()[0].lower() if value.split() else ""
    return value if first_word in NUMBER_WORDS or first_word.isdigit() else with_article(value)


def capitalize_first(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def acknowledgement(item: ProfileItem, rng: random.Random) -> str:
    """One sentence that picks up `item` by its value (never praise)."""
    value = clean_value(item.value)
    slot = canonical_slot(item.slot)
    if slot == "Gender":
        normalized = normalize_text(value)
        person = {"female": "a woman", "woman": "a woman", "male": "a man", "man": "a man"}.get(normalized)
        if person is None:
            return f"Thanks for telling me you identify as {value}."
        template = rng.choice(GENDER_ACKNOWLEDGEMENTS)
        return template.format(person=person)
    if slot == "Other Information" and " named " in f" {value} ":
        templates = PET_ACKNOWLEDGEMENTS
    else:
        templates = ACKNOWLEDGEMENTS.get(slot, FREE_FORM_ACKNOWLEDGEMENTS)
    sentence = rng.choice(templates).format(
        value=value, a_value=with_article(value), family=family_phrase(value), slot=item.slot.strip().lower()
    )
    return capitalize_first(sentence)


def last_user_text(history: Sequence[Message]) -> str:
    for message in reversed(history):
        if message.role == "user":
            return message.content
    return ""


def just_revealed(revealed: Sequence[ProfileItem], history: Sequence[Message]) -> list[ProfileItem]:
    """Revealed items that the user's last message states."""
    indices = mentioned_item_indices(revealed, last_user_text(history))
    return [revealed[index] for index in sorted(indices)]


def was_said(phrase: str, earlier_replies: Sequence[str]) -> bool:
    return any(phrase in reply for reply in earlier_replies)


def slot_questions(revealed: Sequence[ProfileItem], earlier_replies: Sequence[str]) -> list[tuple[str, ...]]:
    """Phrasings for each slot neither revealed nor asked about yet, in ASK_ORDER."""
    revealed_slots = {canonical_slot(item.slot) for item in revealed}
    return [
        SLOT_QUESTIONS[slot]
        for slot in ASK_ORDER
        if slot not in revealed_slots and not any(was_said(q, earlier_replies) for q in SLOT_QUESTIONS[slot])
    ]


def follow_up_questions(revealed: Sequence[ProfileItem], earlier_replies: Sequence[str]) -> list[tuple[str, ...]]:
    """Not-yet-asked questions about what the user has already revealed."""
    questions = []
    for item in revealed:
        value = clean_value(item.value)
        for template in FOLLOW_UPS.get(canonical_slot(item.slot), ()):
            question = template.format(value=value, a_value=with_article(value))
            if not was_said(question, earlier_replies):
                questions.append((question,))
    return questions


def open_questions(earlier_replies: Sequence[str]) -> list[tuple[str, ...]]:
    unused = [(question,) for question in OPEN_QUESTIONS if not was_said(question, earlier_replies)]
    return unused or [OPEN_QUESTIONS]


def draw_reply(history: Sequence[Message], revealed: Sequence[ProfileItem], rng: random.Random) -> str:
    """One candidate reply: an opener tied to the user's last message, then a question.

    After news, the question explores a new slot. After a message with nothing new, the reply
    returns to something the user did share (a follow-up), so it stays about them.
    """
    earlier = [visible_reply_text(m.content) for m in history if m.role == "assistant"]
    new_items = just_revealed(revealed, history)
    slots, follow_ups = slot_questions(revealed, earlier), follow_up_questions(revealed, earlier)
    if new_items:
        # Gender alone makes the flattest acknowledgement, so it is picked only when it is all there is.
        telling = [item for item in new_items if canonical_slot(item.slot) != "Gender"] or new_items
        opener = acknowledgement(rng.choice(telling), rng)
        candidates = slots + follow_ups
    elif not earlier:
        opener = rng.choice(GREETINGS)
        candidates = slots
    else:
        opener = rng.choice(NOTHING_NEW_OPENERS)
        candidates = follow_ups + slots
    candidates = candidates or open_questions(earlier)
    # One of the two best candidates, so dialogues do not all walk the slots in the same order.
    phrasings = candidates[rng.randrange(min(2, len(candidates)))]
    return f"{opener} {rng.choice(phrasings)}"


def teacher_turn(
    history: Sequence[Message], revealed: Sequence[ProfileItem], rng: random.Random
) -> tuple[list[ProfileItem], str]:
    """(profile items, reply) of the ideal assistant after `history` (which ends with the user).

    The profile is every revealed item (list slots merged onto one line each); the reply is 1-3
    sentences and never a near-duplicate of an earlier assistant reply.
    """
    earlier = [visible_reply_text(m.content) for m in history if m.role == "assistant"]
    reply = draw_reply(history, revealed, rng)
    for _ in range(MAX_REDRAWS):
        if not any(near_duplicate(reply, before) for before in earlier):
            break
        reply = draw_reply(history, revealed, rng)
    return merged_profile(revealed), reply


def bland_turn(
    history: Sequence[Message], revealed: Sequence[ProfileItem], rng: random.Random
) -> tuple[list[ProfileItem], str]:
    """A weak turn for DPO's rejected side: a generic reply and an empty or partial profile."""
    del history  # ignoring the conversation is the point
    keep = rng.randrange(len(revealed)) if revealed and rng.random() < 0.5 else 0
    return list(revealed[:keep]), rng.choice(BLAND_REPLIES)


def slot_values(personas: Sequence[Persona]) -> dict[str, list[str]]:
    """Every value each canonical slot takes over `personas` (sorted): what misread_turn swaps in."""
    values: dict[str, set[str]] = {}
    for persona in personas:
        for item in persona.items:
            values.setdefault(canonical_slot(item.slot), set()).add(clean_value(item.value))
    return {slot: sorted(found) for slot, found in values.items()}


def misread_turn(
    revealed: Sequence[ProfileItem], profile: Sequence[ProfileItem], reply: str,
    values: dict[str, list[str]], rng: random.Random,
) -> tuple[list[ProfileItem], str] | None:
    """The teacher's turn with every revealed value swapped for another value of its slot: as fluent
    and well-formed as the teacher, but about someone else (DPO's hard negative). None when there
    is nothing to swap (nothing revealed yet, or no other value known for any revealed slot)."""
    swaps: dict[str, str] = {}
    for item in revealed:
        value = clean_value(item.value)
        others = [v for v in values.get(canonical_slot(item.slot), ()) if normalize_text(v) != normalize_text(value)]
        if others and value not in swaps:
            swaps[value] = rng.choice(others)
            swaps.setdefault(with_article(value), with_article(swaps[value]))  # "a nurse" -> "an architect"
    if not swaps:
        return None
    # Longest first, so "golden retriever named Pixel" is swapped before "Pixel" could be.
    pattern = re.compile("|".join(rf"\b{re.escape(v)}\b" for v in sorted(swaps, key=len, reverse=True)))
    swapped_profile = [ProfileItem(item.slot, pattern.sub(lambda m: swaps[m.group(0)], item.value)) for item in profile]
    return swapped_profile, pattern.sub(lambda m: swaps[m.group(0)], reply)


def scripted_turns(
    persona: Persona, index: int, num_turns: int, seed: int, user: ScriptedUser
) -> Iterator[tuple[list[Message], list[ProfileItem], list[ProfileItem], str]]:
    """The ScriptedUser against the teacher for one persona: yields, per turn, (history before the
    turn, items revealed so far, the teacher's profile, the teacher's reply).

    The one place the scripted conversation is played, so SFT dialogues and DPO pairs see exactly
    the same conversations; persona `index` picks its own user and teacher RNG streams.
    """
    state = user.start(persona, seed=seed * 1_000_003 + 2 * index)
    rng = random.Random(seed * 1_000_003 + 2 * index + 1)
    history: list[Message] = []
    for _ in range(num_turns):
        history.append(Message("user", user.reply(state, history)))
        revealed = revealed_items(state)
        profile, reply = teacher_turn(history, revealed, rng)
        yield list(history), revealed, profile, reply
        history.append(assistant_message(profile, reply))


def scripted_dialogues(
    personas: Sequence[Persona], num_turns: int, seed: int, user: ScriptedUser | None = None
) -> list[Dialogue]:
    """The ScriptedUser against the teacher: one dialogue of `num_turns` examples per persona.

    Deterministic under `seed`; each persona gets its own user and teacher RNG streams.
    """
    if num_turns < 1:
        raise ValueError(f"teacher.scripted_dialogues: num_turns must be >= 1, got {num_turns}")
    user = user if user is not None else ScriptedUser()
    return [
        [(history, format_turn(profile, reply)) for history, _, profile, reply in scripted_turns(persona, index, num_turns, seed, user)]
        for index, persona in enumerate(personas)
    ]
