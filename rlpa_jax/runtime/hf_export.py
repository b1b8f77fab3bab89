"""Our parameter pytrees -> a Hugging Face Qwen2 directory, without torch.

Writes config.json, generation_config.json, safetensors shards with an index, and the tokenizer
files. Each parameter is gathered to the host one at a time, from every process when it spans
several (every process takes part, process 0 alone writes).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

from rlpa_jax.model.hf import NP_DTYPES, TOKENIZER_FILES, config_to_hf, get_path, read_json, tensor_maps
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.runtime import multihost

log = logging.getLogger(__name__)


def hf_tensors(params: Params, config: Qwen2Config, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy tensor) one at a time, gathering each parameter to the host (from
    every process when it spans several: a collective, every process iterates)."""
    np_dtype = NP_DTYPES[dtype]
    for entry in tensor_maps(config, "lm"):
        ours = np.asarray(multihost.gather(get_path(params, entry.path)), dtype=np.float32)
        if entry.per_layer:
            for i in range(config.num_layers):
                yield entry.hf_name.format(i=i), np.ascontiguousarray(entry.to_hf(ours[i], config).astype(np_dtype))
        else:
            yield entry.hf_name, np.ascontiguousarray(entry.to_hf(ours, config).astype(np_dtype))


def export_hf(
    params: Params,
    config: Qwen2Config,
    output_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
    generation_config: dict | None = None,
) -> Path:
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads. With
    several processes every one calls it (the parameters are gathered from all of them) and
    process 0 alone writes."""
    if dtype not in NP_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; expected one of {sorted(NP_DTYPES)}")
    output = Path(output_dir)
    if not multihost.is_main_process():
        for _ in hf_tensors(params, config, dtype):  # take part in every gather, write nothing
            pass
        return output
    output.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, tensor in hf_tensors(params, config, dtype):
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    # Shards are held until written; a future streaming writer could flush each as it fills.
    total_bytes = sum(t.nbytes for shard in shards for t in shard.values())
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(output / file), metadata=metadata)
            weight_map.update({name: file for name in shard})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
    special_ids = _special_token_ids(tokenizer_dir)
    (output / "config.json").write_text(json.dumps(config_to_hf(config, dtype, **special_ids), indent=2))
    generation = generation_config or _generation_config(tokenizer_dir, special_ids)
    (output / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, output / name)
    log.info("exported %d tensors (%.1f MB) to %s", sum(map(len, shards)), total_bytes / 1e6, output)
    return output


def _special_token_ids(tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").exists():
        return {}
    vocab = {t["content"]: t["id"] for t in read_json(tokenizer_dir / "tokenizer.json").get("added_tokens", [])}
    ids = {}
    if "<|endoftext|>" in vocab:
        ids["bos_token_id"] = vocab["<|endoftext|>"]
        ids["pad_token_id"] = vocab["<|endoftext|>"]
    if "<|im_end|>" in vocab:
        ids["eos_token_id"] = vocab["<|im_end|>"]
    return ids


def _generation_config(tokenizer_dir: Path | None, special_ids: dict) -> dict:
    if tokenizer_dir and (tokenizer_dir / "generation_config.json").exists():
        return read_json(tokenizer_dir / "generation_config.json")
    eos = [special_ids[k] for k in ("eos_token_id", "pad_token_id") if k in special_ids]
    generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    if eos:
        generation.update(bos_token_id=special_ids.get("bos_token_id"), eos_token_id=sorted(set(eos)),
                          pad_token_id=special_ids.get("pad_token_id"))
    return generation
