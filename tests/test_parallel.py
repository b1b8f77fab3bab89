"""Sharding on 8 fake CPU devices (set in conftest): same numbers as one device, real shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_hf_model, save_hf_model
from jax.sharding import PartitionSpec as P

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params, param_logical_axes
from rlpa_jax.runtime import parallel

CONFIG = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    return parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def sharded_params(mesh, params, config=CONFIG, head="lm"):
    shardings = parallel.shardings_for(param_logical_axes(config, head), params, mesh)
    return parallel.shard(params, shardings), shardings


def test_parameters_are_sharded_as_the_rules_say(mesh):
    params, _ = sharded_params(mesh, init_params(CONFIG, jax.random.key(0)))
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["layers"]["attn"]["q_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["mlp"]["down_kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["final_norm"]["scale"].sharding.spec == P(None)
    # Each device really holds a quarter of the MLP kernel (fsdp=2 x tensor=2), replicated over data.
    shards = params["layers"]["mlp"]["gate_kernel"].addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(2, 32, 64)}


def test_sharded_forward_equals_single_device(mesh):
    params = init_params(CONFIG, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)))
    mask = jnp.ones((4, 16), bool).at[1, :5].set(False)
    single = forward(params, CONFIG, tokens, mask)[0]

    sharded, shardings = sharded_params(mesh, params)
    batch = parallel.batch_sharding(mesh)
    with parallel.activate(mesh):
        step = jax.jit(lambda p, t, m: forward(p, CONFIG, t, m)[0], in_shardings=(shardings, batch, batch))
        out = step(sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5, rtol=0)


def test_checkpoint_loads_straight_into_shardings(mesh, tmp_path):
    directory = save_hf_model(make_hf_model(tie_word_embeddings=False), tmp_path / "m")
    config = hf.load_config(directory)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shardings = parallel.shardings_for(param_logical_axes(config), abstract, mesh)
    params, _ = hf.load_params(directory, config, shardings=shardings)
    plain, _ = hf.load_params(directory, config)
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), params, shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)


def test_undividable_dimensions_stay_replicated(mesh):
    # 2 kv heads over tensor=4 cannot split: that weight falls back to replication, the rest shards.
    wide = parallel.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    spec = parallel.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), wide)
    assert spec == P(None, "fsdp", None, None)


def test_mesh_that_does_not_divide_the_devices_is_refused():
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        parallel.make_mesh(MeshConfig(data=3, fsdp=-1))
    assert parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1)).devices.size == 4  # a subset
    assert parallel.make_mesh(MeshConfig(fsdp=-1)).shape["fsdp"] == 8
