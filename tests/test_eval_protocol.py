"""The ALOE protocol end to end: every setting on a tiny random model with the scripted user and
embedded judges; policy, user and judges behind a real OpenAI-compatible HTTP server; checkpoints
and the launch/eval.py command line."""

import asyncio
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from openai_server import OpenAIServer, Reply
from tiny_corpus import synthetic_corpus

from rlpa_jax.app.commands import eval as eval_command
from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.dialogue.chat import Message, format_turn, load_prompt
from rlpa_jax.dialogue.judges.llm import LLMResponseJudge
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.dialogue.matching import canonical_slot, mentioned_item_indices
from rlpa_jax.dialogue.personas import load_aloe_pool, pair_for_evaluation, personas_from_pairs, synthetic_personas
from rlpa_jax.dialogue.profile import SLOTS, format_profile, profile_f1
from rlpa_jax.dialogue.users.llm import LLMUser
from rlpa_jax.dialogue.users.scripted import ScriptedUser, reveal_sentence
from rlpa_jax.eval import metrics, settings
from rlpa_jax.eval.plots import plot_al_curves, plot_profile_scores
from rlpa_jax.eval.policies import ChatPolicy, JaxPolicy, turn_from_text
from rlpa_jax.eval.protocol import run_protocol
from rlpa_jax.eval.result import EvalResult
from rlpa_jax.eval.settings import EXTRA_ITEMS, EvalSetting, conflict_partners, extended_personas
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import load_tokenizer, train_tiny_tokenizer
from rlpa_jax.offline.teacher import teacher_turn
from rlpa_jax.runtime import hf_export, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, checkpoint_directory, model_config_to_meta, restore_actor_params
from rlpa_jax.runtime.parallel import param_shardings
from rlpa_jax.training.updater import Trainable

REPO = Path(__file__).resolve().parents[1]
TINY = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
USERS = 3  # every JAX run uses 3 conversations and one prompt bucket: a single compiled program
POLICY_OPTIONS = dict(max_new_tokens=12, prompt_buckets=(256,), max_prompt_tokens=256)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def policy(tokenizer_dir, params):
    return JaxPolicy.from_params(params, TINY, load_tokenizer(tokenizer_dir), load_prompt("policy_system_tiny"), "tiny-random",
                     **POLICY_OPTIONS)


@pytest.fixture(scope="module")
def personas():
    return synthetic_personas(USERS, seed=5)


def run_embedded(policy, personas, setting, turns, **kw):
    return run_protocol(policy, personas, ScriptedUser(), EmbeddedResponseJudge(), turns, setting,
                        EmbeddedProfileJudge(), seed=1, **kw)


def roles(transcript):
    return [message["role"] for message in transcript["messages"]]


class RecordingJudge:
    """The embedded response judge, recording what each turn's requests held."""

    def __init__(self):
        self.inner = EmbeddedResponseJudge()
        self.persona_ids: list[list[str]] = []
        self.history_shapes: list[set[tuple[int, str]]] = []
        self.replies: list[list[str]] = []

    async def judge(self, requests):
        self.persona_ids.append([request.persona.persona_id for request in requests])
        self.history_shapes.append({(len(request.history), request.history[-1].role) for request in requests})
        self.replies.append([request.reply for request in requests])
        return await self.inner.judge(requests)


# ---------------------------------------------------------------------------------------------
# Policy turns


def test_turn_from_text_shows_only_the_response():
    profile = synthetic_personas(1, seed=2)[0].items[:2]
    good = turn_from_text(format_turn(profile, "Which trail do you like?"), two_part=True)
    assert good.response == "Which trail do you like?" and good.profile == list(profile)
    broken = turn_from_text("<profile>\n- Age: 3\n</profile>\nHi there, how are you?", two_part=True)
    assert broken.response == "Hi there, how are you?" and broken.profile is None
    plain = turn_from_text("  <b>Hello!</b>  ", two_part=False)
    assert plain.response == "<b>Hello!</b>" and plain.profile is None and plain.error is None


