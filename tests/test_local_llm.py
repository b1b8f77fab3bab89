"""LLM roles on a local checkpoint (backend local): the client's requests of one event-loop turn go
to the generation engine as one call, answers equal the engine's own, the response cache and token
usage work as on the OpenAI path, the judges and the user parse a local model's text (a model that
writes no verdict is re-asked, then the sample is unscored), roles on one folder share its weights,
and the config names what is missing."""

from __future__ import annotations

import asyncio
import shutil

import jax
import numpy as np
import pytest
from openai_server import OpenAIServer
from tiny_chat_folder import write_tiny_chat_folder

from rlpa_jax.app import build
from rlpa_jax.config.llm_sections import LLMSection
from rlpa_jax.config.options import ConfigError
from rlpa_jax.dialogue.chat import Message, format_turn, parse_turn
from rlpa_jax.dialogue.judges import ResponseRequest
from rlpa_jax.dialogue.judges.llm import LLMResponseJudge
from rlpa_jax.dialogue.llm import local
from rlpa_jax.dialogue.llm.client import LLMClient, client_from_section
from rlpa_jax.dialogue.llm.settings import LLMConfig
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.users import OPENING_MESSAGE
from rlpa_jax.generation.engine import Completion, Generated
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.hf import CheckpointError

CHATS = [
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello, I hike a lot."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What do you cook?"}],
    [{"role": "user", "content": "Tell me about Seattle."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = write_tiny_chat_folder(tmp_path_factory.mktemp("tok"), tmp_path_factory.mktemp("hf"))
    return path


class CallCounter:
    """Records the rows of each of a model engine's generate calls (requests, padded to a power of two)."""

    def __init__(self, engine, monkeypatch):
        self.calls: list[int] = []
        original = engine.generate

        def counted(prompts, sampling, key, **kw):
            self.calls.append(len(prompts))
            return original(prompts, sampling, key, **kw)

        monkeypatch.setattr(engine, "generate", counted)


def greedy(model: local.LocalModel, chats, max_new_tokens: int) -> tuple[list[str], Generated]:
    """The engine's own greedy answers to `chats`, in one call, and its output."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = model.chat.engine.generate([model.chat.prompt_ids(c) for c in chats], sampling, jax.random.key(0))
    return [model.chat.tokenizer.decode(s[0].tokens, skip_special_tokens=True) for s in out.completions], out


def test_a_local_role_answers_a_turn_in_one_generation_call_with_cache_and_usage(folder, tmp_path, monkeypatch):
    section = LLMSection(backend="local", checkpoint=str(folder), max_tokens=12, max_concurrency=16,
                         cache_path=str(tmp_path / "cache.jsonl"))
    client = client_from_section(section, "user.llm")
    model = local.shared_model(folder)
    expected, out = greedy(model, CHATS, 12)
    counter = CallCounter(model.chat.engine, monkeypatch)

    assert run_sync(client.complete_many(CHATS)) == expected
    assert counter.calls == [8]  # the turn's five requests: one generation call (padded to 8 rows)
    assert list(model.batcher.recent_batch_sizes)[-1] == 5
    usage = client.usage
    assert (usage.calls, usage.requests, usage.cache_hits, len(usage.latencies_s)) == (5, 5, 0, 5)
    assert usage.prompt_tokens == out.prompt_tokens == sum(len(model.chat.prompt_ids(c)) for c in CHATS)
    assert usage.completion_tokens == out.generated_tokens > 0  # real tokens, stop tokens included
    assert client.prices.cost(usage) == 0.0

    # A repeat comes from the response cache (a new client reads it from disk): no generation.
    again = client_from_section(section, "user.llm")
    assert run_sync(again.complete_many(CHATS)) == expected
    assert counter.calls == [8] and again.usage.cache_hits == 5 and again.usage.requests == 0
    assert client.config.endpoint == f"local:{folder.resolve()}" and client.config.model == folder.name


def test_a_local_role_caps_its_calls_at_max_concurrency_and_groups_by_sampling(folder, monkeypatch):
    client = LLMClient(LLMConfig(base_url="", model="m", backend="local", checkpoint=str(folder), max_tokens=6,
                                 max_concurrency=2))
    model = local.shared_model(folder)
    expected, _ = greedy(model, CHATS, 6)
    counter = CallCounter(model.chat.engine, monkeypatch)
    assert run_sync(client.complete_many(CHATS)) == expected
    assert counter.calls == [2, 2, 1]  # never padded past the cap

    async def mixed():  # one turn, two sampling settings: one call each
        return await asyncio.gather(client.complete_many(CHATS[:3]), client.complete_many(CHATS[3:], temperature=0.7))

    counter.calls.clear()
    client = LLMClient(LLMConfig(base_url="", model="m", backend="local", checkpoint=str(folder), max_tokens=6))
    greedy_part, sampled = run_sync(mixed())
    assert greedy_part == expected[:3] and all(isinstance(text, str) for text in sampled)
    assert sorted(counter.calls) == [2, 4] and sorted(list(model.batcher.recent_batch_sizes)[-2:]) == [2, 3]
    # A sampled call's key comes from its prompts: the same batch samples the same answers again.
    assert run_sync(client.complete_many(CHATS[3:], temperature=0.7)) == sampled


def test_a_local_judge_whose_model_writes_no_verdict_is_re_asked_then_unscored(folder, monkeypatch):
    """The tiny random model writes no \\boxed{} verdict: each attempt (a new nonce; re-asks at the
    retry temperature) is one generation call, and the sample ends unscored, as on the OpenAI path."""
    client = LLMClient(LLMConfig(base_url="", model="m", backend="local", checkpoint=str(folder), max_tokens=8,
                                 max_retries=0))
    model = local.shared_model(folder)
    counter = CallCounter(model.chat.engine, monkeypatch)
    judge = LLMResponseJudge(client, max_attempts=3, retry_temperature=0.7)
    [persona] = synthetic_personas(1, seed=0)
    history = (Message("user", OPENING_MESSAGE), Message("assistant", "Hi! What do you do?"),
               Message("user", "I nurse."))
    requests = [ResponseRequest(persona, history, "Which ward?"), ResponseRequest(persona, history, "Nice!")]
    assert run_sync(judge.judge(requests)) == [None, None]
    assert counter.calls == [2, 2, 2]
    assert judge.stats.unparsable == 6 and judge.stats.failed == 2
    assert "no usable verdict after 3 attempt(s)" in judge.last_problem


class ScriptedChat:
    """A local model whose engine writes scripted text (the tiny random one writes no verdicts): the
    real folder's tokenizer and chat template, and an engine that answers a judge's prompt (its
    inputs fenced in <<<...>>>) with a verdict and anything else as the role-played user."""

    def __init__(self, real):
        self.tokenizer, self.real = real.tokenizer, real
        self.engine = self
        self.stop_ids, self.model_config = real.engine.stop_ids, real.engine.model_config
        self.prompts: list[str] = []

    def prompt_ids(self, messages):
        return self.real.prompt_ids(messages)

    def generate(self, prompts, sampling, key):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.prompts += texts
        answers = ["Judged. \\boxed{1}" if "<<<" in text else "I work as a nurse." for text in texts]
        tokens = [np.array(self.tokenizer.encode(a, add_special_tokens=False) + [self.stop_ids[0]]) for a in answers]
        completions = [[Completion(t, np.zeros(len(t), np.float32))] for t in tokens]
        return Generated(completions, sum(map(len, prompts)), sum(map(len, prompts)), sum(map(len, tokens)))


def test_every_role_parses_a_local_models_text_end_to_end(folder, tmp_path, monkeypatch):
    scripted_folder = shutil.copytree(folder, tmp_path / "scripted")
    real = local.shared_model(folder).chat
    scripted = ScriptedChat(real)
    monkeypatch.setattr(local.ChatModel, "from_hf", classmethod(lambda cls, path: scripted))
    config = build.load_config(None, [
        f"output_dir={tmp_path}", "user.kind=llm", "judges.kind=llm", "llm.backend=local",
        f"llm.checkpoint={scripted_folder}", "llm.max_tokens=16"])
    environment = build.build_environment(config, tokenizer=None)
    build.probe_endpoints(environment)
    _, eval_response_judge = build.build_eval_judges(config)
    [persona] = synthetic_personas(1, seed=0)
    state = environment.user_sim.start(persona, seed=0)
    history = [Message("user", OPENING_MESSAGE), Message("assistant", "Hi! What do you do?")]
    turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward?"))
    request = ResponseRequest(persona, tuple(history), turn.response)

    async def every_role():
        return (await environment.user_sim.respond([state], [history]),
                await environment.profile_judge.count_matches([(turn.profile, persona.items)]),
                await environment.response_judge.judge([request]),
                await eval_response_judge.judge([request]))

    assert asyncio.run(every_role()) == (["I work as a nurse."], [1], [1], [1])
    assert len(scripted.prompts) == 4  # no probe request: the folder answered by loading
    assert "INFERRED_PROFILE" in scripted.prompts[1]
    clients = environment.llm_clients()
    assert {c.config.endpoint for c in clients.values()} == {f"local:{scripted_folder.resolve()}"}
    assert all(c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0 for c in clients.values())


def test_roles_on_one_folder_share_one_loaded_model(folder, tmp_path, monkeypatch):
    copy = shutil.copytree(folder, tmp_path / "shared")
    loads = []
    original = local.ChatModel.from_hf.__func__
    monkeypatch.setattr(local.ChatModel, "from_hf",
                        classmethod(lambda cls, path: loads.append(path) or original(cls, path)))
    config = build.load_config(None, ["user.kind=llm", "judges.kind=llm", "llm.backend=local",
                                      f"user.llm.checkpoint={copy}", f"judges.llm.checkpoint={copy}/../shared"])
    environment = build.build_environment(config, tokenizer=None)
    assert loads == [copy.resolve()]  # three roles, one load
    engines = {id(c._local.model.chat.engine) for c in environment.llm_clients().values()}
    assert len(engines) == 1


def test_backend_local_without_a_checkpoint_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError) as error:
        build.load_config(None, ["user.kind=llm", "judges.kind=llm", "llm.backend=local",
                                 "judges.llm.checkpoint=/models/judge"])
    lines = [line.strip() for line in str(error.value).splitlines()]
    assert any(line.startswith("user.llm.checkpoint: user.kind=llm on user.llm.backend=local needs a local Hugging "
                               "Face Qwen2 folder; set user.llm.checkpoint or llm.checkpoint") for line in lines), lines
    assert not any(line.startswith("judges.") for line in lines)  # the judges have one
    with pytest.raises(ConfigError, match="llm.backend"):
        build.load_config(None, ["llm.backend=vllm"])


def test_a_checkpoint_that_is_not_a_qwen2_folder_is_a_clear_error_at_build_time(folder, tmp_path):
    other = shutil.copytree(folder, tmp_path / "llama")
    config_text = (other / "config.json").read_text().replace('"qwen2"', '"llama"').replace("Qwen2ForCausalLM",
                                                                                            "LlamaForCausalLM")
    (other / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match=r"judges.profile.llm.checkpoint=.*unsupported architecture"):
        client_from_section(LLMSection(backend="local", checkpoint=str(other)), "judges.profile.llm")
    with pytest.raises(CheckpointError, match=r"user.llm.checkpoint=.*not a directory"):
        client_from_section(LLMSection(backend="local", checkpoint=str(tmp_path / "missing")), "user.llm")


def test_temperature_and_max_tokens_come_from_yaml_for_both_backends(tmp_path):
    with OpenAIServer(lambda request: "ok") as server:
        config = build.load_config(None, ["user.kind=llm", "judges.kind=llm", f"llm.base_url={server.base_url}",
                                          "llm.temperature=1.0", "judges.llm.max_tokens=64", "user.llm.max_tokens=40",
                                          "judges.response.llm.temperature=0.3"])
        environment = build.build_environment(config, tokenizer=None)
        clients = environment.llm_clients()
        settings = {role: (c.config.temperature, c.config.max_tokens) for role, c in clients.items()}
        assert settings == {"user": (1.0, 40), "profile_judge": (1.0, 64), "response_judge": (0.3, 64)}
        run_sync(clients["response_judge"].complete([{"role": "user", "content": "hi"}]))
        [request] = server.requests
    assert (request["temperature"], request["max_tokens"]) == (0.3, 64)
    assert environment.user_sim.max_tokens is None  # the user's 160 gives way to user.llm.max_tokens
    defaults = build.build_environment(build.load_config(None, ["user.kind=llm", "llm.base_url=http://127.0.0.1:9/v1"]),
                                       tokenizer=None)
    assert defaults.user_sim.max_tokens == 160 and defaults.user_sim.client.config.temperature == 0.0


def reference_run(folder, tmp_path, *overrides):
    return build.load_config(None, [
        f"output_dir={tmp_path}", f"model.path={folder}", "user.kind=llm", "judges.kind=llm", "llm.backend=local",
        f"llm.checkpoint={folder}", "llm.max_tokens=8", "sft.enabled=false", "mesh.devices=1", "data.num_personas=8",
        "rollout.conversations=1", "rollout.pipeline_groups=1", "rollout.samples_per_prompt=2", "rollout.max_rounds=1",
        "rollout.max_new_tokens=8", "rollout.eval_conversations=1", "ppo.iterations=1", "ppo.train_batch_size=2",
        "ppo.micro_batch_size=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.export_hf=false", *overrides])


def test_the_reference_shares_the_local_roles_weights_of_the_policys_checkpoint(folder, tmp_path):
    """The policy starts from the folder the roles run on: the frozen reference is the roles' loaded
    weights (no third copy of the model), and training, which donates the actor, leaves them intact."""
    trainer = build.build_trainer(reference_run(folder, tmp_path))
    roles = local.loaded_model(folder).chat.engine.params
    assert trainer.parts.reference_weights is roles
    trainer.train()
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(roles))
    greedy(local.loaded_model(folder), CHATS[:1], 4)  # the roles still answer
    state = build.build_trainer(reference_run(folder, tmp_path), "resume").restore()
    assert all(a is b for a, b in zip(jax.tree.leaves(state.reference), jax.tree.leaves(roles)))


@pytest.mark.parametrize("override", ["sft.enabled=true", "mesh.devices=2"])
def test_the_reference_keeps_its_own_copy_when_it_is_not_the_roles_weights(folder, tmp_path, override):
    """With a warm start the reference is another policy; on a 2-device mesh it is placed otherwise."""
    config = reference_run(folder, tmp_path, override, "ppo.micro_batch_size=2")
    assert build.build_training_parts(config).reference_weights is None
