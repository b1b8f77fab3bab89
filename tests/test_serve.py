"""launch/serve.py as a user runs it: a subprocess on 127.0.0.1 serving a tiny Hugging Face folder.
32 concurrent openai-package clients each get the engine's own greedy answer (with real token
usage) from shared generation calls (mean batch > 1); malformed requests get 4xx JSON errors in
the OpenAI format and the server keeps serving; an LLM role pointed at it (backend openai) says
what the same role on backend local says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import openai
import pytest
from tiny_chat_folder import write_tiny_chat_folder

from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.local import shared_model
from rlpa_jax.dialogue.llm.settings import LLMConfig
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.generation.sampler import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12
CLIENTS = 32
STARTUP_S = 180


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = write_tiny_chat_folder(tmp_path_factory.mktemp("tok"), tmp_path_factory.mktemp("hf"))
    return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """(base URL, served model name, log file) of launch/serve.py on a free port."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve.py"), "--checkpoint", str(folder),
                                    "--port", "0", "--max-tokens", str(MAX_TOKENS), "--batch-window-ms", "20"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", log_path.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"launch/serve.py did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield found.group(1), folder.name, log_path
    finally:
        process.terminate()  # SIGTERM stops it cleanly, as Ctrl-C does
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "stopped after" in log_path.read_text(), log_path.read_text()[-2000:]


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are kind."}, {"role": "user", "content": f"Hello number {i}, I hike."}]


def greedy_alone(folder: Path, messages: list[dict]) -> tuple[str, int, int]:
    """The engine's greedy answer to one conversation on its own: (text, prompt tokens, completion tokens)."""
    chat = shared_model(folder).chat
    ids = chat.prompt_ids(messages)
    [[completion]] = chat.engine.generate([ids], SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0),
                                          jax.random.key(0)).completions
    return chat.tokenizer.decode(completion.tokens, skip_special_tokens=True), len(ids), len(completion.tokens)


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_32_concurrent_clients_get_the_engines_greedy_answers_from_shared_calls(server, folder):
    base_url, model, log_path = server
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    async def ask_all():
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=model, messages=conversation(i), temperature=0, max_tokens=MAX_TOKENS) for i in range(CLIENTS)))
        finally:
            await client.close()

    before = get(f"{base_url}/stats")
    responses = asyncio.run(ask_all())
    for i, response in enumerate(responses):
        text, prompt_tokens, completion_tokens = greedy_alone(folder, conversation(i))
        assert response.choices[0].message.content == text, i
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
        assert response.usage.total_tokens == prompt_tokens + completion_tokens
        assert response.model == model and response.choices[0].finish_reason in ("stop", "length")
    after = get(f"{base_url}/stats")
    calls, requests = after["calls"] - before["calls"], after["requests"] - before["requests"]
    assert requests == CLIENTS and requests / calls > 1, after
    assert after["mean_batch_size"] > 1
    assert re.search(r"generation call \d+: batch of \d+ request", log_path.read_text())  # each call's batch, logged
    assert [m["id"] for m in get(f"{base_url}/models")["data"]] == [model]


def test_malformed_requests_get_openai_style_errors_and_the_server_keeps_serving(server, folder):
    base_url, model, _ = server
    url = f"{base_url}/chat/completions"
    cases = [
        ({"model": model, "messages": []}, 400, "messages"),
        ({"model": model}, 400, "messages"),
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
        ({"model": model, "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
        ({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "messages"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ]
    for body, status, param in cases:
        got, payload = post(url, body)
        assert got == status, (body, payload)
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
        assert payload["error"]["param"] == param, (body, payload)
    # Still serving, with stop strings cut from the text and n samples.
    text, _, _ = greedy_alone(folder, conversation(0))
    status, payload = post(url, {"model": model, "messages": conversation(0), "temperature": 0,
                                 "max_tokens": MAX_TOKENS, "n": 2})
    assert status == 200 and [c["message"]["content"] for c in payload["choices"]] == [text, text]
    assert len(text.strip()) >= 3, text
    stop = text.strip()[1:3]
    status, payload = post(url, {"model": model, "messages": conversation(0), "temperature": 0,
                                 "max_tokens": MAX_TOKENS, "stop": [stop]})
    assert status == 200 and payload["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert payload["choices"][0]["finish_reason"] == "stop"


def test_a_role_on_the_server_says_what_the_same_role_on_backend_local_says(server, folder):
    base_url, model, _ = server
    chats = [conversation(i) for i in range(5)] + [[{"role": "user", "content": "What do you cook?"}]]
    over_http = LLMClient(LLMConfig(base_url=base_url, model=model, max_tokens=MAX_TOKENS, api_key_env="UNSET_KEY"))
    in_process = LLMClient(LLMConfig(base_url="", model=model, backend="local", checkpoint=str(folder),
                                     max_tokens=MAX_TOKENS))
    served = run_sync(over_http.complete_many(chats))
    assert served == run_sync(in_process.complete_many(chats))
    assert over_http.usage.completion_tokens == in_process.usage.completion_tokens > 0
    assert over_http.usage.prompt_tokens == in_process.usage.prompt_tokens