def test_jax_policy_per_conversation_prompts_share_one_program(policy, personas):
    histories = [[Message("user", "Hello")], [Message("user", "Hello"), Message("assistant", "Hi! How are you?"),
                                              Message("user", "I work as a nurse.")], [Message("user", "Hey there")]]
    other = policy.with_system_prompt("Chat briefly and kindly with the user.", name="other-prompt")
    assert other.engine is policy.engine and other.name == "other-prompt"
    compiled = policy.engine.compile_count
    mixed = asyncio.run(policy.respond_with_system_prompts(
        histories, [policy.system_prompt, other.system_prompt, policy.system_prompt]))
    alone = asyncio.run(policy.respond(histories))
    alone_other = asyncio.run(other.respond(histories))
    assert [mixed[0], mixed[2]] == [alone[0], alone[2]] and mixed[1] == alone_other[1]
    assert policy.engine.compile_count == max(compiled, 1)  # one bucket, one batch size: one program
    chunked = JaxPolicy(policy.engine, policy.tokenizer, policy.system_prompt, "chunked",
                        max_new_tokens=policy.sampling.max_new_tokens, max_prompt_tokens=policy.max_prompt_tokens,
                        max_batch_size=2)
    assert asyncio.run(chunked.respond(histories)) == alone
    assert policy.engine.compile_count == max(compiled, 1) + 1  # chunks of 2, the last one padded


# ---------------------------------------------------------------------------------------------
# The four settings on a tiny random model


def test_policy_on_a_mesh_answers_as_on_one_device(policy, params, personas):
    """launch/eval.py's policy samples on the config's mesh (rows over every device, the
    rollout's replicated layout); one call, calls of max_batch_size and the prefix cache over two
    turns all give the one-device policy's greedy tokens."""
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=len(jax.devices()), tensor=1))
    placed = parallel.shard(params, param_shardings(TINY, mesh))
    first = [[Message("user", f"Hello, I am {persona.persona_id}.")] for persona in personas]
    expected_first = policy.generate_texts(first)
    second = [history + [Message("assistant", text), Message("user", "Tell me more.")]
              for history, text in zip(first, expected_first)]
    expected_second = policy.generate_texts(second)
    # The prefix cache keeps what fits below the new suffix's block of the smallest bucket.
    for options in ({}, {"max_batch_size": 2}, {"prefix_cache": True, "prompt_buckets": (64, 128, 256)}):
        on_mesh = JaxPolicy.from_params(placed, TINY, policy.tokenizer, policy.system_prompt, "on-mesh", mesh=mesh,
                                        **(POLICY_OPTIONS | options))
        assert on_mesh.share(USERS) == list(range(USERS))  # one process plays every user
        assert on_mesh.generate_texts(first) == expected_first, options
        assert on_mesh.generate_texts(second) == expected_second, options
        assert on_mesh.generate_texts([]) == []
    assert on_mesh.engine.prefix_sampler.counts["reused_rows"] == USERS  # the second turn continued the first


def test_vanilla_runs_and_is_reproducible(policy, personas):
    result = run_embedded(policy, personas, "vanilla", 3)
    assert result.judgments.shape == (USERS, 3)
    assert set(np.unique(result.judgments)) <= {0.0, 1.0}
    per_turn = metrics.al_per_turn(result.judgments)
    assert result.al.per_turn == pytest.approx(per_turn.al.tolist()) and result.al.unscored == [0, 0, 0]
    for transcript, persona in zip(result.transcripts, personas):
        # Cold start, alternating turns, no user message after the last reply.
        assert roles(transcript) == ["user", "assistant"] * 3
        assert transcript["messages"][0]["content"] == "Hello" and transcript["persona_id"] == persona.persona_id
        for message in transcript["messages"][1::2]:
            assert message["content"] == turn_from_text(message["text"], two_part=True).response
    again = run_embedded(policy, personas, "vanilla", 3)
    assert again.transcripts == result.transcripts  # greedy decoding and seeded users


