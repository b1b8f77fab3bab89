"""Item credit: each profile item's share of the F1, found in the text and put on its own tokens."""

import asyncio

import numpy as np
import pytest
from tiny_corpus import synthetic_corpus

from rlpa_jax.dialogue.chat import parse_turn
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge
from rlpa_jax.dialogue.matching import count_item_matches, matched_item_indices
from rlpa_jax.dialogue.profile import ProfileItem, bullet_lines, item_credits, parse_profile, profile_f1
from rlpa_jax.model.tokenizer import load_tokenizer, train_tiny_tokenizer
from rlpa_jax.rl import ppo
from rlpa_jax.rl.item_credit import line_credits, token_item_credit
from rlpa_jax.rl.rollout import profile_block_length

TRUE = [ProfileItem("Occupation", "chef"), ProfileItem("Interests", "skiing"), ProfileItem("Age", "30")]
TURN = ("<profile>\n- Occupation: chef\n- Location: chef\n- Interests: skiing, chess\n- Occupation: chef\n</profile>"
        "\n\n<response>\nNice! Tell me more.\n</response>")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512))


@pytest.mark.parametrize("matched, num_true", [((True, False, True, False), 3), ((False,), 7), ((True,), 1),
                                               ((True, True, False, False, False), 9)])
def test_item_credits_are_f1_with_minus_without_each_item(matched, num_true):
    def f1(flags):
        return profile_f1(sum(flags), len(flags), num_true)

    expected = [f1(matched) - f1(matched[:i] + matched[i + 1:]) for i in range(len(matched))]
    assert item_credits(matched, num_true) == pytest.approx(expected)
    for hit, credit in zip(matched, item_credits(matched, num_true)):
        assert credit > 0 if hit else credit <= 0


def test_bullet_lines_locate_each_line_and_its_items():
    text = "\n- Occupation: chef\nsome prose\n- Interests: skiing, chess\n"
    lines = bullet_lines(text)
    assert [text[start:end] for start, end, _ in lines] == ["- Occupation: chef", "- Interests: skiing, chess"]
    assert [item for _, _, items in lines for item in items] == parse_profile(text)


def test_matched_indices_say_which_items_count():
    inferred = parse_turn(TURN).profile
    assert [f"{i.slot}: {i.value}" for i in inferred] == ["Occupation: chef", "Location: chef", "Interests: skiing",
                                                         "Interests: chess"]
    assert matched_item_indices(inferred, TRUE) == {0, 2}
    assert count_item_matches(inferred, TRUE) == 2
    assert asyncio.run(EmbeddedProfileJudge().match_items([(inferred, TRUE), ([], TRUE)])) == [{0, 2}, set()]


def test_line_credits_cover_lines_then_each_value():
    text = TURN[len("<profile>"):TURN.index("</profile>")]
    parsed = parse_turn(TURN).profile
    right, wrong = item_credits([True, False, True, False], 3)[:2]
    spans = [(text[start:end], credit) for start, end, credit in line_credits(text, parsed, frozenset({0, 2}), 3)]
    assert [piece for piece, _ in spans] == ["- Occupation: chef", "- Location: chef", "- Interests: skiing, chess",
                                             "- Occupation: chef", "chef", "chef", "skiing", "chess", "chef"]
    expected = [right, wrong, right + wrong, 0.0, right, wrong, right, wrong, 0.0]  # a repeat adds nothing
    assert [credit for _, credit in spans] == pytest.approx(expected)
    # A JSON profile has no lines to credit: it keeps the block's group advantage.
    assert line_credits('{"Occupation": "chef"}', parse_profile('{"Occupation": "chef"}'), frozenset({0}), 3) is None


def test_token_credit_lands_on_the_tokens_that_wrote_each_item(tokenizer):
    ids = tokenizer.encode(TURN, add_special_tokens=False)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    parsed = parse_turn(text)
    length = profile_block_length(tokenizer, ids, True)
    credit, mask = token_item_credit(tokenizer, ids, text, parsed, frozenset({0, 2}), 3, length)
    right, wrong = item_credits([True, False, True, False], 3)[:2]
    pieces = [tokenizer.decode(ids[:k + 1], skip_special_tokens=True) for k in range(len(ids))]

    def credit_at(marker, occurrence=1):
        """Credit of the token that completes the `occurrence`-th `marker` of the text."""
        position = -1
        for _ in range(occurrence):
            position = text.index(marker, position + 1)
        k = next(k for k, piece in enumerate(pieces) if len(piece) >= position + len(marker))
        return credit[k], mask[k]

    assert credit_at("Occupation: chef") == (pytest.approx(right), True)
    assert credit_at("Location: chef") == (pytest.approx(wrong), True)
    assert credit_at("skiing") == (pytest.approx(right), True)
    assert credit_at("chess") == (pytest.approx(wrong), True)
    assert credit_at("Occupation: chef", 2) == (0.0, True)  # a repeat changes no F1
    assert not mask[length:].any() and not credit[length:].any()  # the reply keeps its own advantage
    assert not mask[0]  # <profile> too
    # A malformed or unjudged turn gets no item credit at all.
    for parsed_turn, matched in ((parse_turn("no tags"), frozenset()), (parsed, None)):
        credit, mask = token_item_credit(tokenizer, ids, text, parsed_turn, matched, 3, length)
        assert not mask.any() and not credit.any()


def test_item_advantages_replace_masked_tokens_with_unit_rms_credits():
    rng = np.random.default_rng(0)
    advantages = rng.normal(size=(3, 5)).astype(np.float32)
    credit = rng.normal(0, 0.2, size=(3, 5)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.5
    got = np.asarray(ppo.item_advantages(advantages, credit, mask))
    rms = np.sqrt(np.mean(credit[mask] ** 2))
    np.testing.assert_allclose(got[mask], credit[mask] / rms, rtol=1e-6)
    np.testing.assert_array_equal(got[~mask], advantages[~mask])
    np.testing.assert_array_equal(np.asarray(ppo.item_advantages(advantages, credit, np.zeros_like(mask))), advantages)
