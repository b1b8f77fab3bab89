"""Which attention implementation runs where, and the cuDNN path's form of the decoder's mask.

cuDNN's kernel itself runs only on a CUDA GPU (JAX's cuDNN path stops at trace time with "cuDNN
is not detected" on a CPU-only jaxlib, before lowering), so on CPU the mask it would be handed (a
bias, plus is_causal where the queries start at slot 0) is run through XLA's implementation of
the same `jax.nn.dot_product_attention` call and compared with the boolean mask; the cuDNN
program compiles in `test_cudnn_program_compiles_on_a_cuda_gpu` where a CUDA GPU is present
(benchmarks/device_check.py runs it on a lent one).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlpa_jax.model.attention import (
    attention_implementation,
    cudnn_mask_arguments,
    current_platform,
    fused_attention,
    heads_major_attention,
)
from rlpa_jax.model.qwen2 import Qwen2Config, attention_mask, forward, init_params

H100, A100 = (9, 0), (8, 0)


@pytest.mark.parametrize("requested, platform, dtype, head_dim, capability, expected", [
    ("auto", "cpu", "float32", 128, None, "cpu"),
    ("auto", "cpu", "bfloat16", 128, None, "cpu"),  # CPU: unchanged, whatever the dtype
    ("cudnn", "cpu", "bfloat16", 128, None, "cpu"),  # asked for, impossible: the CPU kernel, warned
    ("xla", "cpu", "float32", 64, None, "xla"),
    ("auto", "cuda", "bfloat16", 128, H100, "cudnn"),  # Qwen2.5-3B on an H100
    ("auto", "cuda", "float16", 64, A100, "cudnn"),
    ("auto", "cuda", "float32", 128, H100, "xla"),  # cuDNN takes 16-bit floats only
    ("auto", "cuda", "bfloat16", 256, H100, "cudnn"),  # up to 256 from Hopper on
    ("auto", "cuda", "bfloat16", 256, A100, "xla"),  # up to 128 before
    ("auto", "cuda", "bfloat16", 100, H100, "xla"),  # not a multiple of 8
    ("cudnn", "cuda", "float32", 128, H100, "xla"),
    ("xla", "cuda", "bfloat16", 128, H100, "xla"),
    ("auto", "rocm", "bfloat16", 128, None, "xla"),
    ("auto", "tpu", "bfloat16", 128, None, "xla"),
])
def test_implementation_per_backend_dtype_and_head_size(requested, platform, dtype, head_dim, capability, expected):
    attention_implementation.cache_clear()
    choice = attention_implementation(requested, platform, dtype, head_dim, capability)
    assert choice.implementation == expected
    assert requested in choice.reason


def test_an_impossible_cudnn_request_is_logged_with_its_reason(caplog):
    attention_implementation.cache_clear()
    with caplog.at_level(logging.WARNING, logger="rlpa_jax.model.attention"):
        attention_implementation("cudnn", "cuda", "float32", 128, H100)
    assert any("float32" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention_implementation("flash", "cuda", "bfloat16", 128, H100)
    with pytest.raises(ValueError, match="attention='flash'"):
        Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, attention="flash")


def _decoder_masks():
    """The decoder's masks as its callers build them (model/qwen2.attention_mask): left-padded
    prompts without a cache; a prefill into an empty cache with slots beyond the prompt; a kept
    prefix (with padding holes in the middle of a row) plus a left-padded suffix."""
    no_cache = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 0, 0, 0, 1, 1], [0] * 7 + [1]], bool)
    prefill = np.zeros((4, 12), bool)
    prefill[:, :8] = no_cache
    kept = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]], bool)  # row 2: a new conversation
    suffix = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]], bool)
    continued = np.zeros((4, 13), bool)
    continued[:, :4], continued[:, 4:9] = kept, suffix
    return {  # name -> (key mask, query length, cache index)
        "no cache": (no_cache, 8, 0),
        "prefill into an empty cache": (prefill, 8, 0),
        "suffix after a kept prefix": (continued, 5, 4),
    }


@pytest.mark.parametrize("case", sorted(_decoder_masks()))
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_cudnn_mask_form_gives_the_boolean_masks_attention(case, dtype, atol):
    """The bias (and is_causal where queries start at slot 0) that the cuDNN path passes, run
    through XLA's implementation, equals attention under the boolean mask on every query that sees
    a key; a query that sees none (left padding) comes out finite."""
    key_mask, queries, cache_index = _decoder_masks()[case]
    batch, keys = key_mask.shape
    heads, kv_heads, head_dim = 4, 2, 16
    q_key, k_key, v_key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(q_key, (batch, queries, heads, head_dim)).astype(dtype)
    k = jax.random.normal(k_key, (batch, keys, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(v_key, (batch, keys, kv_heads, head_dim)).astype(dtype)
    mask = attention_mask(jnp.asarray(key_mask), queries, cache_index)

    arguments = cudnn_mask_arguments(mask, dtype, queries_start_at_zero=cache_index == 0)
    assert arguments["bias"].shape == (batch, 1, queries, keys) and arguments["bias"].dtype == dtype
    assert arguments["is_causal"] == (cache_index == 0)
    as_cudnn_gets_it = jax.nn.dot_product_attention(q, k, v, **arguments, implementation="xla")
    reference = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")

    sees_a_key = np.asarray(mask.any(-1))  # (batch, queries)
    assert not sees_a_key.all()  # left-padding queries are among the cases
    assert np.isfinite(np.asarray(as_cudnn_gets_it, np.float32)).all()
    np.testing.assert_allclose(np.asarray(as_cudnn_gets_it, np.float32)[sees_a_key],
                               np.asarray(reference, np.float32)[sees_a_key], atol=atol, rtol=0)
    # And the CPU kernel (what CPU runs) agrees with both on those queries.
    np.testing.assert_allclose(np.asarray(heads_major_attention(q, k, v, mask), np.float32)[sees_a_key],
                               np.asarray(reference, np.float32)[sees_a_key], atol=atol, rtol=0)


def test_model_with_xla_attention_matches_the_cpu_kernel():
    """model.attention=xla runs jax.nn's XLA attention on CPU too: the same logits on real tokens."""
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 64)
    mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0] * 6 + [1] * 3], bool))
    cpu, _ = forward(params, config, tokens, mask)
    xla, _ = forward(params, config.replace(attention="xla"), tokens, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(xla)[real], np.asarray(cpu)[real], atol=1e-5, rtol=0)


