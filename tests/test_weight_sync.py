"""The weight sync (generation/layout.SamplingLayout): FSDP float32 masters -> the sampler's per-layer
copy in the compute dtype, made a layer (or a block of vocabulary rows) at a time.

Checked against a numpy cast of every master (bit for bit), and, from compiled programs on 8 fake
CPU devices, against the one-program sync it replaced: its temporaries are the whole model's
gathered masters, the layer-at-a-time sync's stay under two layers' worth.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.generation.layout import SamplingLayout, vocab_blocks
from rlpa_jax.model.layer_stacks import unstack_layers
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.runtime import parallel

# Six layers, and a vocabulary whose embedding is a few layers' worth (as Qwen2.5-3B's is: 4 layers).
CONFIG = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                     num_kv_heads=2, compute_dtype="bfloat16")
FSDP = MeshConfig(data=1, fsdp=8, tensor=1)


def float32_bytes(tree) -> int:
    return sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("tied", [True, False])
def test_sync_is_a_bit_exact_cast_of_every_master_and_leaves_them_alone(tied):
    config = CONFIG.replace(tie_word_embeddings=tied)
    mesh = parallel.make_mesh(FSDP)
    masters = jax.jit(lambda: init_params(config, jax.random.key(3)),
                      out_shardings=parallel.param_shardings(config, mesh))()
    before = jax.tree.map(np.array, masters)
    layout = SamplingLayout(config, mesh)
    blocks = vocab_blocks(config, parallel.param_shardings(config, mesh))
    assert set(blocks) == ({"embed"} if tied else {"embed", "lm_head"}) and all(n > 1 for _, _, n in blocks.values())

    copy = layout(masters)
    expected = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), unstack_layers(before, config))
    assert jax.tree.structure(copy) == jax.tree.structure(expected)
    for got, want, sharding in zip(jax.tree.leaves(copy), jax.tree.leaves(expected), jax.tree.leaves(layout.shardings)):
        assert got.dtype == jnp.bfloat16 and got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    # Nothing of the trainer's is donated: the masters are still there, unchanged.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, masters), before)
    assert layout.in_layout(copy) and layout(copy) is copy


def test_sync_temporaries_stay_under_two_layers_not_the_whole_model():
    """Per device, compiled for abstract masters: the one-program sync (what SamplingLayout was)
    gathers every float32 master; each program of the layer-at-a-time sync holds at most two
    layers' worth of temporaries (one layer's, or one block of vocabulary rows, gathered)."""
    mesh = parallel.make_mesh(FSDP)
    shardings = parallel.param_shardings(CONFIG, mesh)
    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    masters = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    layout = SamplingLayout(CONFIG, mesh)
    one_layer = float32_bytes(shapes["layers"]) // CONFIG.num_layers

    whole = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(CONFIG.dtype), unstack_layers(p, CONFIG)),
                    out_shardings=layout.shardings).lower(masters).compile().memory_analysis()
    assert whole.temp_size_in_bytes > 0.5 * float32_bytes(shapes)  # the reference: most masters gathered at once

    programs = layout.lower_sync(masters)
    assert [p.name for p in programs] == ["one layer", "embed block", "lm_head block", "the rest"]
    temporaries = {p.name: p.lowered.compile().memory_analysis().temp_size_in_bytes for p in programs}
    assert max(temporaries.values()) < 2 * one_layer, (temporaries, one_layer)
    assert max(temporaries.values()) * 4 < whole.temp_size_in_bytes
