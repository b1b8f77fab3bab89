"""A tiny Qwen2 GGUF file written from a tiny Hugging Face folder (tests/tiny_chat_folder.py), the
way llama.cpp's converter lays one out: qwen2.* sizes, the byte-level BPE tokenizer as
tokenizer.ggml.* (tokens in id order with their types, merges, special ids, chat template) and
float32 tensors under GGUF names (shapes listed innermost first, i.e. HF matrices as they are).
Float32 tensors dequantise to themselves, so the converted folder must hold the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from rlpa_jax.model import hf
from rlpa_jax.model.gguf_checkpoint import _GLOBAL_NAMES, _LAYER_NAMES

NORMAL, CONTROL = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL


def gguf_name(hf_name: str) -> str:
    for ours, theirs in _GLOBAL_NAMES.items():
        if theirs == hf_name:
            return ours
    _, _, layer, rest = hf_name.split(".", 3)
    [ours] = [g for g, h in _LAYER_NAMES.items() if h == rest]
    return f"blk.{layer}.{ours}"


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    config = hf.load_config(folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    added = {token["id"]: token for token in tokenizer["added_tokens"]}
    size = max([*vocab.values(), *added]) + 1
    tokens, types = [""] * size, [NORMAL] * size
    for token, index in vocab.items():
        tokens[index] = token
    for index, token in added.items():
        tokens[index], types[index] = token["content"], CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    ids = {name: next(i for i, t in added.items() if t["content"] == tokenizer_config[name])
           for name in ("eos_token", "pad_token") if tokenizer_config.get(name)}

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(ids["eos_token"])
    if "pad_token" in ids:
        writer.add_pad_token_id(ids["pad_token"])
    writer.add_chat_template(tokenizer_config["chat_template"])
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(tensor, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
