"""The generation engine: row placement over devices and processes, the engine alone on a Hugging
Face folder against transformers' `generate`, and its prefix cache over a mesh."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import torch
from hf_reference import make_hf_model, save_hf_model
from tiny_corpus import synthetic_corpus

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.generation import placement
from rlpa_jax.generation.engine import ChatModel, GenerationEngine
from rlpa_jax.generation.placement import RowPlacement
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.model.tokenizer import chat_token_ids, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.runtime import parallel

# ------------------------------------------------------------------------------------ placement


def process_rows(process: int, processes: int = 2):
    """A batch split evenly over processes in order, as a mesh of equal hosts splits its rows."""
    return lambda rows: list(range(process * rows // processes, (process + 1) * rows // processes))


def placement_of(rows_here, row_multiple: int = 8, collective: bool = False, monkeypatch=None) -> RowPlacement:
    rows = RowPlacement(None)
    rows.rows_here, rows.row_multiple = rows_here, row_multiple
    if collective:
        monkeypatch.setattr(RowPlacement, "collective", property(lambda self: True))
    return rows


@pytest.mark.parametrize("max_batch_size, count, expected", [
    (None, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (None, 6, [[0, 1, 2, 3], [4, 5]]),  # rows 6, 7 of the 8-row call are padding
    (None, 3, [[0, 1, 2], []]),  # one 8-row call: process 1's rows are all padding
    (None, 10, [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]),  # a 16-row call
    (6, 8, [[0, 1, 2, 3, 6, 7], [4, 5]]),  # calls of users 0-5 and 6-7, 8 rows each
    (2, 5, [[0, 1, 2, 3, 4], []]),
])
def test_each_request_is_served_where_its_row_lives(max_batch_size, count, expected):
    got = [placement_of(process_rows(p)).share(count, max_batch_size) for p in range(2)]
    assert got == expected
    assert sorted(got[0] + got[1]) == list(range(count))


def test_one_process_fills_rows_as_its_calls_are_cut():
    alone = placement_of(lambda rows: list(range(rows)))
    assert alone.calls(3) == (8, [[0, 1, 2]]) and alone.calls(9) == (16, [list(range(9))])
    assert alone.calls(0) == (0, [])  # no call when no process has a prompt
    assert alone.calls(10, max_batch_size=4) == (8, [[0, 1, 2, 3]] * 2 + [[0, 1]])


def test_a_process_with_fewer_prompts_still_makes_every_call(monkeypatch):
    # Process 1 of 2 with max_batch_size 6 holds rows 4, 5 of each call; process 0 needs 2 calls.
    monkeypatch.setattr(placement.multihost, "agree_on_max", lambda mine: max(mine, 2))
    share = placement_of(process_rows(1), collective=True, monkeypatch=monkeypatch)
    assert share.calls(2, 6) == (8, [[4, 5], []])
    assert share.calls(0, 6) == (8, [[], []])
    # Without max_batch_size the call is as large as the busiest process needs (4 rows each here).
    monkeypatch.setattr(placement.multihost, "agree_on_max", lambda mine: max(mine, 4))
    assert share.calls(1) == (8, [[4]])
    assert share.any_left(0)  # another process still has 4
    with pytest.raises(ValueError, match="holds no row"):
        share.calls(1, 2)


# ------------------------------------------------------------------------------------ the engine alone


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face Qwen2 folder as a user has one: weights, config and a tokenizer with its chat
    template (the tiny one trained here), written by transformers itself."""
    tokenizer_dir = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_corpus(), vocab_size=512)
    model = make_hf_model(vocab_size=512, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharp logits: greedy choices with clear margins
    folder = save_hf_model(model, tmp_path_factory.mktemp("hf"))
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, folder / file.name)
    return folder, model


CHATS = [
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello, I hike a lot."}],
    [{"role": "user", "content": "Hi"}],
]


