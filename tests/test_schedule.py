"""rollout.schedule=turn: the pool of live conversations (dealing, turnover, JSON round trip),
user states that survive JSON, Rollout.play_turn with a turn per conversation, and a turn-schedule
run that, interrupted and resumed, equals the uninterrupted one (metrics, parameters, pool)."""

import asyncio
import json
import signal

import jax
import numpy as np
import pytest
from tiny_corpus import synthetic_corpus

from rlpa_jax.app.build import build_trainer
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.options import ConfigError
from rlpa_jax.dialogue.chat import Message, format_turn, load_prompt
from rlpa_jax.dialogue.judges.rules import EmbeddedProfileJudge, EmbeddedResponseJudge
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.users import user_state_from_json, user_state_to_json
from rlpa_jax.dialogue.users.scripted import ScriptedUser
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import load_tokenizer, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.rl.environment import Environment, start_conversations
from rlpa_jax.rl.rollout import Rollout
from rlpa_jax.rl.schedule import ConversationPool, dealt_persona, turns_played
from rlpa_jax.rl.trainer import POOL_DOCUMENT
from rlpa_jax.runtime import multihost
from rlpa_jax.runtime.checkpoint import Checkpointer

PERSONAS = synthetic_personas(5, seed=4)


def assistant_turn(conversation, k: int) -> Message:
    """A host-side stand-in for the policy: it names one of the user's true items, so the scripted
    user's relatedness scores and RNG both come into play."""
    item = conversation.user.persona.items[k % len(conversation.user.persona.items)]
    return Message("assistant", f"Tell me about your {item.slot.lower()}, {item.value}?")


def play_host_turn(pool: ConversationPool, k: int) -> None:
    """One turn of every pool conversation without a model: refill, assistant message, user reply."""
    pool.refill()
    conversations = pool.conversations
    for c in conversations:
        c.history.append(assistant_turn(c, k))
    replies = asyncio.run(pool.user_sim.respond([c.user for c in conversations], [c.history for c in conversations]))
    for c, reply in zip(conversations, replies):
        c.history.append(Message("user", reply))


def new_pool(size=3, max_rounds=3, switch_turn=None) -> ConversationPool:
    return ConversationPool(size, PERSONAS, ScriptedUser(), seed=7, max_rounds=max_rounds, switch_turn=switch_turn)


# ------------------------------------------------------------------------------------------------ users


def test_a_user_restored_from_json_replies_the_same():
    user = ScriptedUser()
    original = user.start(PERSONAS[0], seed=11, switch_turn=3, switch_persona=PERSONAS[1])
    history = [Message("user", asyncio.run(user.respond([original], [[]]))[0])]
    restored = None
    for k in range(8):
        history.append(Message("assistant", f"What about your {PERSONAS[0].items[k % 4].slot.lower()}?"))
        if k == 4:  # past the switch: the restored user must play the switched persona
            document = json.loads(json.dumps(user_state_to_json(original)))
            restored = user_state_from_json(document, PERSONAS[0], PERSONAS[1])
            assert restored.switched and restored.persona is PERSONAS[1] and restored.original_persona is PERSONAS[0]
            restored_history = list(history)
        (reply,) = asyncio.run(user.respond([original], [history]))
        if restored is not None:
            (again,) = asyncio.run(user.respond([restored], [restored_history]))
            assert again == reply
            restored_history.append(Message("user", again))
        history.append(Message("user", reply))
    assert (restored.turn, restored.revealed, restored.rng.getstate()) == (original.turn, original.revealed,
                                                                           original.rng.getstate())


# ------------------------------------------------------------------------------------------------ the pool


def test_the_pool_deals_every_persona_once_before_any_twice():
    dealt = [dealt_persona(5, 7, k) for k in range(15)]
    for epoch in range(3):
        assert sorted(dealt[5 * epoch:5 * epoch + 5]) == [0, 1, 2, 3, 4]
    assert dealt[:5] != dealt[5:10]  # each pass is its own permutation


def test_finished_conversations_are_replaced_by_new_users():
    pool = new_pool(size=3, max_rounds=2)
    assert pool.refill() == 3 and [c.conversation_id for c in pool.conversations] == [0, 1, 2]
    play_host_turn(pool, 0)
    assert pool.turns() == [1, 1, 1] and pool.finished() == 0 and pool.refill() == 0
    pool.conversations[1].active = False  # the user left (a failed simulator reply)
    assert pool.finished() == 1
    play_host_turn(pool, 1)  # refills slot 1 first: conversation 3 plays its first turn
    assert [c.conversation_id for c in pool.conversations] == [0, 3, 2] and pool.turns() == [2, 1, 2]
    assert pool.finished() == 2  # 0 and 2 reached max_rounds
    assert pool.refill() == 2 and [c.conversation_id for c in pool.conversations] == [4, 3, 5]
    assert [c.persona for c in pool.conversations] == [PERSONAS[dealt_persona(5, 7, k)] for k in (4, 3, 5)]
    assert all(c.history[0].content == "Hello" and len(c.history) == 1 for c in (pool.conversations[0],
                                                                               pool.conversations[2]))