def test_single_query_rows_stay_with_xla_under_cudnn():
    """A decode step over a stacked cache (one query per row) is not sent to cuDNN: on CPU it runs
    through XLA, where the cuDNN path would stop at 'cuDNN is not detected'."""
    q = jnp.ones((2, 1, 4, 8), jnp.bfloat16)
    kv = jnp.ones((2, 5, 2, 8), jnp.bfloat16)
    mask = jnp.ones((2, 1, 5), bool)
    out = fused_attention(q, kv, kv, mask, "cudnn")
    assert out.shape == q.shape


@pytest.mark.skipif(current_platform()[0] == "cuda", reason="CPU-only jaxlib behaviour")
def test_cudnn_program_stops_at_cudnn_detection_on_cpu():
    """What can be checked of the cuDNN program without a GPU: jax.nn accepts the arguments (shapes,
    dtypes, the bias's rank) and the path stops only where it looks for cuDNN, before lowering."""
    q = jnp.zeros((2, 8, 4, 16), jnp.bfloat16)
    kv = jnp.zeros((2, 8, 2, 16), jnp.bfloat16)
    mask = attention_mask(jnp.ones((2, 8), bool), 8, 0)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        jax.jit(lambda q, k, v: fused_attention(q, k, v, mask, "cudnn", True)).lower(q, kv, kv)


@pytest.mark.skipif(current_platform()[0] != "cuda", reason="needs a CUDA GPU (cuDNN)")
def test_cudnn_program_compiles_on_a_cuda_gpu():
    """On a CUDA GPU: the decoder's cuDNN program (forward and gradient) compiles and runs, and
    matches XLA's on the queries that see a key."""
    key_mask, queries, cache_index = _decoder_masks()["no cache"]
    mask = attention_mask(jnp.asarray(key_mask), queries, cache_index)
    q = jax.random.normal(jax.random.key(0), (4, queries, 4, 64)).astype(jnp.bfloat16)
    kv = jax.random.normal(jax.random.key(1), (4, queries, 2, 64)).astype(jnp.bfloat16)

    def loss(q, implementation):
        return fused_attention(q, kv, kv, mask, implementation, True).astype(jnp.float32).sum()

    cudnn = jax.jit(lambda q: fused_attention(q, kv, kv, mask, "cudnn", True))(q)
    xla = fused_attention(q, kv, kv, mask, "xla")
    sees_a_key = np.asarray(mask.any(-1))
    np.testing.assert_allclose(np.asarray(cudnn, np.float32)[sees_a_key], np.asarray(xla, np.float32)[sees_a_key],
                               atol=3e-2, rtol=0)
    assert np.isfinite(np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(q, "cudnn"), np.float32)).all()
