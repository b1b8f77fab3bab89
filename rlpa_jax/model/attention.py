"""Attention for the Qwen2 decoder (model/qwen2.py), and which implementation runs it where.

Kernels written for the layouts the decoder hands them: one new token over a per-layer KV cache
(decode), and full attention laid out for XLA:CPU (prefill, scoring, training). Elsewhere full
attention is `jax.nn.dot_product_attention`: cuDNN's fused (flash) kernel on CUDA GPUs where its
constraints allow, XLA's einsum-softmax-einsum otherwise. `attention_implementation` chooses, per
backend, dtype and head size, and logs why when cuDNN was asked for or possible but not taken.

The decoder's mask is a boolean (batch, queries, keys) array: causal by cache slot, and only slots
that hold real tokens. Prompts are left-padded and a kept prefix cache leaves padding holes in
the middle of a row, so the mask is not one contiguous span per row; cuDNN's structured masks
(causal, padding by per-row sequence lengths, which count from slot 0) cannot say it alone. The
cuDNN path hands it over as an additive bias (`mask_bias`: 0 where a key is seen, a large negative
number where not), plus `is_causal` where the queries start at slot 0 (no cache, or a prefill
into an empty one): the kernel then skips the blocks above the diagonal, and the bias still
carries every other masked key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# model.attention: what the config asks for; Implementation: what runs.
REQUESTS = ("auto", "xla", "cudnn")
Implementation = Literal["cpu", "xla", "cudnn"]

# cuDNN's fused attention (jax/_src/cudnn/fused_attention_stablehlo.py, check_layout and
# check_is_flash_attention, JAX 0.10-0.11): 16-bit floats only; a head size that is a multiple of
# 8 and at most 128, or 256 from compute capability 9.0 (Hopper) on.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_HEAD_DIM_MAX, CUDNN_HEAD_DIM_MAX_HOPPER = 128, 256


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    implementation: Implementation
    reason: str  # why this one: what the config asked for and what the backend allows


def cudnn_head_dim_limit(compute_capability: tuple[int, int] | None) -> int:
    """The largest head size cuDNN's flash attention takes on a GPU of this compute capability."""
    hopper_or_later = compute_capability is not None and compute_capability >= (9, 0)
    return CUDNN_HEAD_DIM_MAX_HOPPER if hopper_or_later else CUDNN_HEAD_DIM_MAX


def cudnn_refusal(platform: str, dtype: str, head_dim: int,
                  compute_capability: tuple[int, int] | None) -> str | None:
    """Why cuDNN's fused attention cannot run this attention (None: it can)."""
    if platform != "cuda":
        return f"cuDNN runs on CUDA GPUs only (this backend: {platform})"
    if dtype not in CUDNN_DTYPES:
        return f"cuDNN attention takes {' or '.join(CUDNN_DTYPES)} only (model.compute_dtype={dtype})"
    limit = cudnn_head_dim_limit(compute_capability)
    if head_dim % CUDNN_HEAD_DIM_MULTIPLE or head_dim > limit:
        return (f"cuDNN attention takes a head size that is a multiple of {CUDNN_HEAD_DIM_MULTIPLE} and at most "
                f"{limit} on compute capability {compute_capability} (head_dim={head_dim})")
    return None


@functools.lru_cache(maxsize=None)  # decided (and logged) once per model shape and backend
def attention_implementation(requested: str, platform: str, dtype: str, head_dim: int,
                             compute_capability: tuple[int, int] | None = None) -> AttentionChoice:
    """Which implementation runs full attention (prefill, scoring, training).

    requested: model.attention (auto, xla, cudnn); platform: "cpu", "cuda", "rocm", "tpu" (see
    `current_platform`); dtype: the compute dtype's name. auto: the CPU kernel on CPU, cuDNN
    where `cudnn_refusal` has no objection, XLA elsewhere. xla: XLA everywhere (CPU included).
    cudnn: as auto, with a warning where cuDNN cannot run it (XLA then runs it, on CPU the CPU
    kernel).
    """
    if requested not in REQUESTS:
        raise ValueError(f"model.attention={requested!r}; expected one of {', '.join(REQUESTS)}")
    if requested == "xla":
        return AttentionChoice("xla", "model.attention=xla")
    refusal = cudnn_refusal(platform, dtype, head_dim, compute_capability)
    if refusal is None:
        choice = AttentionChoice("cudnn", f"model.attention={requested}: cuDNN fused attention on {platform}")
    elif platform == "cpu":
        choice = AttentionChoice("cpu", f"model.attention={requested}: the CPU kernel ({refusal})")
    else:
        choice = AttentionChoice("xla", f"model.attention={requested}: XLA ({refusal})")
    if requested == "cudnn" and refusal is not None:
        log.warning("attention: model.attention=cudnn is not possible here, %s instead: %s",
                    choice.implementation, refusal)
    else:
        log.info("attention: %s (%s)", choice.implementation, choice.reason)
    return choice


def current_platform() -> tuple[str, tuple[int, int] | None]:
    """(platform, compute capability) of the default backend: "cuda" with its GPU's (major, minor),
    "rocm", or the backend's name (cpu, tpu) with None."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform, None
    version = str(getattr(device.client, "platform_version", "")).lower()
    if "rocm" in version or "hip" in version:
        return "rocm", None
    capability = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    except ValueError:
        return "cuda", None
    return "cuda", (major, minor)


def mask_bias(mask: jax.Array, dtype) -> jax.Array:
    """(batch, queries, keys) boolean mask -> (batch, 1, queries, keys) additive bias in `dtype`:
    0 where a key is seen, a large negative number where not. The number is the one JAX's cuDNN
    path uses for a boolean mask (-2**41 in bfloat16 and float32, -2**15 in float16: cuDNN
    mishandles the difference of two values near the dtype's minimum). A row that sees no key
    (a padding query) comes out finite: equal scores, a uniform average."""
    large_negative = -(2 << 14) if np.dtype(dtype) == np.float16 else -(2 << 40)
    return jnp.where(mask[:, None], jnp.asarray(0, dtype), jnp.asarray(large_negative, dtype))


def cudnn_mask_arguments(mask: jax.Array, dtype, queries_start_at_zero: bool) -> dict:
    """What the cuDNN path passes `jax.nn.dot_product_attention` for the decoder's mask: the mask as
    a bias, and is_causal where the queries sit at slots 0.. (query i then sees keys j <= i, the
    kernel's top-left causal mask, which it skips instead of computing)."""
    return {"bias": mask_bias(mask, dtype), "is_causal": bool(queries_start_at_zero)}


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: Implementation,
                    queries_start_at_zero: bool = False) -> jax.Array:
    """Full attention by `implementation` (`attention_implementation`'s choice).

    q: (batch, queries, heads, head_dim); k, v: (batch, keys, kv_heads, head_dim); mask: (batch,
    queries, keys) boolean. queries_start_at_zero: query i sits in slot i (no cache, or a prefill
    into an empty one), which lets cuDNN skip the blocks above the diagonal.
    """
    if implementation == "cpu":
        return heads_major_attention(q, k, v, mask)
    if implementation == "cudnn" and q.shape[1] > 1:
        # One query per row (a decode step over a stacked cache) stays with XLA: the kernel's gain
        # is in blocks of queries.
        return jax.nn.dot_product_attention(q, k, v, **cudnn_mask_arguments(mask, q.dtype, queries_start_at_zero),
                                            implementation="cudnn")
    # XLA's einsum-softmax-einsum; fully masked padding rows come out finite.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="xla")


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