def test_extended_personas_use_unseen_free_form_keys(personas):
    extended = extended_personas(personas, seed=3)
    assert extended == extended_personas(personas, seed=3)
    for base, persona in zip(personas, extended):
        base_values = [item.value for item in base.items]
        assert [item.value for item in persona.items[: len(base.items)]] == base_values
        extras = persona.items[len(base.items):]
        assert 1 <= len(extras) <= 2
        for item in persona.items:
            assert canonical_slot(item.slot) not in SLOTS, item  # the judges cannot map it back
        for item in extras:
            assert item.value in EXTRA_ITEMS[item.slot] and item.value in persona.profile_text
        for index, item in enumerate(persona.items):
            # The scripted user can state every item, and the judges recognise the statement.
            sentence = reveal_sentence(item, random.Random(0))
            assert item.slot.lower() in sentence.lower() or item.value in sentence
            assert index in mentioned_item_indices(persona.items, sentence)


def test_extended_setting_runs(policy, personas):
    result = run_embedded(policy, personas, "extended", 3)
    assert result.judgments.shape == (USERS, 3)
    slots = {slot for transcript in result.transcripts for slot, _ in transcript["persona_items"]}
    assert slots and not slots & set(SLOTS)
    user_text = " ".join(m["content"] for t in result.transcripts for m in t["messages"] if m["role"] == "user")
    assert re.search(r"\bMy [a-z -]+ is ", user_text), user_text  # free-form reveals reach the policy


def test_conflict_switches_persona_and_judges_against_the_active_one(policy, personas):
    judge = RecordingJudge()
    result = run_protocol(policy, personas, ScriptedUser(), judge, 4, "conflict", seed=1, switch_turn=3)
    partners = conflict_partners(personas, seed=1)
    for transcript, persona, partner in zip(result.transcripts, personas, partners):
        assert partner.persona_id != persona.persona_id and transcript["switch_persona_id"] == partner.persona_id
        assert transcript["judged_against"] == [persona.persona_id] * 2 + [partner.persona_id] * 2
        # Turn 3's user message (the user's message 2) is the first one from the new persona.
        assert transcript["messages"][4]["role"] == "user" and "Actually" in transcript["messages"][4]["content"]
    assert judge.persona_ids == [[t["judged_against"][k] for t in result.transcripts] for k in range(4)]
    # The judge sees the conversation up to the user's message of that turn, and the visible reply.
    assert judge.history_shapes == [{(2 * k + 1, "user")} for k in range(4)]
    assert judge.replies == [[t["messages"][2 * k + 1]["content"] for t in result.transcripts] for k in range(4)]
    with pytest.raises(ValueError, match="switch_turn"):
        run_protocol(policy, personas, ScriptedUser(), judge, 4, "conflict", switch_turn=5)


def test_conflict_partners_come_from_the_whole_aloe_pool(aloe_dir):
    pool = personas_from_pairs(pair_for_evaluation(*load_aloe_pool(aloe_dir, "eval")))
    first = pool[:4]  # ALOE's eval pairs come five to a profile: these four share one paragraph
    assert len({persona.profile_text for persona in first}) == 1
    partners = conflict_partners(first, seed=0, pool=pool)
    assert all(p.profile_text != persona.profile_text for p, persona in zip(partners, first))
    alone = conflict_partners(first, seed=0)  # no other paragraph to switch to: personality only
    assert all(p.persona_id != persona.persona_id for p, persona in zip(alone, first))
    with pytest.raises(ValueError, match="at least 2"):
        conflict_partners(first[:1], seed=0)


