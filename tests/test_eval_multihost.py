"""launch/eval.py as 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1) against the same
evaluation as 1 process x 8 (our model sampled at temperature 1, and an openai:<model> policy; an
LLM user and an LLM judge on a 127.0.0.1 server): every user played by one process, its user and
judge called by that process alone, no jax.device_get of an array another process holds part of
(tests/eval_launch_worker.py), and the result JSON the one-process run's (1e-5). The processes
are started and watched with tests/test_multihost.py's helpers."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import jax
import pytest
from multihost_launch import finish, start_processes, tail
from openai_server import OpenAIServer, Reply
from tiny_corpus import synthetic_corpus

from rlpa_jax.app.build import build_personas
from rlpa_jax.config.loading import load_config
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import train_tiny_tokenizer
from rlpa_jax.runtime import hf_export
from rlpa_jax.runtime.checkpoint import Checkpointer, model_config_to_meta

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "eval_launch_worker.py"
TINY = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
# One 8-row sampler call over the 8-device mesh: users 0-3 on process 0, user 4 on process 1, whose
# LLM user fails after turn 1, so process 1 plays no one in turn 2 yet joins its sampler call.
USERS, TURNS, FAILING_USER = 5, 2, 4
# Per run, a hang guard only: the six processes of the test run at once and took 208 s in all beside
# other work (load average ~10 on 2 cores).
DEADLINE_S = 600
ROLE_PLAY = "role-playing one specific person"
API_POLICY = "policy-model"


def answerer(failing_profile: str | None = None):
    """The server's answers. The LLM user (a role-play system prompt) says who it is, one sentence
    of its persona, or fails (HTTP 400, not retried) when it plays `failing_profile`; the
    evaluation's judge gives a verdict fixed by the request (each reply judged as in the
    one-process run gets that run's verdict); the policy under evaluation (openai:<model>) a
    reply fixed by the request; the start-up probe its OK."""
    def answer(request: dict) -> Reply:
        messages = request["messages"]
        if messages[-1]["content"] == "Reply with OK.":
            return Reply(content="OK")
        if request["model"] == API_POLICY:
            return Reply(content=f"Noted, reply {zlib.crc32(json.dumps(messages).encode()) % 1000}. And you?")
        if ROLE_PLAY in messages[0]["content"]:
            if failing_profile is not None and failing_profile in messages[0]["content"]:
                return Reply(status=400, error_message="this user cannot go on")
            return Reply(content=messages[0]["content"].split("Who you are:\n", 1)[1].split(".")[0] + ".")
        return Reply(content=f"Judged. \\boxed{{{zlib.crc32(json.dumps(messages).encode()) % 2}}}")
    return answer


def assert_same(got, want, where="result"):
    """Equal JSON trees, numbers within 1e-5 (NaN equal to NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-5), where
    else:
        assert got == want, where


def start_alone_and_as_pair(directory: Path, arguments: list[str], policies: tuple[str, str]) -> dict[str, list]:
    """launch/eval.py with `arguments` as 1 process x 8 devices and as 2 x 4 (--policy: the
    first of `policies` alone, the second as a pair), all at once."""
    runs = {}
    for (name, processes), policy in zip((("alone", 1), ("pair", 2)), policies):
        (directory / name).mkdir(parents=True)
        command = [str(WORKER), "--policy", policy, *arguments, "--output", str(directory / name / "out"),
                   "--no-progress"]
        runs[name] = start_processes(lambda _: command, directory / name, processes)
    return runs


def finish_alone_and_pair(directory: Path, runs: dict[str, list]) -> dict[str, list]:
    """Each run's Finished records, every process checked to have succeeded."""
    finished = {name: finish(children, directory / name, DEADLINE_S) for name, children in runs.items()}
    for name, results in finished.items():
        for index, result in enumerate(results):
            assert result.returncode == 0, f"{name} process {index}:\n{tail(directory / name, index)}"
    return finished


def results_of(directory: Path, stem: str) -> tuple[dict, dict, dict]:
    """(the one-process result, the two-process result, the two processes' LLM usage)."""
    alone, pair = (json.loads((directory / name / "out" / f"{stem}.json").read_text()) for name in ("alone", "pair"))
    return alone, pair, json.loads((directory / "pair" / "out" / f"{stem}_llm.json").read_text())


