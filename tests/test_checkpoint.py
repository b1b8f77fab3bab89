"""Orbax save/restore (also into shardings), resuming past damaged steps, and the export command line."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits

from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params, param_logical_axes
from rlpa_jax.runtime import parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, CheckpointError, abstract_like, model_config_to_meta

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
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
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
    # A meta without a system prompt: rollout.system_prompt's default, said on stderr; no tokenizer,
    # so rlpa_format.json alone carries it.
    assert "names no system prompt" in result.stderr and not (out / "chat_template.jinja").exists()
    assert json.loads((out / "rlpa_format.json").read_text())["system_prompt_name"] == "policy_system"
    unknown = subprocess.run([sys.executable, str(REPO / "launch" / "export_hf.py"), "--checkpoint", str(tmp_path / "ckpt"),
                              "--output", str(tmp_path / "hf2"), "--system-prompt", "no_such_prompt"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert unknown.returncode == 2 and "prompt 'no_such_prompt' not found" in unknown.stderr
    assert not (tmp_path / "hf2").exists()  # refused before anything was written
    missing = subprocess.run([sys.executable, str(REPO / "launch" / "export_hf.py"), "--checkpoint", str(tmp_path / "none"),
                              "--output", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ---------------------------------------------------------------------------------------------
# Resuming past damaged steps. Orbax 0.12.8 writes a step as
#   <step>/_CHECKPOINT_METADATA, commit_success.txt
#   <step>/meta/metadata                              the JSON document
#   <step>/state/_METADATA, _sharding, manifest.ocdbt  the pytree's structure and array metadata
#   <step>/state/ocdbt.process_0/d/<hash>              the array bytes (OCDBT data files)
# Given the state's shapes (`abstract_state`, as the trainer passes), orbax reads arrays by that tree
# and does not need state/_METADATA; the OCDBT root manifest, the data files and meta/ it always needs.


def saved_steps(directory, steps=(1, 2)):
    """{step: state} saved at each step: a tiny Qwen2's params (different per step) and an int."""
    checkpointer = Checkpointer(directory, max_to_keep=5)
    states = {}
    for step in steps:
        states[step] = {"actor": init_params(CONFIG, jax.random.key(10 + step)), "step": jnp.int32(step)}
        checkpointer.save(step, states[step], {"iteration": step})
    checkpointer.close()
    return states