def test_long_term_checks_profiles_on_a_copy_of_the_history(policy, personas):
    result = run_embedded(policy, personas, "long_term", 20, profile_every=10)
    assert result.judgments.shape == (USERS, 20)
    assert [check["turn"] for check in result.profile_scores] == [10, 20]
    request = load_prompt("profile_request")
    for transcript in result.transcripts:
        assert roles(transcript) == ["user", "assistant"] * 20  # the probes are not in the dialogue
        assert all(request not in m["content"] for m in transcript["messages"])
        checks = transcript["profile_checks"]
        assert [c["turn"] for c in checks] == [10, 20]
        assert all(0 <= c["score"] <= 100 for c in checks)
        assert 0 < checks[0]["revealed_share"] <= checks[1]["revealed_share"] <= 100
        for check in checks:
            # The ceiling is the F1 of stating exactly the revealed items (P = 1, R = share).
            share = check["revealed_share"] / 100
            assert check["ceiling"] == pytest.approx(100 * 2 * share / (1 + share))
    for summary, turn_index in zip(result.profile_scores, (0, 1)):
        per_user = [t["profile_checks"][turn_index] for t in result.transcripts]
        for key in ("score", "revealed_share", "ceiling"):
            assert summary[key] == pytest.approx(np.mean([c[key] for c in per_user]))
    with pytest.raises(ValueError, match="profile_judge"):
        run_protocol(policy, personas, ScriptedUser(), EmbeddedResponseJudge(), 2, "long_term")


class TeacherPolicy:
    """The SFT teacher as a policy: it states every item the user's words mention and asks about
    the next slot. It is not a model; it shows the protocol tells a good policy from a random one."""

    name = "teacher"

    def __init__(self, personas):
        self.personas, self.rng = personas, random.Random(0)

    async def respond(self, histories):
        turns = []
        for persona, history in zip(self.personas, histories):
            said = [m.content for m in history if m.role == "user"]
            mentioned = sorted(set().union(*(mentioned_item_indices(persona.items, text) for text in said)))
            profile, reply = teacher_turn(history, [persona.items[i] for i in mentioned], self.rng)
            turns.append(turn_from_text(format_turn(profile, reply), two_part=True))
        return turns


def test_a_setting_is_one_table_entry(personas, monkeypatch):
    # Extended personas that switch at turn 3, profile checks every 2 turns: the fields compose.
    monkeypatch.setitem(settings.EVAL_SETTINGS, "extended_conflict",
                        EvalSetting("extended personas that switch", turns=4, personas=extended_personas,
                                    switch_turn=3, profile_every=2))
    arguments = load_launcher().parse_args(["--policy", "x", "--setting", "extended_conflict"])
    assert arguments.setting == "extended_conflict"
    judge = RecordingJudge()
    result = run_protocol(TeacherPolicy(personas), personas, ScriptedUser(), judge, None, "extended_conflict",
                          EmbeddedProfileJudge(), seed=1)
    assert result.setting == "extended_conflict" and result.judgments.shape == (USERS, 4)  # the entry's turns
    extended = extended_personas(personas, seed=1)
    partners = conflict_partners(extended, seed=1)
    for transcript, persona, partner in zip(result.transcripts, extended, partners):
        assert transcript["persona_id"] == persona.persona_id and persona.persona_id.endswith("-extended")
        assert transcript["judged_against"] == [persona.persona_id] * 2 + [partner.persona_id] * 2
        assert [check["turn"] for check in transcript["profile_checks"]] == [2, 4]
    assert [summary["turn"] for summary in result.profile_scores] == [2, 4]
    with pytest.raises(ValueError, match="setting vanilla has no switch_turn.*conflict, extended_conflict"):
        run_protocol(TeacherPolicy(personas), personas, ScriptedUser(), judge, 2, "vanilla", switch_turn=2)
    with pytest.raises(ValueError, match="'sideways' is not one of vanilla, extended, conflict, long_term"):
        run_protocol(TeacherPolicy(personas), personas, ScriptedUser(), judge, 2, "sideways")


def test_protocol_ranks_the_teacher_above_the_random_model(policy, personas):
    random_model = run_embedded(policy, personas, "long_term", 6, profile_every=3)
    teacher = run_embedded(TeacherPolicy(personas), personas, "long_term", 6, profile_every=3)
    assert teacher.al.per_turn[0] == 100.0 and teacher.al.metrics["AVG"] > random_model.al.metrics["AVG"] + 50
    for good, bad in zip(teacher.profile_scores, random_model.profile_scores):
        assert good["score"] > bad["score"] and good["score"] == pytest.approx(good["ceiling"], abs=10)


