"""The real Qwen2.5-Coder-0.5B-Instruct against transformers, in float32.

The model is fetched and converted once into the cache (launch/fetch_model.py, which `make test`
runs first; rlpa_jax/app/fetch.py) and reused by later runs. Every test here skips, naming why,
only when it cannot be fetched (no network); a wrong hash or a broken conversion fails.

References: transformers' `from_pretrained` of the converted folder, and, for the conversion
itself, transformers' own GGUF loader (`gguf_file=`, dequantising the same file independently).
Torch models are loaded one at a time and dropped after use: each holds 2.5 GB.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits

from rlpa_jax.app import fetch
from rlpa_jax.dialogue.chat import Message, prompt_token_ids, render_messages
from rlpa_jax.generation.engine import ChatModel
from rlpa_jax.generation.sampler import SamplingParams, left_pad
from rlpa_jax.model import checkpoint_folder, gguf_checkpoint, hf
from rlpa_jax.model.qwen2 import forward
from rlpa_jax.model.tokenizer import IM_END, chat_token_ids
from rlpa_jax.runtime import hf_export

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a Python function that squares a number."}],
]
MAX_NEW_TOKENS = 24

# float32 on both sides, the same weights, but 24 layers of matmuls whose sums XLA and torch
# reduce in different orders (and XLA fuses differently): each op differs by ~1 float32 ulp and
# the residual stream carries those differences through every layer. Measured on this model: max
# |logit difference| ~1e-4 for logits of size ~10-30 (relative ~1e-5). 1e-3 leaves room for
# another CPU's kernels while a wrong weight, bias, RoPE or norm moves logits by >= 0.1.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="session")
def model_dir():
    try:
        return fetch.fetch_model()
    except fetch.FetchError as error:
        pytest.skip(f"real model not fetched: {error}")


@pytest.fixture(scope="session")
def chat(model_dir) -> ChatModel:
    """Our side: hf.load_params + the tokenizer + the generation engine, from the converted folder."""
    return ChatModel.from_hf(model_dir, prompt_buckets=(64,))


@pytest.fixture(scope="module")
def reference(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="session")
def reference_tokenizer(model_dir):
    """transformers' own conversion of the GGUF's tokenizer (independent of ours)."""
    gguf_file = fetch.gguf_path_for(model_dir)
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def template_ids(tokenizer, messages) -> list[int]:
    """transformers' own rendering: the chat template, tokenized, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def batch(chat: ChatModel):
    ids = [chat.prompt_ids(messages) for messages in CONVERSATIONS]
    tokens, mask = left_pad(ids, max(map(len, ids)), chat.tokenizer.pad_token_id)
    return np.asarray(tokens), np.asarray(mask)


def our_logits(chat: ChatModel, tokens, mask) -> np.ndarray:
    params, config = chat.engine.params, chat.engine.model_config
    return np.asarray(forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))[0])


def test_the_converted_folder_is_the_released_shape(model_dir):
    config = hf.load_config(model_dir)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == \
        (24, 896, 14, 2, 64)
    assert (config.vocab_size, config.intermediate_size, config.rope_theta, config.rms_norm_eps) == \
        (151936, 4864, 1e6, 1e-6)
    assert not config.tie_word_embeddings
    assert json.loads((model_dir / checkpoint_folder.SOURCE_FILE).read_text())["gguf_sha256"] == fetch.QWEN25_CODER_05B.sha256


def test_logits_match_transformers_on_chat_prompts(chat, reference):
    tokens, mask = batch(chat)
    ours, theirs = our_logits(chat, tokens, mask), hf_logits(reference, tokens, mask)
    real = mask.astype(bool)
    difference = np.abs(ours - theirs)[real]
    print(f"max |logit difference| {difference.max():.2e}, logit scale {np.abs(theirs[real]).max():.1f}")
    np.testing.assert_allclose(ours[real], theirs[real], atol=LOGIT_ATOL, rtol=0)
    assert (ours[real].argmax(-1) == theirs[real].argmax(-1)).mean() > 0.99


