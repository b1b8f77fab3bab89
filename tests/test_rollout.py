"""The host rollout: scoring with embedded and HTTP judges, best-of-n, reward modes, determinism."""

import asyncio

import jax
import numpy as np
import pytest
from openai_server import OpenAIServer, Reply
from tiny_corpus import synthetic_corpus

from rlpa_jax.dialogue.chat import Message, format_turn, load_prompt, parse_turn
from rlpa_jax.dialogue.judges.llm import LLMProfileJudge, LLMResponseJudge
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.users.scripted import ScriptedUser
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import load_tokenizer, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.rl.environment import Environment, reward_of, start_conversations
from rlpa_jax.rl.rollout import Rollout, profile_block_length


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512))


def make_environment(tokenizer, profile_judge=None, response_judge=None, mode="both"):
    return Environment(tokenizer, load_prompt("policy_system_tiny"), ScriptedUser(), profile_judge or EmbeddedProfileJudge(),
                 response_judge or EmbeddedResponseJudge(), mode, max_prompt_tokens=256)


def one_conversation(user_text="I work as a nurse and I love hiking."):
    persona = synthetic_personas(1, seed=3)[0]
    conversation = start_conversations([persona], ScriptedUser(), [0])[0]
    conversation.history += [Message("assistant", "Hi! How is your day going?"), Message("user", user_text)]
    return conversation, persona


def test_scores_follow_the_turn_format_and_the_truth(tokenizer):
    conversation, persona = one_conversation()
    good = format_turn(persona.items[:2], "Hiking sounds lovely. Which trail near you do you like best?")
    texts = [good, "no tags at all", format_turn([], "ok")]
    (scored,) = asyncio.run(make_environment(tokenizer).score([conversation], [texts]))
    (p0, s0, _), (p1, s1, _), (_, s2, _) = scored
    assert p0.well_formed and s0.profile_reward > 0 and s0.valid
    assert not p1.well_formed and s1.total == 0 and s1.valid
    assert s2.profile_reward == 0


def test_llm_judges_over_http_and_unscored_samples(tokenizer):
    conversation, persona = one_conversation()
    answers = iter(["Judged. \\boxed{1}"] * 2)  # the two judges ask concurrently, in either order

    def handler(request):
        return Reply(content=next(answers, "garbage with no box"))

    with OpenAIServer(handler) as server:
        client = LLMClient(LLMConfig(base_url=server.base_url, model="judge", max_retries=0, backoff_initial_s=0.01))
        environment = make_environment(tokenizer, LLMProfileJudge(client, max_attempts=1),
                                       LLMResponseJudge(client, max_attempts=1))
        text = format_turn(persona.items[:2], "Hiking sounds lovely. Which trail do you like best?")
        (scored,) = asyncio.run(environment.score([conversation], [[text]]))
        (scored_again,) = asyncio.run(environment.score([conversation], [[format_turn(persona.items[:1], "Nice. What else?")]]))
    assert scored[0][1].valid  # both judges answered
    assert not scored_again[0][1].valid  # unparsable judge output: unscored, masked out, never 0 or 1
    fenced = [r for r in server.requests if "Which trail" in str(r["messages"])]
    assert fenced, "the reply reached the judge"


def test_reward_modes():
    from rlpa_jax.dialogue.judges import TurnScore
    score = TurnScore(0.5, 1.0, 1.5, True, True)
    assert (reward_of(score, "both"), reward_of(score, "profile"), reward_of(score, "response")) == (1.5, 0.5, 1.0)


def test_profile_block_length_is_the_shortest_prefix_that_closes_the_block(tokenizer):
    ids = tokenizer.encode(format_turn(parse_turn("<profile>\n- Occupation: nurse\n</profile>\n\n<response>\nHi\n"
                                                 "</response>").profile, "Hi"), add_special_tokens=False)
    n = profile_block_length(tokenizer, ids, well_formed=True)
    assert "</profile>" in tokenizer.decode(ids[:n]) and "</profile>" not in tokenizer.decode(ids[:n - 1])
    assert profile_block_length(tokenizer, ids, well_formed=False) == 0


