"""Sharding on 8 fake CPU devices (set in conftest): same numbers as one device, real shards."""

import dataclasses
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_hf_model, save_hf_model
from jax.sharding import PartitionSpec as P

from rlpa_jax.app import build
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params, param_logical_axes
from rlpa_jax.runtime import parallel

REPO = Path(__file__).resolve().parents[1]
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
    assert parallel.make_mesh(MeshConfig(fsdp=-1)).shape["fsdp"] == 8


def test_a_mesh_that_would_leave_devices_idle_is_refused_naming_the_sizes_that_use_them():
    with pytest.raises(ValueError, match=r"mesh data=2 fsdp=2 tensor=1 spans 4 of the 8 devices present and would "
                                         r"leave 4 idle; use every device with mesh.data=4 or mesh.fsdp=4 or "
                                         r"mesh.tensor=2 \(or -1 on that axis\), or run on the first 4 with "
                                         r"mesh.devices=4"):
        parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="mesh data=1 fsdp=16 tensor=1 needs 16 devices, but 8 are present; "
                                         "use every device with mesh.fsdp=8"):
        parallel.make_mesh(MeshConfig(data=1, fsdp=16, tensor=1))


def test_the_paper_mesh_on_two_hosts_of_eight_is_refused_and_its_named_fixes_use_all_sixteen():
    paper = load_config(REPO / "configs" / "qwen2.5-3b-8gpu.yaml").mesh
    assert parallel.make_mesh(paper).devices.size == 8  # one 8-GPU host: every device
    with pytest.raises(ValueError, match=r"spans 8 of the 16 devices present and would leave 8 idle; use every "
                                         r"device with mesh.data=2 or mesh.fsdp=16"):
        parallel.mesh_shape(paper, 16)
    assert parallel.mesh_shape(dataclasses.replace(paper, data=2), 16) == (2, 8, 1)
    assert parallel.mesh_shape(dataclasses.replace(paper, fsdp=-1), 16) == (1, 16, 1)


def test_mesh_devices_asks_for_a_mesh_on_the_first_devices():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, devices=4))
    assert mesh.devices.flatten().tolist() == jax.devices()[:4]
    assert parallel.make_mesh(MeshConfig(fsdp=-1, devices=2)).shape == {"data": 1, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="mesh data=2 fsdp=2 tensor=1 spans 4 devices, but mesh.devices=2"):
        parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, devices=2))
    with pytest.raises(ValueError, match="mesh.devices=9, but 8 devices are present"):
        parallel.make_mesh(MeshConfig(fsdp=-1, devices=9))


def test_mesh_devices_that_leave_a_process_without_a_device_is_refused():
    # Two processes of 4 devices each: the first 4 are process 0's, so process 1 would have none.
    devices = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    with pytest.raises(ValueError, match="mesh.devices=4 leaves process 1 without a device"):
        parallel.make_mesh(MeshConfig(fsdp=-1, devices=4), devices)


def test_a_config_mesh_that_cannot_span_its_devices_is_refused_at_load_and_the_built_one_at_build():
    with pytest.raises(ConfigError, match=r"mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 cannot span mesh.devices=3"):
        load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.devices=3"])
    with pytest.raises(ConfigError, match="cannot span mesh.devices=3"):
        load_config(None, ["mesh.data=2", "mesh.devices=3"])  # fsdp=-1 in tiny.yaml: 3 is no multiple of 2
    with pytest.raises(ValueError, match="would leave 7 idle"):
        build.build_mesh(load_config(None, ["mesh.fsdp=1"]))
    assert build.build_mesh(load_config(None, ["mesh.devices=1"])).devices.size == 1