def test_greedy_replies_match_transformers_generate(chat, reference):
    tokenizer = chat.tokenizer
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id]
    replies = chat.engine.generate([chat.prompt_ids(m) for m in CONVERSATIONS],
                                   SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0),
                                   key=jax.random.key(0)).completions
    for messages, samples in zip(CONVERSATIONS, replies):
        prompt = torch.tensor([chat.prompt_ids(messages)])
        with torch.no_grad():
            out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stops, pad_token_id=stops[1])
        theirs = out[0, prompt.shape[1]:].tolist()
        assert samples[0].tokens.tolist() == theirs, (tokenizer.decode(samples[0].tokens), tokenizer.decode(theirs))
    assert tokenizer.decode(replies[0][0].tokens, skip_special_tokens=True) == "The capital of France is Paris."


def test_conversion_matches_transformers_own_gguf_loader(chat, reference, model_dir):
    """The same GGUF dequantised by transformers: bit for bit the same float32 weights, so the
    same logits (the two configs' rms_norm_eps differ by < 1 float32 ulp of 1e-6: no effect)."""
    gguf_file = fetch.gguf_path_for(model_dir)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                                  dtype=torch.float32).eval()
    tokens = np.asarray([chat.prompt_ids(CONVERSATIONS[0])])
    difference = np.abs(hf_logits(from_gguf, tokens) - hf_logits(reference, tokens)).max()
    print(f"max |logit difference| transformers(GGUF) vs transformers(folder): {difference:.2e}")
    theirs, mine = from_gguf.state_dict(), reference.state_dict()
    assert sorted(theirs) == sorted(mine)
    unequal = [name for name, tensor in theirs.items() if not torch.equal(tensor, mine[name])]
    del from_gguf, theirs
    gc.collect()
    assert unequal == [] and difference == 0


def test_chat_prompt_ids_match_apply_chat_template(chat, reference_tokenizer):
    for messages in CONVERSATIONS:
        expected = template_ids(reference_tokenizer, messages)
        assert chat.prompt_ids(messages) == expected
        assert chat_token_ids(chat.tokenizer, messages, add_generation_prompt=True) == expected
    history = [Message("user", "I just got back from a hike."),
               Message("assistant", "Nice! Where did you go?", profile_text="- Interests: hiking"),
               Message("user", "The Alps, café stops included 🙂")]
    system = "You infer the user's profile while you chat."
    expected = template_ids(reference_tokenizer, render_messages(system, history))
    assert prompt_token_ids(chat.tokenizer, system, history) == expected
    assert chat.tokenizer.decode(expected) == reference_tokenizer.decode(expected)


def test_export_reloads_in_transformers_with_the_same_logits(chat, reference, model_dir, tmp_path):
    out = hf_export.export_hf(chat.engine.params, chat.engine.model_config, tmp_path / "hf", tokenizer_dir=model_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.asarray([chat.prompt_ids(CONVERSATIONS[1])])
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(reference, tokens))
    del reloaded
    gc.collect()


# ---- bad input: every error names the file


def test_a_gguf_of_the_wrong_size_or_hash_is_named(tmp_path):
    model = fetch.QWEN25_CODER_05B
    small = tmp_path / "small.gguf"
    small.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(hf.CheckpointError, match=r"small.gguf: 64 bytes, expected 491,400,064"):
        fetch.check_gguf(small, model)
    wrong = fetch.PackagedGGUF(model.name, model.packages, model.version, size=64, sha256="0" * 64)
    with pytest.raises(hf.CheckpointError, match=r"small.gguf: sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch.check_gguf(small, wrong)


def test_a_gguf_of_another_architecture_is_named(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(hf.CheckpointError, match=r"llama.gguf: general.architecture is 'llama'"):
        gguf_checkpoint.convert_gguf(path, tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(hf.CheckpointError, match=r"junk.gguf: not a readable GGUF file"):
        gguf_checkpoint.convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")


def test_an_occupied_output_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(hf.CheckpointError, match=r"mine: exists and is not a conversion"):
        fetch.fetch_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"



def test_the_fetch_command_names_its_cache_variable():
    """`make test` runs launch/fetch_model.py before the suite: a broken script would only make
    the real-model tests skip, so its start is checked here, without the network."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "launch" / "fetch_model.py"),
                             "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "$RLPA_MODEL_CACHE or ~/.cache/rlpa-jax/models" in " ".join(result.stdout.split())
