"""A `.gguf` file is accepted wherever a Hugging Face folder is (model/checkpoint_folder.py): it is
converted once into the model cache, keyed by its content, and then reads exactly like the folder
it was made from: the same weights, chat prompt ids and greedy replies. An unusable path is named
and leaves nothing behind."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny_chat_folder import write_tiny_chat_folder
from tiny_gguf import write_tiny_gguf

from rlpa_jax.app import build
from rlpa_jax.config.loading import load_config
from rlpa_jax.dialogue.llm import local
from rlpa_jax.generation.engine import ChatModel
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model import checkpoint_folder
from rlpa_jax.model.hf import CheckpointError

CHATS = [[{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello, I hike a lot."}],
         [{"role": "user", "content": "What do you cook?"}]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint_folder.CACHE_ENV, str(tmp_path / "cache"))
    checkpoint_folder._converted.cache_clear()
    yield tmp_path / "cache"
    checkpoint_folder._converted.cache_clear()


def test_a_gguf_file_reads_like_the_folder_it_came_from(tmp_path, cache):
    folder, _ = write_tiny_chat_folder(tmp_path / "tok", tmp_path / "hf")
    gguf_file = write_tiny_gguf(folder, tmp_path / "tiny-chat.gguf")
    ours, theirs = ChatModel.from_hf(gguf_file), ChatModel.from_hf(folder)
    for a, b in zip(jax.tree.leaves(ours.engine.params), jax.tree.leaves(theirs.engine.params), strict=True):
        np.testing.assert_array_equal(a, b)  # float32 tensors dequantise to themselves
    assert [ours.prompt_ids(c) for c in CHATS] == [theirs.prompt_ids(c) for c in CHATS]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert ours.chat(CHATS, greedy) == theirs.chat(CHATS, greedy)

    converted = checkpoint_folder.hf_folder(gguf_file)
    digest = checkpoint_folder.sha256_of(gguf_file)
    assert converted == cache / "gguf" / f"tiny-chat-{digest[:16]}"
    written = (converted / "model.safetensors").stat().st_mtime_ns
    checkpoint_folder._converted.cache_clear()  # as a new process would: found by its hash, not converted again
    assert build.model_config(load_config(None, [f"model.path={gguf_file}"])) == build.model_config(
        load_config(None, [f"model.path={folder}"]))
    assert (converted / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no partial folder left behind
    assert local.load_model(gguf_file).name == "tiny-chat"  # what launch/serve.py --checkpoint serves it as


def test_an_unusable_gguf_path_is_named_and_leaves_no_folder(tmp_path, cache):
    with pytest.raises(CheckpointError, match=r"missing.gguf: cannot read the GGUF file"):
        build.model_config(load_config(None, [f"model.path={tmp_path / 'missing.gguf'}"]))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"junk.gguf: not a readable GGUF file"):
        ChatModel.from_hf(tmp_path / "junk.gguf")
    named = r"checkpoint='.*junk.gguf' is not a usable .*GGUF file: .*junk.gguf: not a readable"
    with pytest.raises(CheckpointError, match=named):
        local.load_model(tmp_path / "junk.gguf")
    assert list((cache / "gguf").iterdir()) == []
