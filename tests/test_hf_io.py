"""Hugging Face checkpoints in and out: transformers-written, Qwen2.5-release-shaped, and our export."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, make_hf_model, save_hf_model, write_release_shaped
from safetensors.numpy import save_file

from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import forward
from rlpa_jax.runtime import hf_export

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 11))


def test_transformers_writes_rope_theta_nested_and_we_read_it(tmp_path):
    model = make_hf_model(rope_theta=12345.0)
    directory = save_hf_model(model, tmp_path / "m")
    written = json.loads((directory / "config.json").read_text())
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 12345.0
    assert hf.load_config(directory).rope_theta == 12345.0


def test_release_shaped_directory_loads_with_the_same_logits(tmp_path):
    model = make_hf_model(rope_theta=1000000.0)
    directory = write_release_shaped(model, tmp_path / "release")
    params, config = hf.load_params(directory)
    assert config.rope_theta == 1e6 and config.tie_word_embeddings and "lm_head" not in params
    ours = np.asarray(forward(params, config, jnp.asarray(TOKENS))[0])
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_export_reloads_in_transformers_with_the_same_logits(tmp_path, tied):
    model = make_hf_model(tie_word_embeddings=tied, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    params, config = hf.load_params(save_hf_model(model, tmp_path / "src"))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    # A small shard limit forces several shards and an index.
    out = hf_export.export_hf(params, config, tmp_path / "out", tokenizer_dir=tokenizer_dir, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)


# The bfloat16 export: tests/test_policy_export.py (its weights, config.json's dtype, its logits).


# ---- bad input: every error names what is wrong


@pytest.fixture
def saved(tmp_path):
    return save_hf_model(make_hf_model(tie_word_embeddings=False), tmp_path / "m")


def test_unsupported_architecture_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=r"config.json: unsupported architecture.*LlamaForCausalLM"):
        hf.load_params(saved)


def test_missing_tensor_is_named(saved):
    from safetensors.numpy import load_file
    tensors = load_file(str(saved / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        hf.load_params(saved)


def test_misshaped_tensor_is_named(saved):
    from safetensors.numpy import load_file
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 64), np.float32)
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(7, 64\), expected \(32, 64\)"):
        hf.load_params(saved)


def test_unreadable_files_are_named(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        hf.load_params(saved)
    (saved / "config.json").write_text("{broken")
    with pytest.raises(hf.CheckpointError, match=r"config.json: unreadable JSON"):
        hf.load_params(saved)


def test_missing_directory_and_rope_scaling(tmp_path, saved):
    with pytest.raises(hf.CheckpointError, match="config.json: file not found"):
        hf.load_params(tmp_path / "nowhere")
    config = json.loads((saved / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match="rope scaling"):
        hf.load_config(saved)