def test_a_pool_restored_from_json_plays_on_exactly_as_the_original():
    original = new_pool(size=3, max_rounds=3, switch_turn=2)
    for k in range(2):
        play_host_turn(original, k)
    assert all(c.user.switched for c in original.conversations)  # the restored users must play the new persona
    document = json.loads(json.dumps(original.to_json()))  # what the checkpoint stores, through text
    restored = new_pool(size=3, max_rounds=3, switch_turn=2)
    restored.load_json(document)
    assert restored.to_json() == original.to_json()
    for k in range(2, 7):  # past max_rounds: refills happen on both sides
        play_host_turn(original, k)
        play_host_turn(restored, k)
    assert restored.to_json() == original.to_json() and original.started > 3


def test_a_pool_whose_slots_no_process_played_is_refused_after_a_turn():
    pool = new_pool(size=3)
    play_host_turn(pool, 0)
    before = pool.to_json()
    pool.take_peer_turns(frozenset({0, 1, 2}))  # one process played every slot: nothing to take
    assert pool.to_json() == before
    with pytest.raises(multihost.ProcessMismatch, match=r"played by \[1, 0, 1\] processes"):
        pool.take_peer_turns(frozenset({0, 2}))


def test_a_pool_of_another_size_is_refused_on_resume():
    document = new_pool(size=3).to_json()
    with pytest.raises(ValueError, match=r"step 4: the saved conversation pool has 3 slots but "
                                         r"rollout.conversations=2"):
        new_pool(size=2).load_json(document, "step 4")


# ------------------------------------------------------------------------------------------------ config


def test_cross_turn_advantages_are_refused_with_the_turn_schedule():
    with pytest.raises(ConfigError, match=r"ppo.advantage=cross_turn .* rollout.schedule=turn"):
        load_config(None, ["rollout.schedule=turn", "ppo.advantage=cross_turn"])
    with pytest.raises(ConfigError, match=r"rollout.schedule: expected one of "
                                          r"\['conversation', 'turn'\], got 'weekly'"):
        load_config(None, ["rollout.schedule=weekly"])
    assert load_config(None).rollout.schedule == "conversation"  # the embedded default keeps its behaviour


# ------------------------------------------------------------------------------------------------ play_turn


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512))


def test_play_turn_advances_each_conversation_one_turn_at_its_own_index(tokenizer):
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    environment = Environment(tokenizer, load_prompt("policy_system_tiny"), ScriptedUser(), EmbeddedProfileJudge(),
                              EmbeddedResponseJudge(), max_prompt_tokens=256)
    engine = GenerationEngine(config, stop_token_ids(tokenizer), tokenizer.pad_token_id, prompt_buckets=(64, 128, 256))
    engine.sync(init_params(config, jax.random.key(0)))
    rollout = Rollout(environment, engine, SamplingParams(max_new_tokens=8, num_samples=2), max_rounds=3, groups=2)
    conversations = start_conversations(PERSONAS[:3], ScriptedUser(), [1, 2, 3], first_id=10)
    conversations[1].history += [Message("assistant", format_turn([], "How are you?")), Message("user", "Fine.")]
    turns = [turns_played(c) for c in conversations]
    assert turns == [0, 1, 0]
    result = rollout.play_turn(conversations, turns, jax.random.key(1))
    assert len(result.samples) == 3 * 2 and result.stats["samples"] == 6
    assert sorted((s.conversation_id, s.turn) for s in result.samples if s.chosen) == [(10, 0), (11, 1), (12, 0)]
    assert [turns_played(c) for c in conversations] == [1, 2, 1]
    assert all(c.history[-1].role == "user" for c in conversations)


# ------------------------------------------------------------------------------------------------ a run

SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.schedule=turn", "rollout.conversations=3", "rollout.max_rounds=3", "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=16", "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256",
    "ppo.train_batch_size=4", "ppo.micro_batch_size=2", "ppo.iterations=5", "sft.enabled=false",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.checkpoint_every=2", "logging.export_hf=false",
    "data.num_personas=4", "mesh.devices=1", "rollout.eval_conversations=2",
]


