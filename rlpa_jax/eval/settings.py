"""The ALOE evaluation settings, one table entry each: what a setting changes in the protocol.

eval/protocol.py reads an `EvalSetting`'s fields and never a setting's name, and launch/eval.py
takes its --setting choices from `EVAL_SETTINGS`, so a new setting is one entry here.

- vanilla:   the personas as given (ALOE eval pairs, or synthetic personas in the embedded world).
- extended:  slot keys renamed to free-form names never used in training ("Occupation" ->
             "Line of work", ...) plus 1-2 extra free-form items ("Favourite season: autumn").
- conflict:  the user becomes another persona from turn `switch_turn` (6) on; each reply is
             judged against the persona active at its turn.
- long_term: 70 turns; after every 10th reply the policy is asked for its profile (an extra user
             message on a copy of the history, never shown to the user) and the answer is scored
             with the profile judge: F1 x 100. Reported next to it: the share of items revealed so
             far x 100, and the ceiling, the F1 x 100 of stating exactly the revealed items. (F1
             is not bounded by the revealed share: with perfect precision and recall r it is
             2r / (1 + r) > r, so the share alone would be a ceiling a good policy can pass.)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlpa_jax.dialogue.matching import canonical_slot
from rlpa_jax.dialogue.personas import Persona, make_persona
from rlpa_jax.dialogue.personas.english import subject_gender
from rlpa_jax.dialogue.profile import ProfileItem

# New names for the standard slots. None of them maps back to a standard slot under the judges'
# aliases (tests check this), so a policy must use the user's own words to score on them.
EXTENDED_SLOT_KEYS: dict[str, tuple[str, ...]] = {
    "Age": ("Current age", "Age in years"),
    "Gender": ("Gender identity", "Self-described gender"),
    "Interests": ("Favourite pastime", "Leisure pursuit"),
    "Education Background": ("Schooling", "Academic path"),
    "Personality Traits": ("Temperament", "Disposition"),
    "Occupation": ("Line of work", "Day job"),
    "Marital Status": ("Relationship situation", "Romantic status"),
    "Family Background": ("Household", "Family circle"),
    "Location": ("Home base", "Home region"),
    "Other Information": ("Personal fact", "Extra detail"),
}
# Free-form items no training persona has; single values (no commas), so each is one item.
EXTRA_ITEMS: dict[str, tuple[str, ...]] = {
    "Favourite season": ("spring", "summer", "autumn", "winter"),
    "Dream destination": ("Japan", "Iceland", "Peru", "New Zealand", "Morocco", "Norway"),
    "Favourite cuisine": ("Italian food", "Mexican food", "Korean food", "Ethiopian food", "Thai food"),
    "Morning drink": ("black coffee", "green tea", "hot chocolate", "orange juice"),
    "Favourite film genre": ("science fiction", "comedy", "documentaries", "thrillers"),
    "Music taste": ("jazz", "classical music", "hip hop", "folk music"),
}


# ---------------------------------------------------------------------------------------------
# The personas the users play


_POSSESSIVES = {"female": "Her", "male": "His"}


def same_personas(personas: Sequence[Persona], seed: int) -> list[Persona]:
    """The evaluation personas as given."""
    return list(personas)


def extended_persona(persona: Persona, rng: random.Random) -> Persona:
    """`persona` with free-form slot names and 1-2 extra free-form items (also added to its text,
    so an LLM user and an LLM judge know them too)."""
    chosen_keys = {slot: rng.choice(names) for slot, names in EXTENDED_SLOT_KEYS.items()}
    items = [ProfileItem(chosen_keys.get(canonical_slot(item.slot), item.slot), item.value) for item in persona.items]
    extra_keys = rng.sample(sorted(EXTRA_ITEMS), rng.randint(1, 2))
    extras = [ProfileItem(key, rng.choice(EXTRA_ITEMS[key])) for key in extra_keys]
    possessive = _POSSESSIVES.get(subject_gender(persona.profile_text), "Their")
    extra_text = " ".join(f"{possessive} {item.slot.lower()} is {item.value}." for item in extras)
    return make_persona(f"{persona.persona_id}-extended", f"{persona.profile_text.rstrip()} {extra_text}",
                        persona.personality_text, items + extras)


def extended_personas(personas: Sequence[Persona], seed: int) -> list[Persona]:
    """The extended-setting version of every persona; persona i's draw depends only on (seed, i)."""
    return [extended_persona(persona, random.Random(seed * 1_000_003 + index))
            for index, persona in enumerate(personas)]


def conflict_partners(personas: Sequence[Persona], seed: int,
                      pool: Sequence[Persona] | None = None) -> list[Persona]:
    """For each persona, another persona to switch to, drawn from `pool` (default: `personas`),
    with a different profile paragraph where one exists, so more than the personality changes.

    Pass the whole evaluation pool when `personas` is a slice of it: ALOE's eval pairs come five
    to a profile paragraph, so the first few pairs alone would only swap personalities.
    """
    pool = list(personas if pool is None else pool)
    if len(pool) < 2:
        raise ValueError(f"conflict setting: needs at least 2 personas to switch between, got {len(pool)}")
    shift = random.Random(seed).randrange(1, len(pool))
    partners = []
    for index, persona in enumerate(personas):
        order = [pool[(index + shift + offset) % len(pool)] for offset in range(len(pool))]
        others = [other for other in order if other.persona_id != persona.persona_id]
        if not others:
            raise ValueError(f"conflict setting: no persona other than {persona.persona_id} to switch to")
        different_text = [other for other in others if other.profile_text != persona.profile_text]
        partners.append((different_text or others)[0])
    return partners


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class EvalSetting:
    """What one setting changes in the protocol; eval/protocol.py reads nothing else of it."""

    description: str  # one line, for launch/eval.py --help
    turns: int  # the standard dialogue length (the paper's)
    # (evaluation personas, seed) -> the personas the simulated users play, one per input persona
    personas: Callable[[Sequence[Persona], int], list[Persona]] = same_personas
    # The first turn whose user message comes from another persona (conflict_partners picks it);
    # None: the user never switches.
    switch_turn: int | None = None
    # Turns between profile checks (the policy states its profile, the profile judge scores it);
    # None: no checks, so no profile judge is needed.
    profile_every: int | None = None


EVAL_SETTINGS: dict[str, EvalSetting] = {
    "vanilla": EvalSetting("the evaluation personas as given", turns=10),
    "extended": EvalSetting("free-form slot names and 1-2 extra free-form items", turns=10,
                            personas=extended_personas),
    "conflict": EvalSetting("the user becomes another persona from turn 6 on", turns=10, switch_turn=6),
    "long_term": EvalSetting("70 turns, the profile asked for and scored every 10 turns", turns=70,
                             profile_every=10),
}


def eval_setting(name: str) -> EvalSetting:
    """The table entry of `name`, or a ValueError naming the settings there are."""
    if name not in EVAL_SETTINGS:
        raise ValueError(f"setting {name!r} is not one of {', '.join(EVAL_SETTINGS)} "
                         "(EVAL_SETTINGS in rlpa_jax/eval/settings.py)")
    return EVAL_SETTINGS[name]
