"""Tokenizer training text for the tests: short, varied English about people, plus the exact markup
the policy writes, so a tiny tokenizer learns merges for the strings the project tokenizes."""

from __future__ import annotations

import random

_NAMES = (
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Gabriel", "Hana", "Ivan", "Jamal", "Keiko",
    "Liam", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe", "Amara", "Ben", "Chloé", "Diego", "Emma", "Felix", "Grace",
    "Hugo", "Isla", "Jonas", "Kofi", "Lucía", "Mateo", "Nora",
)
_OCCUPATIONS = (
    "graphic designer", "nurse", "software engineer", "high school teacher", "chef", "accountant",
    "electrician", "veterinarian", "journalist", "architect", "pharmacist", "firefighter",
    "data analyst", "librarian", "photographer", "civil engineer", "dentist", "barista",
    "project manager", "marine biologist", "carpenter", "lawyer", "physiotherapist", "pilot",
    "social worker", "musician", "translator", "farmer", "mechanic", "research scientist",
    "product designer", "paramedic", "bookkeeper", "tour guide", "florist", "game developer",
    "yoga instructor", "real estate agent", "museum curator", "truck driver",
)
_HOBBIES = (
    "hiking", "yoga", "painting", "baking sourdough", "rock climbing", "playing chess",
    "gardening", "birdwatching", "running marathons", "knitting", "playing the guitar",
    "photography", "cycling", "reading mystery novels", "swimming", "pottery", "board games",
    "learning Japanese", "cooking Thai food", "woodworking", "camping", "surfing", "dancing salsa",
    "writing poetry", "watching old films", "fishing", "skiing", "volunteering at the shelter",
    "playing basketball", "collecting vinyl records", "kayaking", "tennis", "sketching",
    "stargazing", "building model trains", "trail running", "singing in a choir", "meditation",
    "brewing coffee", "video games",
)
_PLACES = (
    "Seattle", "Lisbon", "Toronto", "Nairobi", "Osaka", "Melbourne", "Denver", "Berlin", "Austin",
    "Dublin", "Mumbai", "Chicago", "Oslo", "Cape Town", "Vancouver", "Edinburgh", "Portland",
    "São Paulo", "Zürich", "Kraków", "Montréal", "Boston", "Seoul", "Mexico City", "Manchester",
    "Auckland", "Bristol", "Lyon", "a small town in Ohio", "a village near the coast",
)
_FOODS = (
    "ramen", "tacos", "pho", "pizza", "falafel", "sushi", "curry", "dumplings", "pastries",
    "jalapeño poppers", "crêpes", "barbecue", "dim sum", "bagels", "paella", "croissants",
)
_PETS = ("dog", "cat", "parrot", "rabbit", "hamster", "tortoise", "golden retriever", "kitten")
_FAMILY = (
    "two kids", "a younger brother", "my partner", "my grandmother", "three roommates",
    "a newborn daughter", "my twin sister", "my husband", "my wife", "my parents",
)
_TRAITS = ("curious", "introverted", "outgoing", "patient", "competitive", "creative", "organized", "calm")
_RELATIONS = ("friends", "kids", "partner", "coworkers", "sister", "dad", "neighbors", "dog")
_EMOJI = ("🙂", "🎉", "😅", "👍", "🌲", "☕")

