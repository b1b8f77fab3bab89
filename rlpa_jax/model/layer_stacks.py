"""The decoder's layers in their two forms: stacked on a leading "layers" axis (what training and
the layer scan read) or split into one tree per layer (what the decode loop reads in place); the
same for the KV cache."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

Params = dict[str, Any]  # a parameter pytree (qwen2.Params)
Cache = dict[str, Any]  # keys and values, stacked or per-layer lists (qwen2.Cache)


class Qwen2Config(Protocol):
    """What these functions read of a model config (qwen2.Qwen2Config has it; no import upward)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: Any


def unstacked_layer_name(index: int) -> str:
    return f"layer_{index}"


def has_stacked_layers(params: Params) -> bool:
    """Whether the decoder layers are one stacked tree (as trained) rather than `unstack_layers`' split."""
    return "layers" in params


def unstack_layers(params: Params, config: Qwen2Config) -> Params:
    """The same parameters with the stacked "layers" tree split into one tree per layer, which
    `forward` runs one layer after another instead of as a scan.

    What it is for: a decode step inside a loop. Under the layer scan, XLA copies each layer's
    slice of every stacked weight out of the stack before its matmuls, so a memory-bound decode
    step writes and re-reads all layer weights on top of reading them once (measured on CPU: a
    third of the decode step). Separate arrays are read in place. The split itself is one copy of
    the layer weights: generation.layout.SamplingLayout makes it once per rollout (the sampler reads its
    output as it is); `generate` called with stacked parameters makes it once per call.
    """
    layers = params["layers"]

    def layer(i):
        return jax.tree.map(lambda x: x[i], layers)

    split = {unstacked_layer_name(i): layer(i) for i in range(config.num_layers)}
    return {k: v for k, v in params.items() if k != "layers"} | split


def unstack_cache(cache: Cache) -> Cache:
    """A stacked cache as per-layer lists {"k": [layers x (batch, slots, kv_heads, head_dim)], "v":
    [...]}: what `forward` with unstacked layers reads and updates (each in place)."""
    return {name: [stacked[i] for i in range(stacked.shape[0])] for name, stacked in cache.items()}


def init_layer_caches(config: Qwen2Config, batch: int, length: int, dtype=None) -> Cache:
    """`init_cache` as per-layer lists (what unstacked parameters run on), one array per layer."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return {name: [jnp.zeros(shape, dtype) for _ in range(config.num_layers)] for name in ("k", "v")}


def init_cache(config: Qwen2Config, batch: int, length: int, dtype=None) -> Cache:
    """An empty key/value cache with `length` slots per row."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