def test_eval_over_two_processes_equals_one_process(tmp_path):
    """Our model over 5 users (from an hf: directory in one process; the same parameters from an
    orbax checkpoint in two, each process restoring its own shards), and alongside (sharing the
    wait for the processes to start) an openai:<model> policy over 3 users in the conflict setting."""
    model, api = tmp_path / "model", tmp_path / "api"
    tokenizer = train_tiny_tokenizer(tmp_path / "tokenizer", synthetic_corpus(), vocab_size=512)
    # Weights 16x the init scale: a random model whose samples follow its prompt (at the init
    # scale its logits are nearly flat and each row's random draws alone set its tokens), so a
    # conversation answered with another's prompt or row shows in the transcripts.
    params = jax.tree.map(lambda x: x * 16 if x.ndim >= 2 else x, init_params(TINY, jax.random.key(0)))
    hf_export.export_hf(params, TINY, tmp_path / "hf", tokenizer_dir=tokenizer)
    checkpointer = Checkpointer(tmp_path / "sft")
    checkpointer.save(3, {"actor": params}, {"model_config": model_config_to_meta(TINY),
                                             "tokenizer_dir": str(tokenizer), "system_prompt": "policy_system_tiny"})
    checkpointer.close()
    api_users, api_turns = 3, 6
    failing = build_personas(load_config(REPO / "configs" / "tiny.yaml"), "eval")[FAILING_USER].profile_text
    with OpenAIServer(answerer(failing)) as server, OpenAIServer(answerer()) as api_server:
        model_runs = start_alone_and_as_pair(model, [
            "--setting", "vanilla", "--turns", str(TURNS), "--users", str(USERS),
            "--name", "tiny", "--system-prompt", "policy_system_tiny", "--temperature", "1.0",
            "rollout.max_new_tokens=12", "rollout.prompt_buckets=[256]", "rollout.max_prompt_tokens=256",
            "user.kind=llm", "judges.kind=llm", f"llm.base_url={server.base_url}"],
            (f"hf:{tmp_path / 'hf'}", str(tmp_path / "sft")))
        api_runs = start_alone_and_as_pair(api, [
            "--base-url", api_server.base_url, "--format", "plain",
            "--setting", "conflict", "--turns", str(api_turns), "--users", str(api_users), "--name", "api",
            "data.num_personas=8", "user.kind=llm", "judges.kind=llm", f"llm.base_url={api_server.base_url}"],
            (f"openai:{API_POLICY}",) * 2)
        finished = finish_alone_and_pair(model, model_runs)
        api_finished = finish_alone_and_pair(api, api_runs)
        user_requests = [r for r in server.requests if ROLE_PLAY in r["messages"][0]["content"]]
        policy_requests = [r for r in api_server.requests if r["model"] == API_POLICY]

    alone, pair, usage = results_of(model, "tiny_vanilla")
    assert len(pair["transcripts"]) == USERS and [t["user_index"] for t in pair["transcripts"]] == list(range(USERS))
    # Sampled (each row its own random draws) and judged both ways: a user given another's row,
    # turn or verdict would show.
    replies = [[m["text"] for m in t["messages"] if m["role"] == "assistant"] for t in alone["transcripts"]]
    assert len({json.dumps(r) for r in replies}) == USERS
    assert {0, 1} <= {j for row in alone["judgments"] for j in row}
    assert alone["transcripts"][FAILING_USER]["stop_reason"] == "simulated user failed after turn 1"
    assert alone["judgments"][FAILING_USER][1] is None and alone["al"]["unscored"] == [0, 1]
    assert_same(pair, alone)
    # Process 0 alone printed the table and wrote the files; process 1 only played its users.
    first, second = finished["pair"]
    assert "AL(1)" in first.stdout and "AL(1)" not in second.stdout
    assert sorted(p.name for p in (model / "pair" / "out").iterdir()) == sorted(
        p.name for p in (model / "alone" / "out").iterdir())
    # Each process called the LLM user (once per turn but the last) and the judge (every turn it
    # talked) for its own users only, and the two runs asked the user the same questions.
    assert [p["llm/user/calls"] for p in usage["per_process"]] == [4 * (TURNS - 1), 1 * (TURNS - 1)]
    assert [p["llm/user/failures"] for p in usage["per_process"]] == [0, 1]
    assert [p["llm/eval_judge/calls"] for p in usage["per_process"]] == [4 * TURNS, 1]
    assert usage["llm/user/calls"] == USERS * (TURNS - 1)
    assert len(user_requests) == 2 * USERS * (TURNS - 1)
    asked = sorted(json.dumps(r["messages"]) for r in user_requests)
    assert asked[0::2] == asked[1::2]  # every question twice: once per run

    # openai:<model>: no device work; each process plays a contiguous block of users (2 and 1),
    # each switching to a partner drawn from the whole pool.
    alone, pair, usage = results_of(api, "api_conflict")
    assert len(policy_requests) == 2 * api_users * api_turns  # each run asked once per user and turn
    assert len({json.dumps(t["messages"]) for t in alone["transcripts"]}) == api_users
    assert_same(pair, alone)
    assert "AL(1)" in api_finished["pair"][0].stdout and "AL(1)" not in api_finished["pair"][1].stdout
    assert [p["llm/eval_judge/calls"] for p in usage["per_process"]] == [2 * api_turns, 1 * api_turns]
    assert [p["llm/user/calls"] for p in usage["per_process"]] == [2 * (api_turns - 1), 1 * (api_turns - 1)]