def damage(step_dir, how):
    if how == "truncated array file":
        data = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
        assert data, f"no OCDBT data files in {step_dir}: has orbax's layout changed?"
        os.truncate(data[-1], data[-1].stat().st_size // 2)
    elif how == "state metadata deleted":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "array index deleted":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif how == "meta document deleted":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "array data file deleted":
        max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size).unlink()
    elif how in ("meta document torn", "state metadata torn"):
        path = step_dir / ("meta/metadata" if how == "meta document torn" else "state/_METADATA")
        os.truncate(path, path.stat().st_size // 2)
    else:
        raise AssertionError(how)


def assert_state_equal(restored, expected):
    assert int(restored["step"]) == int(expected["step"])
    jax.tree.map(np.testing.assert_array_equal, restored["actor"], expected["actor"])


@pytest.mark.parametrize("how, with_shapes", [
    ("truncated array file", True), ("truncated array file", False), ("array index deleted", True),
    ("state metadata deleted", False), ("meta document deleted", True), ("array data file deleted", True),
    ("meta document torn", True), ("state metadata torn", False),
])
def test_resume_falls_back_past_a_damaged_newest_step(tmp_path, caplog, how, with_shapes):
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    damage(directory / "2", how)
    checkpointer = Checkpointer(directory, max_to_keep=5)
    with caplog.at_level(logging.WARNING, logger="rlpa_jax.runtime.checkpoint"):
        step, state, meta = checkpointer.restore_latest_readable(abstract_like(states[1]) if with_shapes else None)
    assert step == 1 and meta == {"iteration": 1}
    assert_state_equal(state, states[1])
    assert (directory / "2.corrupt").is_dir() and not (directory / "2").exists()
    assert checkpointer.all_steps() == [1]
    warning = next(r.getMessage() for r in caplog.records if "step 2 cannot be read" in r.getMessage())
    assert str(directory) in warning and "Error" in warning and "\n" not in warning, warning

    # The run goes on: step 2 is saved again beside the kept bad copy, and is what resumes next.
    checkpointer.save(2, states[2], {"iteration": 2})
    step, state, _ = Checkpointer(directory).restore_latest_readable()
    assert step == 2
    assert_state_equal(state, states[2])
    assert (directory / "2.corrupt").is_dir()


def test_state_metadata_is_not_needed_when_the_shapes_are_given(tmp_path):
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    damage(directory / "2", "state metadata deleted")
    step, state, _ = Checkpointer(directory).restore_latest_readable(abstract_like(states[2]))
    assert step == 2 and (directory / "2").is_dir()
    assert_state_equal(state, states[2])


def test_a_step_damaged_twice_keeps_both_copies(tmp_path):
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    checkpointer = Checkpointer(directory, max_to_keep=5)
    for _ in range(2):
        damage(directory / "2", "state metadata deleted")
        assert checkpointer.restore_latest_readable()[0] == 1
        checkpointer.save(2, states[2], {"iteration": 2})
    assert (directory / "2.corrupt").is_dir() and (directory / "2.corrupt.1").is_dir()


def test_no_readable_step_is_an_error_naming_every_step(tmp_path):
    directory = tmp_path / "ckpt"
    saved_steps(directory)
    damage(directory / "2", "truncated array file")
    damage(directory / "1", "state metadata deleted")
    with pytest.raises(CheckpointError) as error:
        Checkpointer(directory).restore_latest_readable()
    message = str(error.value)
    assert message.startswith(f"{directory.absolute()}: no checkpoint step can be read (tried 2")
    assert "\n  step 2: " in message and "\n  step 1: FileNotFoundError" in message and "_METADATA" in message
    assert sorted(child.name for child in directory.iterdir()) == ["1", "2"]  # nothing moved when nothing reads
    with pytest.raises(CheckpointError, match="no checkpoint steps to resume from"):
        Checkpointer(tmp_path / "empty").restore_latest_readable()


def test_a_step_left_in_its_temporary_directory_is_never_listed(tmp_path):
    """A save cut short leaves orbax's <step>.orbax-checkpoint-tmp...; it is not a step."""
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    for leftover in ("3.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1700000000"):
        shutil.copytree(directory / "2", directory / leftover)
        damage(directory / leftover, "truncated array file")
    checkpointer = Checkpointer(directory)
    assert checkpointer.all_steps() == [1, 2]
    step, state, _ = checkpointer.restore_latest_readable()
    assert step == 2
    assert_state_equal(state, states[2])
    assert (directory / "3.orbax-checkpoint-tmp").is_dir()  # not renamed: it was never a step


def test_a_partial_resume_reads_only_the_target_entries_and_names_the_rest(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    params = init_params(CONFIG, jax.random.key(4))
    checkpointer = Checkpointer(directory)
    checkpointer.save(3, {"actor": params, "critic": {"value_bias": jnp.float32(0.5)}}, {"iteration": 3})
    with caplog.at_level(logging.INFO, logger="rlpa_jax.runtime.checkpoint"):
        step, state, meta, _ = checkpointer.resume({"actor": abstract_like(params)}, partial=True)
    assert step == 3 and meta == {"iteration": 3} and set(state) == {"actor"}
    jax.tree.map(np.testing.assert_array_equal, state["actor"], params)
    assert [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()] == [
        f"checkpoint {directory.absolute()} step 3: its critic not restored (this run's state has none)"]
    with pytest.raises(CheckpointError, match="step 3: "):  # a full restore wants every entry
        checkpointer.resume({"actor": abstract_like(params)})
    checkpointer.save(4, {"actor": params}, {"iteration": 4})  # the manager that restored still saves
