"""Orbax save/restore (also into shardings) and the export command line."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import hf_logits
from rlpa_jax import parallel
from rlpa_jax.checkpoint import Checkpointer, abstract_like, model_config_to_meta
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params, param_logical_axes

CONFIG = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_save_restore_round_trip_and_latest_step(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, {"actor": params, "step": jnp.int32(step)}, {"model_config": model_config_to_meta(CONFIG)})
    assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3
    state, meta = checkpointer.restore()
    assert int(state["step"]) == 3 and meta["model_config"]["hidden_size"] == 64
    jax.tree.map(np.testing.assert_array_equal, state["actor"], params)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7; steps found: \\[2, 3\\]"):
        checkpointer.restore(7)


def test_restore_into_shardings(tmp_path):
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    params = init_params(CONFIG, jax.random.key(1))
    shardings = parallel.shardings_for(param_logical_axes(CONFIG), params, mesh)
    sharded = parallel.shard(params, shardings)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(5, {"actor": sharded}, {})
    state, _ = checkpointer.restore(5, abstract_state={"actor": abstract_like(sharded)})
    q = state["actor"]["layers"]["attn"]["q_kernel"]
    assert q.sharding == shardings["layers"]["attn"]["q_kernel"]
    np.testing.assert_array_equal(np.asarray(q), np.asarray(params["layers"]["attn"]["q_kernel"]))


def test_export_command_line_writes_a_loadable_model(tmp_path):
    params = init_params(CONFIG, jax.random.key(2))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(1, {"actor": params}, {"model_config": model_config_to_meta(CONFIG)})
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, str(REPO / "launch" / "export_hf.py"), "--checkpoint", str(tmp_path / "ckpt"),
                             "--output", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 128, (2, 7))
    np.testing.assert_allclose(hf_logits(model, tokens), np.asarray(forward(params, CONFIG, jnp.asarray(tokens))[0]), atol=1e-4)
    missing = subprocess.run([sys.executable, str(REPO / "launch" / "export_hf.py"), "--checkpoint", str(tmp_path / "none"),
                              "--output", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