def test_results_round_trip_json_and_plot(policy, personas, tmp_path):
    result = run_embedded(policy, personas, "long_term", 2, profile_every=1)
    loaded = EvalResult.load(result.save(tmp_path / "r.json"))
    np.testing.assert_array_equal(loaded.judgments, result.judgments)
    assert loaded.al == result.al and loaded.transcripts == result.transcripts
    other = json.loads((tmp_path / "r.json").read_text()) | {"name": "other"}
    assert plot_al_curves([result, other], tmp_path / "al.png").stat().st_size > 0
    assert plot_profile_scores([loaded], tmp_path / "profile.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not an evaluation result"):
        EvalResult.from_json({"name": "x"}, "bad.json")


# ---------------------------------------------------------------------------------------------
# Policy, simulated user and judges behind a real OpenAI-compatible server

POLICY_PROMPT = "You are the chat policy under test."


def conversation_of(request) -> str:
    return "\n".join(str(message.get("content")) for message in request["messages"])


def user_index(text: str) -> int | None:
    found = re.search(r"I am user (\d)", text)
    return int(found.group(1)) if found else None


def http_world(personas, policy_reply, judge_reply):
    """A handler playing three roles, told apart by their prompts: policy, role-play user, judge."""

    def handler(request):
        messages = request["messages"]
        if messages[0]["content"] == POLICY_PROMPT:
            turn = sum(1 for m in messages if m["role"] == "user")
            return policy_reply(user_index(conversation_of(request)), turn, messages[-1]["content"])
        text = conversation_of(request)
        if "<<<CONVERSATION" in text:
            fenced = text.split("<<<CONVERSATION\n", 1)[1].split("\nCONVERSATION>>>", 1)[0]
            turn = sum(1 for line in fenced.splitlines() if line.startswith("User: "))
            return judge_reply(user_index(fenced), turn)
        index = next(i for i, persona in enumerate(personas) if persona.profile_text in messages[0]["content"])
        turn = sum(1 for m in messages if m["role"] == "user")  # the policy's replies, seen flipped
        return f"I am user {index}. My note: {personas[index].items[turn - 1].value}."

    return handler


def http_client(server):
    return LLMClient(LLMConfig(base_url=server.base_url, model="scripted", max_retries=0, backoff_initial_s=0.01))


def test_al_follows_the_http_judge_exactly_and_failures_stay_unscored(personas):
    def policy_reply(user, turn, _last):
        if user == 1 and turn == 3:
            return Reply(status=400, error_message="scripted policy failure")
        return f"<profile>\n- Secret: s{turn}\n</profile>\n\n<response>\nReply {turn}, tell me more?\n</response>"

    def judge_reply(user, turn):
        if user == 2 and turn == 2:
            return "I cannot decide."  # no \boxed{}: unscored, the dialogue goes on
        return "Odd turn, pass. \\boxed{1}" if turn % 2 else "Even turn, fail. \\boxed{0}"

    with OpenAIServer(http_world(personas, policy_reply, judge_reply)) as server:
        client = http_client(server)
        chat = ChatPolicy(client, POLICY_PROMPT, "http-policy", two_part=True)
        result = run_protocol(chat, personas, LLMUser(client), LLMResponseJudge(client, max_attempts=1), 4)
    assert result.al.per_turn == [100.0, 0.0, 100.0, 0.0]
    assert result.al.unscored == [0, 1, 1, 1]
    nan = np.nan
    np.testing.assert_array_equal(result.judgments, [[1, 0, 1, 0], [1, 0, nan, nan], [1, nan, 1, 0]])
    assert result.al.metrics["N-IR"] == pytest.approx(metrics.n_ir([100, 0, 100, 0]))
    assert "policy failed at turn 3" in result.transcripts[1]["stop_reason"]
    # Only the <response> part ever reached the user and the judge.
    others = [r for r in server.requests if r["messages"][0]["content"] != POLICY_PROMPT]
    assert others and not any("Secret" in conversation_of(r) for r in others)
    assert any("Reply 2, tell me more?" in conversation_of(r) for r in others)


