"""The sampler's parameter layout decides what every decode step moves between devices.

Under the trainer's FSDP layout each decode step all-gathers every layer's weights (for
Qwen2.5-3B on 8 devices, ~11 GB per generated token: benchmarks/scale.py); the replicated
layout the rollout samples from by default moves almost nothing. Read off the compiled programs
of a small model with Qwen2.5-3B's proportions (16 query heads, 2 key/value heads, tied
embeddings, bfloat16 compute) on 8 fake devices, mesh fsdp=8 as in configs/qwen2.5-3b-8gpu.yaml.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.generation.layout import LAYOUTS, SamplingLayout
from rlpa_jax.generation.sampler import SamplingParams, generate
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.runtime import compiled_cost, parallel

CONFIG = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=1408, num_layers=4, num_heads=16,
                     num_kv_heads=2, tie_word_embeddings=True, compute_dtype="bfloat16")
PROMPTS, PROMPT_LENGTH = 16, 64
SAMPLING = SamplingParams(max_new_tokens=16, num_samples=4)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))


def actor_params(mesh):
    """The trainer's float32 FSDP parameters, as shapes and shardings."""
    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, parallel.param_shardings(CONFIG, mesh))


def sampler_cost(mesh, layout: str, params=None) -> compiled_cost.ProgramCost:
    """The sampler program compiled for what SamplingLayout hands it (per-layer copies in the
    compute dtype, or the actor's own stacked parameters under "training"), or for `params`."""
    if params is None:
        params = SamplingLayout(CONFIG, mesh, layout).abstract(actor_params(mesh))
    rows = parallel.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((PROMPTS, PROMPT_LENGTH), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((PROMPTS, PROMPT_LENGTH), jnp.bool_, sharding=rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    jitted = jax.jit(generate, static_argnames=("config", "sampling", "stop_ids", "pad_id"))
    with parallel.activate(mesh):
        compiled = jitted.lower(params, CONFIG, tokens, mask, key, SAMPLING, (2,), 0).compile()
    return compiled_cost.program_cost(f"sampler/{layout}", compiled)


def split_layer_weight_bytes(mesh) -> int:
    """Float32 bytes of the decoder-layer weights FSDP splits (biases and norms stay whole)."""
    layers = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))["layers"]
    shardings = parallel.param_shardings(CONFIG, mesh)["layers"]
    return sum(math.prod(x.shape) * 4 for x, sharding in zip(jax.tree.leaves(layers), jax.tree.leaves(shardings))
               if not sharding.is_fully_replicated)


def test_replicated_decode_moves_no_weights_while_fsdp_gathers_them_every_step(mesh):
    replicated, training = sampler_cost(mesh, "replicated"), sampler_cost(mesh, "training")

    # One flag per step (has every row stopped?) is all the replicated layout exchanges.
    assert replicated.collective_bytes_per_iteration < 1_000_000
    assert replicated.by_kind(in_loop=True).get("all-gather", 0) == 0
    # FSDP gathers every layer's split float32 weights on every step (XLA hoists the tied
    # embedding's gather out of the loop, so the decoder layers are the lower bound).
    assert training.by_kind(in_loop=True)["all-gather"] >= split_layer_weight_bytes(mesh) > 10_000_000
    # Both decode the same rows per device: the layout changes the traffic, not the work.
    assert replicated.flops_per_iteration == training.flops_per_iteration > 0


def test_the_per_layer_sampling_copy_is_the_only_copy_of_the_layer_weights(mesh):
    """SamplingLayout hands the sampler per-layer weights, which the decode loop reads as they are;
    given the stacked copy it used to make, the program splits it into a second copy of the layer
    weights for the call's whole length."""
    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    shardings = parallel.param_shardings(CONFIG, mesh, unused=LAYOUTS["replicated"])
    stacked = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, CONFIG.dtype, sharding=sh), shapes, shardings)
    per_layer, split_in_call = sampler_cost(mesh, "replicated"), sampler_cost(mesh, "replicated", stacked)
    layer_bytes = sum(math.prod(x.shape) * 2 for x in jax.tree.leaves(shapes["layers"]))  # bfloat16, whole per device
    assert per_layer.argument_bytes == split_in_call.argument_bytes  # the same weights handed over
    assert split_in_call.temp_bytes - per_layer.temp_bytes >= 0.9 * layer_bytes > 5_000_000
