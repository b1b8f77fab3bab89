"""Tiny random transformers Qwen2 models: the PyTorch reference our Flax model is checked against."""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file


def make_hf_model(seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).eval()
    # Non-zero biases and norm weights, so a wrong mapping of either cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits; left-padded rows get explicit position ids, as our model computes them."""
    tokens_t = torch.tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {}
    if mask is not None:
        mask_t = torch.tensor(np.asarray(mask), dtype=torch.long)
        kwargs = dict(attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(tokens_t, **kwargs).logits.float().numpy()


def write_release_shaped(model, directory, num_shards=3):
    """Like a real Qwen2.5 release: top-level rope_theta, sharded safetensors + index, tied head absent."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n] for n in names[shard::num_shards]}
        save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    c = model.config
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "sliding_window": 32768, "hidden_act": "silu", "rope_scaling": None,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
