"""Item credit: each inferred profile item's share of the turn's F1, put on the tokens that wrote it.

The profile reward is one F1 for a whole <profile> block, so a block holding one right and one
wrong item pushes both the same way, and among a prompt's n samples the group baseline cannot
tell which line made the difference. With credit="item" the tokens of each "- Slot: value" line
are credited with the F1 its items add (profile.item_credits: F1 with the item minus F1 without
it), and each value in a list with its own; ppo.item_advantages puts that in place of the block's group advantage on those tokens.
Everything else (tags, the choice to stop listing, the reply) keeps its group advantage.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlpa_jax.dialogue.chat import PROFILE_CLOSE, PROFILE_OPEN, ParsedTurn
from rlpa_jax.dialogue.profile import bullet_lines, dedupe_key, item_credits


def token_char_ends(tokenizer, tokens: Sequence[int]) -> np.ndarray:
    """ends[k]: characters of text decoded from tokens[:k + 1] (token k spans ends[k-1]..ends[k])."""
    return np.asarray([len(tokenizer.decode(tokens[:k + 1], skip_special_tokens=True)) for k in range(len(tokens))],
                      np.int64)


def line_credits(profile_text: str, parsed_profile: Sequence, matched: frozenset[int],
                 num_true: int) -> list[tuple[int, int, float]] | None:
    """(start, end, credit) spans of a <profile> block's text, later spans overriding earlier ones:
    each bullet line with the summed credit of the items it adds (a repeat or a placeholder adds
    none), then each item's value within its line with the item's own credit, so "- Interests:
    skiing, chess" credits "skiing" and "chess" apart. None when the lines do not account for the
    parsed items one to one (a JSON profile): such a block keeps its group advantage."""
    per_item = item_credits([index in matched for index in range(len(parsed_profile))], num_true)
    seen: set[tuple[str, str]] = set()
    line_spans, value_spans, next_item = [], [], 0
    for start, end, items in bullet_lines(profile_text):
        line, cursor, line_credit = profile_text[start:end], profile_text[start:end].find(":"), 0.0
        for item in items:
            key = dedupe_key(item)
            found = line.find(item.value, cursor) if item.value else -1
            credit = 0.0
            if key is not None and key not in seen:
                if next_item >= len(parsed_profile) or dedupe_key(parsed_profile[next_item]) != key:
                    return None
                seen.add(key)
                credit = per_item[next_item]
                next_item += 1
            if found >= 0:
                value_spans.append((start + found, start + found + len(item.value), credit))
                cursor = found + len(item.value)
            line_credit += credit
        line_spans.append((start, end, line_credit))
    return line_spans + value_spans if next_item == len(parsed_profile) else None


def token_item_credit(tokenizer, tokens: Sequence[int], text: str, parsed: ParsedTurn, matched: frozenset[int] | None,
                      num_true: int, profile_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(credit, mask) over a turn's response tokens: each span's credit (line_credits) on the tokens
    that overlap it, and which tokens those are. All zeros for a malformed or unjudged turn."""
    credit, mask = np.zeros(len(tokens), np.float32), np.zeros(len(tokens), bool)
    if not parsed.well_formed or not parsed.profile or matched is None or profile_length == 0:
        return credit, mask
    open_at = text.index(PROFILE_OPEN) + len(PROFILE_OPEN)
    lines = line_credits(text[open_at:text.index(PROFILE_CLOSE, open_at)], parsed.profile, matched, num_true)
    if lines is None:
        return credit, mask
    ends = token_char_ends(tokenizer, tokens[:profile_length])
    starts = np.concatenate([[0], ends[:-1]])
    for start, end, span_credit in lines:
        # A token merged across two spans counts for the later one.
        overlap = np.flatnonzero((starts < open_at + end) & (ends > open_at + start))
        credit[overlap], mask[overlap] = span_credit, True
    return credit, mask
