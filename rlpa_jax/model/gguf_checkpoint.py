"""A Qwen2 GGUF file -> an ordinary Hugging Face Qwen2 folder, with numpy only (no torch).

The `gguf` package reads the file and dequantises each tensor (Q4_K, Q5_0, Q6_K, Q8_0, ...) to
float32; this module maps GGUF names and metadata to Hugging Face ones and writes
model.safetensors (float32, streamed one tensor at a time), config.json,
generation_config.json and the tokenizer files (vocabulary, merges, added tokens and chat
template from the file's tokenizer.ggml.* metadata).

No Q/K un-permutation: llama.cpp's converter permutes the query and key rows of llama-architecture
models only (for its interleaved RoPE); Qwen2 keeps Hugging Face's half-split RoPE layout, so the
rows are stored as they were (tests/test_real_model.py checks the logits against transformers).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from rlpa_jax.model.hf import CheckpointError, config_to_hf
from rlpa_jax.model.qwen2 import Qwen2Config
from rlpa_jax.model.tokenizer import ENDOFTEXT, IM_END, save_qwen2_tokenizer

ARCHITECTURE = "qwen2"
# llama.cpp's token types (gguf.TokenType): normal BPE pieces, control tokens (special),
# user-defined added tokens (not special), and unused padding rows of the embedding.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# GGUF tensor name -> Hugging Face name ("{i}" = layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_tensor_name(gguf_name: str, source: str = "GGUF") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names fail."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"{source}: tensor {gguf_name!r} has no Hugging Face Qwen2 counterpart")


@dataclass(frozen=True)
class GGUFCheckpoint:
    """An opened Qwen2 GGUF file: its metadata and (memory-mapped, still quantised) tensors."""

    path: Path
    reader: gguf.GGUFReader

    @classmethod
    def open(cls, path: str | Path) -> "GGUFCheckpoint":
        path = Path(path)
        try:
            reader = gguf.GGUFReader(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (OSError, ValueError, KeyError, struct.error) as error:
            raise CheckpointError(f"{path}: not a readable GGUF file ({error})") from None
        checkpoint = cls(path, reader)
        architecture = checkpoint.field("general.architecture")
        if architecture != ARCHITECTURE:
            raise CheckpointError(
                f"{path}: general.architecture is {architecture!r}; rlpa-jax converts {ARCHITECTURE!r} GGUF files only"
            )
        return checkpoint

    def field(self, key: str, default=KeyError):
        """A metadata value (str, number or list); missing keys fail naming the file and key."""
        found = self.reader.fields.get(key)
        if found is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return found.contents()

    # ------------------------------------------------------------------------------ config

    def model_config(self) -> Qwen2Config:
        """Sizes from the qwen2.* metadata; untied when the file has its own output.weight."""
        arch = ARCHITECTURE
        names = {tensor.name for tensor in self.reader.tensors}
        vocab_size = len(self.field("tokenizer.ggml.tokens"))
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=int(self.field(f"{arch}.embedding_length")),
            intermediate_size=int(self.field(f"{arch}.feed_forward_length")),
            num_layers=int(self.field(f"{arch}.block_count")),
            num_heads=int(self.field(f"{arch}.attention.head_count")),
            num_kv_heads=int(self.field(f"{arch}.attention.head_count_kv")),
            rope_theta=_float32_as_written(self.field(f"{arch}.rope.freq_base", 1_000_000.0)),
            rms_norm_eps=_float32_as_written(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=int(self.field(f"{arch}.context_length", 32768)),
        )

    def special_ids(self) -> dict[str, int]:
        bos = self.field("tokenizer.ggml.bos_token_id", None)
        eos = self.field("tokenizer.ggml.eos_token_id", None)
        pad = self.field("tokenizer.ggml.padding_token_id", bos)
        return {name: int(value) for name, value in
                (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)) if value is not None}

    def hf_config(self) -> dict:
        """config.json in the layout of the Qwen2.5 releases (float32 weights)."""
        config = self.model_config()
        ids = self.special_ids()
        return config_to_hf(
            config,
            dtype="float32",
            bos_token_id=ids.get("bos_token_id"),
            eos_token_id=ids.get("eos_token_id"),
            sliding_window=config.max_position_embeddings,
            max_window_layers=config.num_layers,
        )

    def generation_config(self) -> dict:
        """The Qwen2.5-Instruct sampling defaults; a turn ends at <|im_end|> or <|endoftext|>."""
        ids = self.special_ids()
        stops = sorted({ids[k] for k in ("eos_token_id", "pad_token_id") if k in ids})
        return {"bos_token_id": ids.get("bos_token_id"), "pad_token_id": ids.get("pad_token_id"),
                "eos_token_id": stops, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}

    # ------------------------------------------------------------------------------ tensors

    def hf_tensor_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, HF shape) of every tensor, in file order. GGUF lists dimensions innermost
        first, so a (out, in) Hugging Face matrix is stored as [in, out]."""
        return [(hf_tensor_name(t.name, str(self.path)), tuple(int(d) for d in reversed(t.shape)))
                for t in self.reader.tensors]

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array in HF layout), dequantised one tensor at a time."""
        for tensor, (name, shape) in zip(self.reader.tensors, self.hf_tensor_specs()):
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            yield name, np.ascontiguousarray(values, dtype=np.float32).reshape(shape)

    # ------------------------------------------------------------------------------ tokenizer

    def save_tokenizer(self, output_dir: str | Path) -> Path:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        tokens = self.field("tokenizer.ggml.tokens")
        types = self.field("tokenizer.ggml.token_type")
        model = self.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model is {model!r}; expected 'gpt2' (byte-level BPE)")
        vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
        # Control tokens are special (skipped when decoding), user-defined ones (<tool_call>) are not;
        # unused rows only pad the embedding to a round size and are no tokens at all.
        added = [(i, token, kind == _CONTROL) for i, (token, kind) in enumerate(zip(tokens, types))
                 if kind in (_CONTROL, _USER_DEFINED)]
        merges = [tuple(merge.split(" ")) for merge in self.field("tokenizer.ggml.merges")]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.merges entry {' '.join(bad)!r} is not 'left right'")
        present = {token for _, token, _ in added}
        if not {ENDOFTEXT, IM_END} <= present:
            raise CheckpointError(f"{self.path}: the vocabulary lacks {ENDOFTEXT} or {IM_END}: not a Qwen2 chat model")
        template = self.field("tokenizer.chat_template")
        return save_qwen2_tokenizer(output_dir, vocab, merges, added, template)


def _float32_as_written(value: float) -> float:
    """GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal
    that rounds to the same float32 is the value the model was released with."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------------
# Writing the folder


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]],
                      tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """A float32 .safetensors file written tensor by tensor (the header is known from the shapes
    up front), so the host never holds more than one dequantised tensor."""
    header, offset = {}, 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for (name, shape), (got_name, values) in zip(specs, tensors, strict=True):
            if got_name != name or values.shape != shape or values.dtype != np.float32:
                raise RuntimeError(f"{path}: tensor {got_name} {values.shape} arrived where {name} {shape} belongs")
            out.write(values.astype("<f4", copy=False).tobytes())


def convert_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Write the Hugging Face folder of a Qwen2 GGUF file: model.safetensors (float32),
    config.json, generation_config.json and the tokenizer files."""
    checkpoint = GGUFCheckpoint.open(gguf_path)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(checkpoint.hf_config(), indent=2) + "\n")
    (output / "generation_config.json").write_text(json.dumps(checkpoint.generation_config(), indent=2) + "\n")
    checkpoint.save_tokenizer(output)
    write_safetensors(output / "model.safetensors", checkpoint.hf_tensor_specs(), checkpoint.hf_tensors())
    return output
