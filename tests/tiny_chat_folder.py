"""A Hugging Face Qwen2 folder as a user has one (weights, config.json and a tokenizer with the Qwen
chat template), tiny enough for tests: the local LLM backend and launch/serve.py load it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from hf_reference import make_hf_model, save_hf_model
from tiny_corpus import synthetic_corpus

from rlpa_jax.model.tokenizer import train_tiny_tokenizer


def write_tiny_chat_folder(tokenizer_dir: Path, model_dir: Path):
    """(the folder, the transformers model it holds); sharp logits give greedy choices clear margins,
    so batching and padding never flip one."""
    train_tiny_tokenizer(tokenizer_dir, synthetic_corpus(), vocab_size=512)
    model = make_hf_model(vocab_size=512, tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    folder = save_hf_model(model, model_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, folder / file.name)
    return folder, model