def test_environment_with_item_credit_says_which_items_matched(tokenizer):
    conversation, persona = one_conversation()
    text = format_turn([persona.items[0], persona.items[1], ProfileItem("Location", "Atlantis")], "Nice. What else?")
    environment = Environment(tokenizer, load_prompt("policy_system_tiny"), ScriptedUser(), EmbeddedProfileJudge(),
                              EmbeddedResponseJudge(), item_credit=True)
    ((parsed, score, matched),) = asyncio.run(environment.score([conversation], [[text]]))[0]
    ((_, plain_score, none),) = asyncio.run(make_environment(tokenizer).score([conversation], [[text]]))[0]
    assert matched == {0, 1} and none is None and score == plain_score


def run_rollout(tokenizer, groups, seed=0):
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    engine = GenerationEngine(config, stop_token_ids(tokenizer), tokenizer.pad_token_id, prompt_buckets=(64, 128, 256))
    engine.sync(params)
    rollout = Rollout(make_environment(tokenizer), engine, SamplingParams(max_new_tokens=12, num_samples=3), max_rounds=3,
                      groups=groups)
    personas = synthetic_personas(4, seed=1)
    conversations = start_conversations(personas, ScriptedUser(), [10, 11, 12, 13])
    return rollout.run(conversations, jax.random.key(seed))


def test_rollout_records_every_sample_and_continues_with_the_best(tokenizer):
    result = run_rollout(tokenizer, groups=2)
    assert len(result.samples) == 4 * 3 * 3 and result.stats["samples"] == 36
    for c in result.conversations:
        assert [m.role for m in c.history] == ["user", "assistant"] * 3 + ["user"]
    for turn in range(3):
        for cid in range(4):
            group = [s for s in result.samples if s.turn == turn and s.conversation_id == cid]
            chosen = [s for s in group if s.chosen]
            assert len(group) == 3 and len(chosen) == 1 and chosen[0].reward == max(s.reward for s in group)
    first = result.samples[0]
    assert len(first.response_tokens) == len(first.sampler_logprobs) and first.prompt_tokens.dtype == np.int32
    assert all(s.profile_length == 0 for s in result.samples if not s.parsed.well_formed)
    assert result.stats["revealed_items"] == np.mean([len(c.user.revealed) for c in result.conversations])
    assert result.stats["revealed_items"] > 0  # these seeded users reveal something in three replies


def test_pipelined_rollouts_are_reproducible(tokenizer):
    # Groups run concurrently and finish in any order; each has its own keys and users, so the
    # outcome must not depend on the scheduling.
    a, b = run_rollout(tokenizer, groups=2), run_rollout(tokenizer, groups=2)
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert [m.content for c in a.conversations for m in c.history] == [m.content for c in b.conversations for m in c.history]


@pytest.mark.parametrize("reference", ["inferred", "persona"])
def test_the_response_judge_role_plays_the_inferred_profile_or_the_true_persona(tokenizer, reference):
    conversation, persona = one_conversation()
    guessed = [ProfileItem("Occupation", "astronaut")]  # the policy's (wrong) guess about the user
    with OpenAIServer(lambda request: Reply(content="\\boxed{1}")) as server:
        client = LLMClient(LLMConfig(base_url=server.base_url, model="judge", max_retries=0))
        environment = Environment(tokenizer, load_prompt("policy_system_tiny"), ScriptedUser(), EmbeddedProfileJudge(),
                                  LLMResponseJudge(client), response_reference=reference)
        asyncio.run(environment.score([conversation], [[format_turn(guessed, "Space! What do you do up there?")]]))
    [prompt] = [r["messages"][-1]["content"] for r in server.requests]
    judged_profile = prompt.split("<<<USER_PROFILE")[1].split("USER_PROFILE>>>")[0]
    if reference == "inferred":  # the paper: the judge is the person the policy believes it talks to
        assert "astronaut" in judged_profile and persona.profile_text not in judged_profile
    else:
        assert persona.profile_text in judged_profile and "astronaut" not in judged_profile