def test_the_engine_alone_chats_as_transformers_generates(hf_folder):
    folder, model = hf_folder
    chat = ChatModel.from_hf(folder)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.0)
    replies = chat.chat(CHATS, sampling)
    stops = stop_token_ids(chat.tokenizer)
    for messages, reply in zip(CHATS, replies):
        ids = chat_token_ids(chat.tokenizer, messages, add_generation_prompt=True)
        assert chat.prompt_ids(messages) == ids
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                      eos_token_id=stops, pad_token_id=chat.tokenizer.pad_token_id)[0, len(ids):]
        assert reply == chat.tokenizer.decode(expected.tolist(), skip_special_tokens=True)
    # The engine's own output: tokens and their log-probs, the stop token kept.
    out = chat.engine.generate([chat.prompt_ids(m) for m in CHATS], sampling, jax.random.key(0))
    assert [len(samples) for samples in out.completions] == [1, 1]
    assert out.generated_tokens == sum(len(s[0].tokens) for s in out.completions)
    assert all(s[0].logprobs.shape == s[0].tokens.shape and (s[0].logprobs <= 0).all() for s in out.completions)


def test_the_engine_refuses_what_it_cannot_sample():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    engine = GenerationEngine(config, (1,), 0)
    with pytest.raises(RuntimeError, match=r"sync\(params\)"):
        engine.generate([[3, 4]], SamplingParams(max_new_tokens=2), jax.random.key(0))
    engine.sync(init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="a prompt is empty"):
        engine.generate([[3, 4], []], SamplingParams(max_new_tokens=2), jax.random.key(0))
    assert engine.generate([], SamplingParams(max_new_tokens=2), jax.random.key(0)).completions == []
    # The jitted programs check their arguments' ranks and shapes at the boundary (at trace time).
    with pytest.raises(AssertionError, match="rank"):
        engine.sampler(engine.params, np.array([3, 4], np.int32), np.array([True, True]), jax.random.key(0),
                       SamplingParams(max_new_tokens=2))
    with pytest.raises(AssertionError, match="shape"):
        engine.sampler(engine.params, np.array([[3, 4]], np.int32), np.array([[True, True, True]]), jax.random.key(0),
                       SamplingParams(max_new_tokens=2))


# ------------------------------------------------------------------------------------ prefix cache on a mesh


def test_a_cache_chain_over_a_mesh_samples_what_full_prefills_sample():
    """Two turns of 6 prompts over 4 devices: continuing each prompt from the kept cache on its
    own device gives the full prefill's tokens and log-probs, and prefills less."""
    config = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    params["lm_head"] = params["lm_head"] * 30
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    rng = np.random.default_rng(0)
    first = [list(rng.integers(2, 200, n)) for n in (30, 12, 25, 40, 18, 22)]
    second = [prompt + list(rng.integers(2, 200, 9)) for prompt in first]
    second[1] = list(rng.integers(2, 200, 20))  # nothing in common: a full prefill of its own
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2)
    outputs = {}
    for prefix_cache in (False, True):
        engine = GenerationEngine(config, (1,), 0, mesh=mesh, prompt_buckets=(16, 32, 64), prefix_cache=prefix_cache)
        engine.sync(params)
        engine.generate(first, sampling, jax.random.key(1), cache_key="chain")
        outputs[prefix_cache] = engine.generate(second, sampling, jax.random.key(2), cache_key="chain")
    full, continued = outputs[False], outputs[True]
    for a, b in zip(full.completions, continued.completions):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert full.prefilled_tokens == full.prompt_tokens == sum(map(len, second))
    # Every continued prompt reuses its own first turn's cache (the fresh one nothing), up to the 32
    # slots left before the suffix block (the fresh prompt's 20 tokens, rounded up to 32, of 64).
    assert continued.prefilled_tokens == full.prompt_tokens - sum(min(len(p), 32) for i, p in enumerate(first) if i != 1)
