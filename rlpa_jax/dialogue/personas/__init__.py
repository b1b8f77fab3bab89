"""Personas: who the simulated user is, and the true slot profile the Profile Reward scores against.

base.py holds the Persona type, ALOE loading and pairing; profile_rules.py / trait_rules.py (over
english.py) the rule-based converter; extraction.py the LLM converter; synthetic.py the embedded
world's personas. The names run setup needs are re-exported here.
"""

from rlpa_jax.dialogue.personas.base import (
    Persona,
    load_aloe_pool,
    make_persona,
    pair_for_evaluation,
    pair_for_training,
    personas_from_items,
    personas_from_pairs,
)
from rlpa_jax.dialogue.personas.extraction import LLMProfileExtractor
from rlpa_jax.dialogue.personas.synthetic import synthetic_personas, synthetic_values

__all__ = [
    "LLMProfileExtractor",
    "Persona",
    "load_aloe_pool",
    "make_persona",
    "pair_for_evaluation",
    "pair_for_training",
    "personas_from_items",
    "personas_from_pairs",
    "synthetic_personas",
    "synthetic_values",
]
