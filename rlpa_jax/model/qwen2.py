"""The Qwen2 / Qwen2.5 decoder in Flax, used as pure functions over plain parameter pytrees.

`init_params`, `forward` and `layer_stacks.init_cache` are the whole public surface: parameters are a nested
dict of arrays (no boxed metadata), and `param_logical_axes` gives the matching tree of logical
axis names that parallel.py maps onto a mesh. Layers are stacked on a leading "layers" axis and
run under `nn.scan`, so compile time does not grow with depth.

Numerics follow transformers' `Qwen2ForCausalLM` exactly (checked in tests/test_qwen2.py): RMSNorm
in float32, rotary embeddings with the half-split rotation, grouped-query attention with q/k/v
biases, SwiGLU MLP, tied or untied output head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlpa_jax.model.attention import (
    REQUESTS as ATTENTION_REQUESTS,
)
from rlpa_jax.model.attention import (
    attention_implementation,
    current_platform,
    fused_attention,
    single_query_attention,
)
from rlpa_jax.model.layer_stacks import has_stacked_layers, unstack_layers, unstacked_layer_name

Params = dict[str, Any]
Head = Literal["lm", "value", "none"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture sizes (from a checkpoint's config.json) plus the run-time numerics policy.

    Frozen and hashable so it can be a static argument of jitted functions.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 means hidden_size // num_heads, as in Qwen2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Numerics policy: parameters stay float32 masters; compute may run in bfloat16.
    compute_dtype: str = "float32"
    # Rematerialise each layer in the backward pass ("none", "full", or "dots" to keep matmuls).
    remat: str = "none"
    # False: forwards without a cache (scoring, training) run the layers one after another on
    # per-layer slices of the stacked weights instead of one scan. Faster for a few small layers
    # on CPU: the scan's stacked residuals and their layout copies were ~15 % of a 2-layer update
    # (docs/PERF.md); compile time grows with depth, so real models keep the scan.
    scan_layers: bool = True
    # Full attention's implementation: "auto" (cuDNN's fused kernel on CUDA GPUs where it can run,
    # the CPU kernel on CPU, XLA elsewhere), "xla" or "cudnn" (model/attention.py).
    attention: str = "auto"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(_REMAT_POLICIES)}")
        if self.attention not in ATTENTION_REQUESTS:
            raise ValueError(f"attention={self.attention!r}; expected one of {', '.join(ATTENTION_REQUESTS)}")

    @property
    def dtype(self):
        return _DTYPES[self.compute_dtype]

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    def num_params(self, head: Head = "lm") -> int:
        shapes = jax.eval_shape(lambda: init_params(self, jax.random.key(0), head=head))
        return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Cache: per layer keys and values, stacked on the layer axis: (layers, batch, slots, kv_heads, head_dim).
Cache = dict[str, jax.Array]
CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _dense_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev)


def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    # A no-op unless parallel.activate() has set a mesh and the logical rules.
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply; so do we.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (batch, length, head_dim) for explicit (possibly left-padded) positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (batch, length, heads, head_dim); the half-split rotation Qwen2 was trained with."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def token_matmul(x: jax.Array, kernel: jax.Array, preferred_element_type=None) -> jax.Array:
    """x (..., in) @ kernel (in, out), every leading axis merged into one row axis first
    (`preferred_element_type`: the accumulation and result dtype, e.g. float32 logits).

    Why: with (batch, length) kept apart, the weight gradient contracts two axes, and XLA:CPU
    copied each layer's activations and their gradients into a (features, tokens) layout for it
    (a transposed copy per dense layer and step: ~20 % of a 2-layer update's backward); over one
    merged row axis it is a plain matmul. The merge is free (a bitcast), also when the batch axis
    is sharded (it stays the major part of the merged axis)."""
    rows = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel, preferred_element_type=preferred_element_type)
    return rows.reshape(*x.shape[:-1], kernel.shape[-1])


class Attention(nn.Module):
    config: Qwen2Config
    queries_start_at_zero: bool = False  # query i sits in slot i (no cache, or a prefill into an empty one)

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, layer_index, cache_index):
        cfg = self.config
        dtype = cfg.dtype
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def project(name, heads, head_axis):
            kernel = _param(self, f"{name}_kernel", (e, heads, d), ("embed", head_axis, "head_dim"), _dense_init())
            bias = _param(self, f"{name}_bias", (heads, d), (head_axis, "head_dim"), nn.initializers.zeros)
            out = token_matmul(x, kernel.reshape(e, heads * d).astype(dtype))
            return out.reshape(*x.shape[:2], heads, d) + bias.astype(dtype)

        q = _constrain(project("q", h, "q_heads"), ("activation_batch", "activation_length", "activation_heads", None))
        k = _constrain(project("k", kv, "kv_heads"), ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = _constrain(project("v", kv, "kv_heads"), ("activation_batch", "activation_length", "activation_kv_heads", None))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        single_query = False
        if cache_kv is not None and layer_index is None:
            # This layer's own cache (unstacked layers): updated in place and read where it lies.
            cache_k, cache_v = cache_kv
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_kv = (k, v)
            k, v = k.astype(dtype), v.astype(dtype)
            single_query = q.shape[1] == 1
        elif cache_kv is not None:
            # The whole stacked cache rides in the layer scan's carry, so this layer's new keys and
            # values are written into it in place: one (batch, length) slab per layer and step.
            # (As a scanned input/output instead, the scan rebuilt the full cache every step: a
            # zero-filled output buffer plus copies of all layers' keys and values.)
            cache_k, cache_v = cache_kv
            start = (layer_index, 0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], start)
            new_kv = (cache_k, cache_v)
            k = jax.lax.dynamic_index_in_dim(cache_k, layer_index, keepdims=False).astype(dtype)
            v = jax.lax.dynamic_index_in_dim(cache_v, layer_index, keepdims=False).astype(dtype)
        else:
            new_kv = None

        if single_query:
            out = single_query_attention(q, k, v, mask)
        else:
            platform, capability = current_platform()
            choice = attention_implementation(cfg.attention, platform, jnp.dtype(dtype).name, d, capability)
            out = fused_attention(q, k, v, mask, choice.implementation, self.queries_start_at_zero)
        out = _constrain(out, ("activation_batch", "activation_length", "activation_heads", None))

        o_kernel = _param(self, "o_kernel", (h, d, e), ("q_heads", "head_dim", "embed"), _dense_init())
        # Heads and head_dim merged on both sides first: with the two-axis contraction
        # ("bthd,hde->bte") XLA:CPU transposed the whole o_kernel on every call (a copy of each
        # layer's o_kernel per decode step) rather than the (batch, 1, heads, head_dim) activation.
        batch, length = out.shape[:2]
        return token_matmul(out.reshape(batch, length, h * d), o_kernel.reshape(h * d, e).astype(dtype)), new_kv


class MLP(nn.Module):
    config: Qwen2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        e, m, dtype = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
        gate = _param(self, "gate_kernel", (e, m), ("embed", "mlp"), _dense_init())
        up = _param(self, "up_kernel", (e, m), ("embed", "mlp"), _dense_init())
        down = _param(self, "down_kernel", (m, e), ("mlp", "embed"), _dense_init())
        hidden = jax.nn.silu(token_matmul(x, gate.astype(dtype))) * token_matmul(x, up.astype(dtype))
        hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return token_matmul(hidden, down.astype(dtype))


class DecoderLayer(nn.Module):
    config: Qwen2Config
    queries_start_at_zero: bool = False

    @nn.compact
    def __call__(self, carry, layer_index, cos, sin, mask, cache_index):
        """carry: (hidden states, (keys, values) cache or None). Under the layer scan the cache is
        the whole stacked one and layer_index picks this layer's slab; with unstacked layers it is
        this layer's own and layer_index is None."""
        cfg = self.config
        x, cache_kv = carry
        attn_out, cache_kv = Attention(cfg, self.queries_start_at_zero, name="attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_norm")(x), cos, sin, mask, cache_kv, layer_index, cache_index
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attn_norm")(x))
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return (x, cache_kv), None


class Qwen2(nn.Module):
    """Backbone plus one of three heads: 'lm' (logits), 'value' (PPO critic), 'none' (hidden states)."""

    config: Qwen2Config
    head: Head = "lm"
    last_only: bool = False  # project only the last position (sampler prefill: no prompt-wide logits)
    unstacked: bool = False  # layers as separate parameter trees (`unstack_layers`), not one scan
    queries_start_at_zero: bool = False  # the tokens fill slots 0.. (no cache, or an empty one's prefill)

    @nn.compact
    def __call__(self, tokens, positions, mask, cache: Cache | None = None, cache_index=0):
        cfg = self.config
        embedding = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), _dense_init())
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)

        cache_kv = None if cache is None else (cache["k"], cache["v"])
        if self.unstacked:
            # One call per layer on that layer's own weights and cache (see `unstack_layers`).
            if cache is not None and not isinstance(cache["k"], (list, tuple)):
                raise ValueError("forward with unstacked layers needs a per-layer cache (unstack_cache)")
            layer_caches = [None] * cfg.num_layers if cache is None else list(zip(cache["k"], cache["v"]))
            layer = DecoderLayer if cfg.remat == "none" else nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat])
            for i in range(cfg.num_layers):
                (x, layer_caches[i]), _ = layer(cfg, self.queries_start_at_zero, name=unstacked_layer_name(i))(
                    (x, layer_caches[i]), None, cos, sin, mask, cache_index)
            cache_kv = None if cache is None else tuple(list(kv) for kv in zip(*layer_caches))
        else:
            layer = DecoderLayer
            if cfg.remat != "none":
                layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            stack = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, cache_kv), _ = stack(cfg, self.queries_start_at_zero, name="layers")(
                (x, cache_kv), layer_indices, cos, sin, mask, cache_index)
        new_cache = None if cache_kv is None else {"k": cache_kv[0], "v": cache_kv[1]}
        x = RMSNorm(cfg.rms_norm_eps, name="final_norm")(x)
        if self.last_only:
            x = x[:, -1:]

        if self.head == "none":
            return x, new_cache
        if self.head == "value":
            kernel = _param(self, "value_kernel", (cfg.hidden_size,), ("embed",), nn.initializers.zeros)
            bias = _param(self, "value_bias", (), (), nn.initializers.zeros)
            values = jnp.einsum("bte,e->bt", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
            return values + bias, new_cache
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("bte,ve->btv", x, embedding.astype(x.dtype), preferred_element_type=jnp.float32)
        else:
            kernel = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), _dense_init())
            logits = jnp.einsum("bte,ev->btv", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        return _constrain(logits, ("activation_batch", "activation_length", "activation_vocab")), new_cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: 0 at each row's first real token (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(key_mask: jax.Array, query_length: int, cache_index) -> jax.Array:
    """(batch, queries, keys) boolean mask: causal by slot, and only keys that hold real tokens.

    Query i sits in slot cache_index + i; it may see slot j when j <= cache_index + i.
    """
    query_slots = cache_index + jnp.arange(query_length)
    key_slots = jnp.arange(key_mask.shape[-1])
    causal = key_slots[None, :] <= query_slots[:, None]
    return causal[None] & key_mask[:, None, :].astype(bool)


def forward(
    params: Params,
    config: Qwen2Config,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    cache: Cache | None = None,
    cache_index: jax.Array | int = 0,
    head: Head = "lm",
    last_only: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Run the model on `tokens` (batch, length).

    Without a cache, `mask` (batch, length) marks real tokens (left padding allowed). With a cache,
    the new tokens are written at slots [cache_index, cache_index + length) and `mask` covers all
    cache slots (batch, cache_length), including the new ones. Positions default to the count of
    real tokens before each one, so left padding gives the same result as no padding.
    Returns (logits | values | hidden states, updated cache or None); with last_only=True only
    the last position's output (batch, 1, ...).
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, dtype=bool)
    if positions is None:
        if cache is not None:
            raise ValueError("forward with a cache needs explicit positions for the new tokens")
        positions = positions_from_mask(mask)
    full_mask = attention_mask(mask, tokens.shape[1], cache_index)
    if cache is None and not config.scan_layers and has_stacked_layers(params):
        params = unstack_layers(params, config)  # model.scan_layers=false: the layers one after another
    unstacked = not has_stacked_layers(params)  # `unstack_layers` output
    # A static 0 (not a traced slot): the new tokens fill slots 0.., so cuDNN may skip what is above the diagonal.
    start_at_zero = isinstance(cache_index, int) and cache_index == 0
    return Qwen2(config, head=head, last_only=last_only, unstacked=unstacked,
                 queries_start_at_zero=start_at_zero).apply(
        {"params": params}, tokens, positions, full_mask, cache, cache_index
    )


def init_params(config: Qwen2Config, key: jax.Array, head: Head = "lm") -> Params:
    """Random float32 parameters (normal 0.02, zero biases, unit norms) as a plain pytree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Qwen2(config, head=head).init(key, tokens, tokens, jnp.ones((1, 1, 1), bool))
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: Qwen2Config, head: Head = "lm") -> Params:
    """Tree (same structure as the params) of logical axis-name tuples, e.g. ('layers', 'embed', 'mlp')."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: Qwen2(config, head=head).init(jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool))
    )
    return jax.tree.map(
        lambda box: tuple(box.names),
        abstract["params"],
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def critic_params_from_policy(policy_params: Params, config: Qwen2Config) -> Params:
    """PPO critic parameters: the policy's backbone (copied) with a zero value head, no LM head."""
    backbone = {k: v for k, v in policy_params.items() if k != "lm_head"}
    backbone = jax.tree.map(jnp.array, backbone)  # a copy: actor and critic train separately
    return backbone | {
        "value_kernel": jnp.zeros((config.hidden_size,), jnp.float32),
        "value_bias": jnp.zeros((), jnp.float32),
    }


def flops_per_token(config: Qwen2Config, context_length: int) -> float:
    """Forward FLOPs per token (2 per multiply-add) for matmuls plus attention over the context."""
    e, m, d = config.hidden_size, config.intermediate_size, config.head_dim
    attn_proj = 2 * e * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 2 * 3 * e * m
    attn_scores = 2 * 2 * config.num_heads * d * context_length
    head = 2 * e * config.vocab_size
    return config.num_layers * (attn_proj + mlp + attn_scores) + head