def test_long_term_profile_scores_over_http(personas):
    request_text = load_prompt("profile_request")

    def policy_reply(user, turn, last):
        if last != request_text:
            return f"Reply {turn}. What else do you enjoy?"
        if user == 2:
            return Reply(status=500, error_message="scripted outage")
        items = personas[user].items if user == 0 else personas[user].items[:2]
        return "Here is what I know:\n" + format_profile(items)

    with OpenAIServer(http_world(personas, policy_reply, lambda user, turn: "\\boxed{1}")) as server:
        client = http_client(server)
        chat = ChatPolicy(client, POLICY_PROMPT, "http-plain", two_part=False)
        result = run_protocol(chat, personas, LLMUser(client), LLMResponseJudge(client, max_attempts=1), 4,
                              "long_term", EmbeddedProfileJudge(), profile_every=2)
    assert result.al.per_turn == [100.0] * 4
    expected_score = (100.0 + 100.0 * profile_f1(2, 2, len(personas[1].items))) / 2
    for check_index, summary in enumerate(result.profile_scores):
        assert summary["turn"] == 2 * (check_index + 1)
        assert summary["score"] == pytest.approx(expected_score) and (summary["scored"], summary["unscored"]) == (2, 1)
        shares = []
        for user in (0, 1):
            transcript = result.transcripts[user]
            replies = [m["content"] for m in transcript["messages"][: 2 * summary["turn"]] if m["role"] == "user"]
            revealed = set().union(*(mentioned_item_indices(personas[user].items, reply) for reply in replies))
            shares.append(100.0 * len(revealed) / len(personas[user].items))
            check = transcript["profile_checks"][check_index]
            assert check["revealed_share"] == pytest.approx(shares[-1])
            assert check["ceiling"] == pytest.approx(100 * profile_f1(len(revealed), len(revealed),
                                                                      len(personas[user].items)))
        assert summary["revealed_share"] == pytest.approx(np.mean(shares))
    role_play = [r for r in server.requests if "<<<" not in conversation_of(r)
                 and r["messages"][0]["content"] != POLICY_PROMPT]
    assert role_play and not any(request_text in conversation_of(r) for r in role_play)


def test_chat_policy_prompts_and_failures_over_http():
    def handler(request):
        system = request["messages"][0]["content"]
        if system == "prompt B":
            return Reply(status=400, error_message="scripted refusal")
        return f"({system}) Nice to meet you! What keeps you busy these days?"

    with OpenAIServer(handler) as server:
        chat = ChatPolicy(http_client(server), "prompt A", "http-chat", max_tokens=40)
        histories = [[Message("user", "Hello")]] * 3
        turns = asyncio.run(chat.respond_with_system_prompts(histories, ["prompt A", "prompt B", "prompt C"]))
        plain = asyncio.run(chat.with_system_prompt("prompt C").respond(histories[:1]))
    assert [t.response.split(")")[0] for t in (turns[0], turns[2])] == ["(prompt A", "(prompt C"]
    assert turns[1].error and "scripted refusal" in turns[1].error and turns[1].response == ""
    assert plain[0] == turns[2] and chat.failures == 1
    assert sorted(r["messages"][0]["content"] for r in server.requests) == ["prompt A", "prompt B", "prompt C",
                                                                           "prompt C"]
    assert all(r["max_tokens"] == 40 for r in server.requests)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the command line


def save_checkpoint(directory, params, tokenizer_dir, trainer_format):
    meta = {"model_config": model_config_to_meta(TINY), "tokenizer_dir": str(tokenizer_dir)}
    if trainer_format:
        optimizer = optax.adam(1e-3)
        state = {"actor": Trainable(params, optimizer.init(params)), "reference": params}
    else:
        state, meta = {"actor": params}, meta | {"system_prompt": "policy_system_tiny"}
    checkpointer = Checkpointer(directory)
    checkpointer.save(7, state, meta)
    checkpointer.close()
    return directory


