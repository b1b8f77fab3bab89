"""Hugging Face Qwen2 checkpoints <-> our parameter pytrees, without torch.

Import reads a local directory (config.json, single or sharded safetensors, optional index) and
builds each parameter straight into its target sharding, one parameter at a time: the host holds
one stacked tensor at a time and every device receives only its own shard. Sizes always come from
the checkpoint's config.json. The tensor maps here serve export too (runtime/hf_export.py, which
gathers parameters over processes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from rlpa_jax.model.qwen2 import Head, Params, Qwen2Config, init_params, param_logical_axes

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used; the message names the file and key."""


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf_config: dict, source: str = "config.json", **overrides) -> Qwen2Config:
    """Map a transformers Qwen2 config dict to Qwen2Config; `overrides` set numerics options."""
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures) and model_type != "qwen2":
        raise CheckpointError(
            f"{source}: unsupported architecture {architectures or model_type!r}; "
            f"rlpa-jax loads {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')"
        )
    rope = hf_config.get("rope_parameters") or {}
    # Real Qwen2.5 releases keep rope_theta at the top level; transformers 5 nests it.
    rope_theta = hf_config.get("rope_theta", rope.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", "default")
    scaling = hf_config.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise CheckpointError(f"{source}: rope scaling {scaling or rope!r} is not supported; only default RoPE")
    try:
        return Qwen2Config(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            num_kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
            head_dim=hf_config.get("head_dim") or 0,
            rope_theta=float(rope_theta),
            rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
            max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
            **overrides,
        )
    except KeyError as missing:
        raise CheckpointError(f"{source}: missing key {missing}") from None


def config_to_hf(config: Qwen2Config, dtype: str = "float32", **extra) -> dict:
    """A config.json dict in the layout of real Qwen2.5 releases (top-level rope_theta)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "dtype": dtype,  # the key transformers 5 writes and reads
        "torch_dtype": dtype,  # the key older readers (and the Qwen2.5 releases) use
        **extra,
    }


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable JSON ({error})") from None


def load_config(directory: str | Path, **overrides) -> Qwen2Config:
    path = Path(directory).expanduser() / "config.json"
    return config_from_hf(read_json(path), source=str(path), **overrides)


# ---------------------------------------------------------------------------------------------
# Name and layout mapping. Each entry: our path, HF name ("{i}" = layer), HF -> ours, ours -> HF.


@dataclass(frozen=True)
class TensorMap:
    path: tuple[str, ...]
    hf_name: str
    to_ours: Callable[[np.ndarray, Qwen2Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Qwen2Config], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(x, cfg):
    return x


def _transpose(x, cfg):
    return x.T


def _heads_in(heads: Callable[[Qwen2Config], int]):
    """(heads*head_dim, embed) -> (embed, heads, head_dim) and back."""
    return (
        lambda x, cfg: x.T.reshape(cfg.hidden_size, heads(cfg), cfg.head_dim),
        lambda x, cfg: x.reshape(cfg.hidden_size, -1).T,
    )


def _bias_in(heads: Callable[[Qwen2Config], int]):
    return lambda x, cfg: x.reshape(heads(cfg), cfg.head_dim), lambda x, cfg: x.reshape(-1)


def _query_heads(cfg):
    return cfg.num_heads


def _kv_heads(cfg):
    return cfg.num_kv_heads


def tensor_maps(config: Qwen2Config, head: Head = "lm") -> list[TensorMap]:
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embed",), "model.embed_tokens.weight", _same, _same),
        TensorMap(("final_norm", "scale"), "model.norm.weight", _same, _same),
        TensorMap(("layers", "input_norm", "scale"), layer + "input_layernorm.weight", _same, _same),
        TensorMap(("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight", _same, _same),
        TensorMap(("layers", "attn", "o_kernel"), layer + "self_attn.o_proj.weight",
                  lambda x, cfg: x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                  lambda x, cfg: x.reshape(-1, cfg.hidden_size).T),
        TensorMap(("layers", "mlp", "gate_kernel"), layer + "mlp.gate_proj.weight", _transpose, _transpose),
        TensorMap(("layers", "mlp", "up_kernel"), layer + "mlp.up_proj.weight", _transpose, _transpose),
        TensorMap(("layers", "mlp", "down_kernel"), layer + "mlp.down_proj.weight", _transpose, _transpose),
    ]
    for name, heads in (("q", _query_heads), ("k", _kv_heads), ("v", _kv_heads)):
        maps.append(TensorMap(("layers", "attn", f"{name}_kernel"), layer + f"self_attn.{name}_proj.weight", *_heads_in(heads)))
        maps.append(TensorMap(("layers", "attn", f"{name}_bias"), layer + f"self_attn.{name}_proj.bias", *_bias_in(heads)))
    if head == "lm" and not config.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", _transpose, _transpose))
    return maps


# ---------------------------------------------------------------------------------------------
# Reading safetensors


class SafetensorsReader:
    """Finds each tensor's file (through the index when there is one) and reads it as numpy."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: missing 'weight_map' object")
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            paths = sorted(self.directory.glob("*.safetensors"))
            if not paths:
                raise CheckpointError(f"{self.directory}: no *.safetensors files")
            for path in paths:
                for name in self._open(path).keys():
                    self.files[name] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        path = self.files[name]
        try:
            return self._open(path).get_tensor(name)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({error})") from None


def _host_tensor(reader: SafetensorsReader, entry: TensorMap, config: Qwen2Config, shape, dtype) -> np.ndarray:
    """One parameter in our layout on the host, stacked over layers when per-layer."""

    def convert(name: str, expected: tuple[int, ...]) -> np.ndarray:
        raw = reader.read(name)
        try:
            ours = entry.to_ours(raw, config)
        except ValueError:
            ours = None
        if ours is None or tuple(ours.shape) != tuple(expected):
            hf_shape = tuple(entry.to_hf(np.zeros(expected, np.float32), config).shape)
            raise CheckpointError(
                f"{reader.files[name]}: tensor {name!r} has shape {tuple(raw.shape)}, "
                f"expected {hf_shape} from config.json"
            )
        return ours.astype(dtype)

    if not entry.per_layer:
        return convert(entry.hf_name, shape)
    out = np.empty(shape, dtype)
    for i in range(config.num_layers):
        out[i] = convert(entry.hf_name.format(i=i), shape[1:])
    return out


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_params(
    directory: str | Path,
    config: Qwen2Config | None = None,
    shardings: Params | None = None,
    head: Head = "lm",
    dtype: str = "float32",
) -> tuple[Params, Qwen2Config]:
    """Read a Hugging Face Qwen2 directory into (params, config).

    `shardings` (a tree of jax.sharding.Sharding matching the params, from parallel.py) places
    every parameter straight into its sharding; without it parameters land on the default device.
    With head="value" the backbone is loaded and the value head starts at zero (the PPO critic).
    """
    directory = Path(directory).expanduser()  # configs name the fetched model under ~/.cache
    config = config or load_config(directory)
    reader = SafetensorsReader(directory)
    np_dtype = NP_DTYPES[dtype]
    axes = param_logical_axes(config, head=head)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head))

    params: Params = {}
    for entry in tensor_maps(config, head):
        shape = tuple(get_path(abstract, entry.path).shape)
        host = _host_tensor(reader, entry, config, shape, np_dtype)
        sharding = get_path(shardings, entry.path) if shardings is not None else None
        _set_path(params, entry.path, _place(host, sharding))
        del host
    if head == "value":
        for name in ("value_kernel", "value_bias"):
            shape = tuple(abstract[name].shape)
            sharding = shardings[name] if shardings is not None else None
            params[name] = _place(np.zeros(shape, np_dtype), sharding)
    if head == "lm" and not config.tie_word_embeddings and not reader.has("lm_head.weight"):
        raise CheckpointError(f"{directory}: untied config but tensor 'lm_head.weight' is missing")
    _check_structure(params, axes)
    return params, config


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    # Each device copies only its own slice of the host array.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_structure(params: Params, axes: Params) -> None:
    expected = jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    got = jax.tree.structure(params)
    if expected != got:
        raise CheckpointError(f"loaded parameter tree does not match the model: {got} vs {expected}")