class RecordingSampler:
    """The run's own sampler, noting how many prompt rows each call gets."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, params, tokens, *rest):
        self.rows.append(tokens.shape[0])
        return self.inner(params, tokens, *rest)


def ppo_records(config) -> list[dict]:
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "sampler_compiles" and not k.endswith(("_s", "per_s"))}
            for r in records if r["phase"] == "ppo"]


def final_checkpoint(config):
    checkpointer = Checkpointer(config.run_dir / "checkpoints")
    state, _ = checkpointer.restore(config.ppo.iterations)
    _, _, _, documents = checkpointer.resume(None, (POOL_DOCUMENT,))
    return state, documents[POOL_DOCUMENT]


def test_an_interrupted_and_resumed_turn_run_equals_the_uninterrupted_one(tmp_path):
    whole = load_config(None, SMALL + [f"output_dir={tmp_path / 'whole'}"])
    trainer = build_trainer(whole)
    trainer.engine.sampler = sampler = RecordingSampler(trainer.engine.sampler)
    trainer.train()
    reference = ppo_records(whole)
    # The start-up memory check compiles the sampler for the largest call the pool makes: 3 slots in
    # 2 pipeline groups are calls of 2 and 1 prompts, every iteration.
    program = trainer.memory_programs()[0]
    [mask] = [a for a in jax.tree.leaves(program.lowered.args_info) if a.dtype == np.bool_]  # the prompt mask
    assert program.name == "sampler" and mask.shape[0] == 2 and set(sampler.rows) == {2, 1}
    # Three slots, three turns each: iterations 0-2 play turns 1-3 of conversations 0-2, iteration 3
    # starts conversations 3-5 in every slot.
    assert [r["pool_turn"] for r in reference] == [1, 2, 3, 1, 2]
    assert [r["conversations_started"] for r in reference] == [3, 0, 0, 3, 0]
    assert [r["conversations_finished"] for r in reference] == [0, 0, 3, 0, 0]
    assert all(r["samples"] == 3 * 2 for r in reference)

    parted = load_config(None, SMALL + [f"output_dir={tmp_path / 'parted'}"])
    first = build_trainer(parted)
    # Ctrl-C during iteration 0: the run saves at step 1, mid-dialogue (every conversation at turn 1 of 3).
    first.on_iteration_end.append(lambda i, m: signal.raise_signal(signal.SIGINT) if i == 0 else None)
    first.train()
    assert first.checkpointer.latest_step() == 1
    saved = first.checkpointer.resume(None, (POOL_DOCUMENT,))[3][POOL_DOCUMENT]
    assert [slot["turn"] for slot in saved["slots"]] == [1, 1, 1]
    build_trainer(parted, "resume").train()
    resumed = ppo_records(parted)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key != "phase":
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)

    (state_a, pool_a), (state_b, pool_b) = final_checkpoint(whole), final_checkpoint(parted)
    assert pool_a == pool_b and pool_a["started"] == 6
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_judges_that_stop_scoring_save_the_pool_as_it_was_before_the_failed_iteration(tmp_path, monkeypatch):
    from openai_server import OpenAIServer, Reply

    from rlpa_jax.dialogue.chat import parse_turn
    from rlpa_jax.dialogue.profile import ProfileItem
    from rlpa_jax.rl import environment
    from rlpa_jax.rl.trainer import UnscoredRollouts

    # Only well-formed turns go to the judges; these judges answer the start-up probe, then never decide.
    turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward do you work on?"))
    monkeypatch.setattr(environment, "parse_turn", lambda text: turn)
    def handler(request):
        return Reply(content="OK" if request["messages"][-1]["content"] == "Reply with OK." else "No.")

    with OpenAIServer(handler) as server:
        config = load_config(None, SMALL + [f"output_dir={tmp_path}", "judges.kind=llm", "judges.llm.cache_path=null",
                                            f"judges.llm.base_url={server.base_url}", "judges.llm.max_retries=0",
                                            "rollout.max_invalid_iterations=2"])
        trainer = build_trainer(config)
        with pytest.raises(UnscoredRollouts):
            trainer.train()
    assert trainer.pool.turns() == [2, 2, 2]  # iterations 0 and 1 both played a turn
    # --resume retries iteration 1 from the pool iteration 0 left, not the one iteration 1 advanced.
    step, _, _, documents = trainer.checkpointer.resume(None, (POOL_DOCUMENT,))
    assert step == 1 and [slot["turn"] for slot in documents[POOL_DOCUMENT]["slots"]] == [1, 1, 1]
