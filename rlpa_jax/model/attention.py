"""Attention kernels written for the layouts the Qwen2 decoder hands them (model/qwen2.py):
one new token over a per-layer KV cache (decode), and full attention on CPU (prefill, scoring,
training). Elsewhere the decoder calls `jax.nn.dot_product_attention`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def single_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of one new token per row (a decode step) over the cache, read in its own layout.

    q: (batch, 1, heads, head_dim); k, v: (batch, slots, kv_heads, head_dim); mask: (batch, 1,
    slots). Written as multiply-and-reduce rather than `jax.nn.dot_product_attention`: as dots,
    XLA:CPU transposed both cache slabs of every layer on every decode step to the dots' operand
    layout (a copy of the whole cache per step); the reductions read the cache where it lies.
    Same numbers as the fused call in float32 (query heads grouped kv-major, scaled by
    1/sqrt(head_dim), softmax in float32), up to summation order.
    """
    batch, _, heads, head_dim = q.shape
    kv_heads, dtype = k.shape[2], q.dtype
    grouped = q.reshape(batch, 1, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
    scores = jnp.sum(grouped * k[:, :, :, None, :].astype(jnp.float32), axis=-1) / math.sqrt(head_dim)  # (b, s, kv, g)
    scores = jnp.where(mask[:, 0, :, None, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # (b, kv, g, d)
    return out.reshape(batch, 1, heads, head_dim).astype(dtype)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Full attention (prefill, scoring, training) laid out for XLA:CPU.

    q: (batch, queries, heads, head_dim); k, v: (batch, keys, kv_heads, head_dim); mask: (batch,
    queries, keys). Each key/value head's query group is one (group x queries, head_dim) matrix,
    so both products are plain batched matmuls and the softmax runs over the contiguous last
    axis. `jax.nn.dot_product_attention` keeps the (batch, heads, queries, keys) score layout and
    XLA:CPU split its masked softmax into passes that each transposed the whole score array:
    this form runs a 2-layer model's whole scoring forward in ~30 % less CPU time
    (docs/PERF.md). Same numbers as the fused call: scores and softmax in float32, scaled by
    1/sqrt(head_dim), masked scores at -0.7 x the float32 maximum (fully masked padding rows
    come out finite).
    """
    batch, queries, heads, head_dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grouped = q.reshape(batch, queries, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    grouped = grouped.reshape(batch, kv_heads, group * queries, head_dim)
    keys_major, values_major = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", grouped, keys_major, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, group, queries, keys) * (1.0 / math.sqrt(head_dim))
    scores = jnp.where(mask[:, None, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch, kv_heads, group * queries, keys)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values_major)
    out = out.reshape(batch, kv_heads, group, queries, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, queries, heads, head_dim).astype(q.dtype)
