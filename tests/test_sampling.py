"""The jitted sampler against transformers' greedy generate, a full-forward recomputation, and the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_hf_model, save_hf_model
from jax.sharding import PartitionSpec

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.generation.layout import SamplingLayout
from rlpa_jax.generation.sampler import (
    Sampler,
    SamplingParams,
    bucket,
    filter_logits,
    generate,
    pad_prompts,
)
from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import forward, param_logical_axes
from rlpa_jax.runtime import parallel

PAD, STOP = 0, 1
NEW = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    reference = make_hf_model(vocab_size=300, tie_word_embeddings=False, num_attention_heads=6, hidden_size=96)
    params, config = hf.load_params(save_hf_model(reference, tmp_path_factory.mktemp("m")))
    return reference, params, config


PROMPTS = [[5, 17, 99, 42, 7, 8, 250, 3], [11, 12], [200, 201, 202, 203, 204]]


def test_greedy_equals_transformers_generate(model):
    reference, params, config = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_buckets=(16,))
    sampler = Sampler(config, stop_ids=(), pad_id=PAD)  # no stop ids: all 32 tokens compared
    out = sampler(params, tokens, mask, jax.random.key(0), SamplingParams(max_new_tokens=NEW, temperature=0))
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=None,
        )[:, tokens.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[: len(PROMPTS)]), expected[: len(PROMPTS)])
    assert np.asarray(out.lengths).tolist() == [NEW] * len(PROMPTS)


def recompute_logprobs(params, config, tokens, mask, out):
    """Log-probs of the sampled tokens from one full forward pass over prompt + response."""
    n = out.tokens.shape[0] // tokens.shape[0]
    full = jnp.concatenate([jnp.repeat(tokens, n, 0), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.repeat(mask, n, 0), out.mask], axis=1)
    logits, _ = forward(params, config, full, full_mask)
    logp = jax.nn.log_softmax(logits[:, tokens.shape[1] - 1:-1], axis=-1)
    return jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]


def test_sampled_logprobs_equal_full_forward_and_stop_early(model):
    _, params, config = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_buckets=(16,))
    stop_ids = tuple(range(1, 40))  # frequent stops: rows end at different steps
    sampling = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, top_k=50, num_samples=4)
    out = jax.jit(generate, static_argnums=(1, 5, 6, 7))(params, config, tokens, mask, jax.random.key(3), sampling, stop_ids, PAD)
    assert out.tokens.shape == (12, NEW)
    lengths = np.asarray(out.lengths)
    assert lengths.min() < NEW, "some row should stop early with so many stop ids"
    for row, length in enumerate(lengths):
        toks = np.asarray(out.tokens[row])
        if length < NEW:
            assert toks[length - 1] in stop_ids and (toks[length:] == PAD).all()
        assert not np.isin(toks[: length - 1], stop_ids).any()
    assert int(out.steps) == lengths.max()
    recomputed = recompute_logprobs(params, config, jnp.asarray(tokens), jnp.asarray(mask), out)
    np.testing.assert_allclose(np.where(out.mask, recomputed, 0), out.logprobs, atol=1e-4)


def test_reproducible_from_the_key_and_samples_differ(model):
    _, params, config = model
    tokens, mask = pad_prompts(PROMPTS[:1], PAD, length_buckets=(16,))
    sampler = Sampler(config, stop_ids=(STOP,), pad_id=PAD)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=4)
    a = sampler(params, tokens, mask, jax.random.key(7), sampling)
    b = sampler(params, tokens, mask, jax.random.key(7), sampling)
    c = sampler(params, tokens, mask, jax.random.key(8), sampling)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in np.asarray(a.tokens)}) > 1, "the 4 samples of one prompt should differ"
    assert sampler.compile_count == 1


def test_filters_match_numpy():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, 3.0]])
    top_k = np.asarray(filter_logits(logits, top_k=2, top_p=1.0))[0]
    assert np.isfinite(top_k).tolist() == [True, False, False, False, True]
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = (np.cumsum(probs[order]) - probs[order]) < 0.8
    expected = np.zeros(5, bool)
    expected[order[keep]] = True
    assert np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=0.8))[0]).tolist() == expected.tolist()


def test_mesh_gives_the_same_greedy_output(model):
    _, params, config = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_buckets=(16,), batch_multiple=4)
    sampling = SamplingParams(max_new_tokens=12, temperature=0, num_samples=2)
    single = Sampler(config, (STOP,), PAD)(params, tokens, mask, jax.random.key(0), sampling)
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = parallel.shardings_for(param_logical_axes(config), params, mesh)
    with parallel.activate(mesh):
        batch = parallel.batch_sharding(mesh)
        sharded = Sampler(config, (STOP,), PAD)(parallel.shard(params, shardings), jax.device_put(tokens, batch),
                                                jax.device_put(mask, batch), jax.random.key(0), sampling)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)


@pytest.mark.parametrize("layout", ["replicated", "tensor", "training"])
def test_every_sampling_layout_gives_the_same_output(model, layout):
    _, params, config = model
    tokens, mask = pad_prompts(PROMPTS, PAD, length_buckets=(16,), batch_multiple=4)
    sampling = SamplingParams(max_new_tokens=12, temperature=0, num_samples=2)
    single = Sampler(config, (STOP,), PAD)(params, tokens, mask, jax.random.key(0), sampling)
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    trained = parallel.shard(params, parallel.param_shardings(config, mesh))  # the trainer's FSDP layout
    sampling_layout = SamplingLayout(config, mesh, layout)
    sampler_params = sampling_layout(trained)
    # The training layout is the actor's own stacked parameters; the others are per-layer copies
    # (each layer's leaves split as the stacked ones, without the layer axis) in the compute dtype.
    up = (sampler_params["layers"] if layout == "training" else sampler_params["layer_1"])["mlp"]["up_kernel"]
    assert up.sharding.spec == {"replicated": PartitionSpec(None, None), "tensor": PartitionSpec(None, "tensor"),
                                "training": PartitionSpec(None, "fsdp", "tensor")}[layout]
    assert ("layers" in sampler_params) == (layout == "training")
    if layout != "training":
        np.testing.assert_array_equal(np.asarray(up), np.asarray(params["layers"]["mlp"]["up_kernel"][1]))
        assert sampling_layout.in_layout(sampler_params) and sampling_layout(sampler_params) is sampler_params
        assert not sampling_layout.in_layout(trained)
    with parallel.activate(mesh):
        batch = parallel.batch_sharding(mesh)
        sharded = Sampler(config, (STOP,), PAD)(sampler_params, jax.device_put(tokens, batch),
                                                jax.device_put(mask, batch), jax.random.key(0), sampling)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match=r"rollout.layout='fsdp' is not one of replicated, tensor, training"):
        SamplingLayout(config, mesh, "fsdp")


def test_one_device_float32_parameters_are_sampled_as_they_are(model):
    """No per-rollout copy where the actor already is what the sampler reads (each call splits
    it, bit for bit as before); another compute dtype gets the per-layer copy."""
    _, params, config = model
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    placed = parallel.shard(params, parallel.param_shardings(config, mesh))
    layout = SamplingLayout(config, mesh)
    assert layout(placed) is placed
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
    assert layout.abstract(abstract) is abstract  # the memory check lowers the sampler for the actor itself
    bf16 = SamplingLayout(config.replace(compute_dtype="bfloat16"), mesh)(placed)
    assert "layers" not in bf16 and bf16["layer_0"]["mlp"]["up_kernel"].dtype == jnp.bfloat16


def test_bucketing_and_padding():
    assert [bucket(n, (64, 128)) for n in (1, 64, 65, 129, 300)] == [64, 64, 128, 256, 384]
    tokens, mask = pad_prompts([[1, 2, 3], [4]], pad_id=9, length_buckets=(4,), batch_multiple=4)
    assert tokens.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4], [9] * 4, [9] * 4]
    assert mask.sum(1).tolist() == [3, 1, 0, 0]
    with pytest.raises(ValueError, match="no empty prompt"):
        pad_prompts([[1], []], 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