_USER_TEMPLATES = (
    "My name is {name} and I work as {a_occupation} in {place}.",
    "I've been {a_occupation} for {years} years now, and I still love it.",
    "On weekends I'm usually {hobby} with my {relation}.",
    "Honestly, {hobby} is the only thing that keeps me sane after work {emoji}",
    "We just moved to {place}, so I'm still looking for good {food}.",
    "Do you know any good spots for {hobby} near {place}?",
    "My {pet} woke me up at 5:{minutes} this morning again!",
    "I'm {age} and thinking about switching careers to become {a_occupation}.",
    "Work was rough today. Being {a_occupation} isn't easy...",
    "I live with {family}, so the house is never quiet.",
    "Any tips for getting better at {hobby}? I only started {years} months ago.",
    "Last night I cooked {food} for {family} - it was a disaster, haha.",
    "I don't really have time for {hobby} anymore; the new job takes everything.",
    "Can you suggest a weekend trip from {place}? Budget is about ${price}.",
    "I'd describe myself as pretty {trait}, at least that's what my {relation} say.",
)
_ASSISTANT_TEMPLATES = (
    "That sounds wonderful! How long have you been {hobby}?",
    "Being {a_occupation} must keep you busy. What do you enjoy most about it?",
    "{place} is a great place for {hobby}. Have you found a favorite spot yet?",
    "Oh no, a {pet} alarm clock! Does it at least let you sleep in on weekends?",
    "Congrats on the move! For {food}, I'd ask your neighbors - locals always know best.",
    "Switching careers at {age} is more common than people think. What draws you to it?",
    "I'm sorry work was tough. Do you want to talk about it, or would a distraction help?",
    "Starting small works well: try {hobby} twice a week and see how it feels.",
)
_PERSON_TEMPLATES = (
    "{name}, {age}, is {a_occupation} from {place} who enjoys {hobby} and {hobby2}.",
    "{name} works as {a_occupation}, lives with {family}, and spends Sundays {hobby}.",
    "Born in {place}, {name} became {a_occupation} at {age} and never looked back.",
    "{name}'s favorite food is {food}; their {pet} is named after a famous {occupation}.",
)
_ROLE_LINES = (
    "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system\nYou are a friendly assistant who learns about the user as the chat goes on.",
    "user\n{user}",
    "assistant\n{assistant}",
)
_EXTRA_LINES = (
    "Meet me at 7:30 pm on 2024-05-{day}, okay?",
    "The café on 3rd Street sells a naïve little cake for $4.50 (tax included).",
    "Score: {age}/100 -- not bad; \"good enough\", as they say!",
    "Q: What's your favorite season?\nA: Autumn, definitely.",
    "\tIndented line with a tab, then two spaces:  done.",
)


def synthetic_corpus(num_texts: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic training text: chat lines, person descriptions and <profile>/<response> turns."""
    rng = random.Random(seed)
    makers = (_user_line, _assistant_line, _person_line, _profile_turn, _role_line, _extra_line)
    # Profile turns are the policy's actual output format, so they get extra weight.
    weights = (3, 2, 2, 3, 1, 1)
    return [rng.choices(makers, weights)[0](rng) for _ in range(num_texts)]


def _slots(rng: random.Random) -> dict[str, str]:
    hobby, hobby2 = rng.sample(_HOBBIES, 2)
    occupation = rng.choice(_OCCUPATIONS)
    return {
        "name": rng.choice(_NAMES),
        "occupation": occupation,
        "a_occupation": ("an " if occupation[0] in "aeiou" else "a ") + occupation,
        "hobby": hobby,
        "hobby2": hobby2,
        "place": rng.choice(_PLACES),
        "food": rng.choice(_FOODS),
        "pet": rng.choice(_PETS),
        "family": rng.choice(_FAMILY),
        "trait": rng.choice(_TRAITS),
        "relation": rng.choice(_RELATIONS),
        "emoji": rng.choice(_EMOJI),
        "age": str(rng.randint(18, 79)),
        "years": str(rng.randint(1, 30)),
        "minutes": f"{rng.randint(0, 59):02d}",
        "price": str(rng.choice((150, 200, 350, 500, 1200))),
        "day": f"{rng.randint(1, 28):02d}",
    }


def _user_line(rng: random.Random) -> str:
    return rng.choice(_USER_TEMPLATES).format(**_slots(rng))


def _assistant_line(rng: random.Random) -> str:
    return rng.choice(_ASSISTANT_TEMPLATES).format(**_slots(rng))


def _person_line(rng: random.Random) -> str:
    return rng.choice(_PERSON_TEMPLATES).format(**_slots(rng))


def _role_line(rng: random.Random) -> str:
    return rng.choice(_ROLE_LINES).format(user=_user_line(rng), assistant=_assistant_line(rng))


def _extra_line(rng: random.Random) -> str:
    return rng.choice(_EXTRA_LINES).format(**_slots(rng))


def _profile_turn(rng: random.Random) -> str:
    """One policy turn in the exact markup the Profile and Response rewards parse."""
    slots = _slots(rng)
    candidate_items = [
        f"- Name: {slots['name']}",
        f"- Age: {slots['age']}",
        f"- Occupation: {slots['occupation']}",
        f"- Interests: {slots['hobby']}, {slots['hobby2']}",
        f"- Location: {slots['place']}",
        f"- Family: {slots['family']}",
        f"- Pets: a {slots['pet']}",
        f"- Favorite food: {slots['food']}",
        f"- Personality: {slots['trait']}",
    ]
    items = rng.sample(candidate_items, rng.randint(1, 4))
    reply = _assistant_line(rng)
    return "<profile>\n" + "\n".join(items) + "\n</profile>\n\n<response>\n" + reply + "\n</response>"