@pytest.mark.parametrize("trainer_format", [True, False])
def test_policy_from_checkpoint_reads_the_actor(tmp_path, params, tokenizer_dir, trainer_format):
    save_checkpoint(tmp_path / "run" / ("checkpoints" if trainer_format else "sft"), params, tokenizer_dir,
                    trainer_format)
    policy = JaxPolicy.from_checkpoint(tmp_path / "run", **POLICY_OPTIONS)  # the run directory is enough
    jax.tree.map(np.testing.assert_array_equal, policy.engine.params, params)
    assert policy.engine.model_config == TINY and policy.name.endswith("@7")
    expected_prompt = load_prompt("policy_system" if trainer_format else "policy_system_tiny")
    assert policy.system_prompt == expected_prompt
    with pytest.raises(FileNotFoundError, match="step 3"):
        JaxPolicy.from_checkpoint(tmp_path / "run", step=3)


def test_checkpoint_restores_straight_into_shardings(tmp_path, params, tokenizer_dir):
    directory = save_checkpoint(tmp_path / "checkpoints", params, tokenizer_dir, trainer_format=True)
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=len(jax.devices()), tensor=1))
    shardings = param_shardings(TINY, mesh)
    restored, meta, step = restore_actor_params(directory, shardings=shardings)
    assert step == 7 and meta["tokenizer_dir"] == str(tokenizer_dir)
    for array, sharding, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), jax.tree.leaves(params)):
        assert array.sharding == sharding
        np.testing.assert_array_equal(array, saved)


def test_policy_loading_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        checkpoint_directory(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
        checkpoint_directory(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        JaxPolicy.from_hf(tmp_path / "empty")


def test_policy_from_hf_directory(tmp_path, params, tokenizer_dir):
    hf_export.export_hf(params, TINY, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    policy = JaxPolicy.from_hf(tmp_path / "hf", prompt_name="policy_system_tiny", **POLICY_OPTIONS)
    jax.tree.map(np.testing.assert_allclose, policy.engine.params, params)
    assert policy.name == "hf" and policy.engine.model_config.vocab_size == 512


def test_command_line_writes_table_json_and_png(tmp_path, params, tokenizer_dir, policy, personas):
    checkpoints = save_checkpoint(tmp_path / "run" / "checkpoints", params, tokenizer_dir, trainer_format=True)
    earlier = run_embedded(policy, personas, "vanilla", 2)
    earlier.name = "earlier-run"
    earlier_path = earlier.save(tmp_path / "earlier.json")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    command = [sys.executable, str(REPO / "launch" / "eval.py"), "--policy", str(checkpoints), "--setting", "vanilla",
               "--turns", "2", "--users", str(USERS), "--output", str(tmp_path / "out"), "--name", "tiny-cli",
               "--system-prompt", "policy_system_tiny", "--compare", str(earlier_path), "--no-progress",
               "rollout.max_new_tokens=12", "rollout.prompt_buckets=[256]", "rollout.max_prompt_tokens=256"]
    # timeout: a hang guard only (the run took 54 s beside other work, load average 9 on 2 cores)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AL(1)" in done.stdout and "N-IR" in done.stdout and "earlier-run" in done.stdout
    result = EvalResult.load(tmp_path / "out" / "tiny-cli_vanilla.json")
    assert result.name == "tiny-cli" and result.judgments.shape == (USERS, 2) and len(result.al.per_turn) == 2
    assert (tmp_path / "out" / "tiny-cli_vanilla.png").stat().st_size > 0



def load_launcher():
    """The program launch/eval.py runs (its arguments, evaluate and main)."""
    return eval_command


def test_command_line_errors_name_what_is_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))  # keep this process's cache
    launcher = load_launcher()
    for argv, named in (([str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
                        (["openai:some-model"], "--base-url"),
                        (["x", "--compare", str(tmp_path / "no.json")], "no.json")):
        with pytest.raises(SystemExit) as exit_:
            launcher.main(["--policy", *argv, "--no-progress"])
        assert exit_.value.code == 2
        assert named in capsys.readouterr().err
