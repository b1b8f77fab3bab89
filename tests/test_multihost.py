"""Several real processes on this machine (tests/multihost_launch.py): the global batch built from
each process's rows, metric reduction, the start-up agreement, a peer that dies, and an orbax
checkpoint written and read by two processes (with the HF export). The long runs of whole jobs as
two processes against one live in test_multihost_ppo.py, _turn.py and _offline.py (one file each,
so the test workers share them out).
"""

from __future__ import annotations

import signal
import time

import multihost_worker as worker
import numpy as np
import pytest
from multihost_launch import DEADLINE_S, REPO, finish, run_worker, start_processes, tail, worker_results
from safetensors.numpy import load_file

from rlpa_jax.dialogue.llm.cache import ResponseCache
from rlpa_jax.runtime import hf_export, multihost, parallel

# ---------------------------------------------------------------------------------------------
# One process: the launch environment and the cache files


def test_launch_is_read_from_the_environment():
    assert parallel.distributed_launch({}) is None
    launch = parallel.distributed_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                                          "JAX_PROCESS_ID": "1", "RLPA_DISTRIBUTED_HEARTBEAT_TIMEOUT_S": "20"})
    assert (launch.launcher, launch.coordinator_address, launch.num_processes, launch.process_id,
            launch.heartbeat_timeout_s) == ("env", "10.0.0.1:1234", 2, 1, 20)
    slurm = parallel.distributed_launch({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"})
    assert (slurm.launcher, slurm.coordinator_address, slurm.num_processes) == ("slurm", None, None)
    assert parallel.distributed_launch({"OMPI_COMM_WORLD_SIZE": "4"}).launcher == "openmpi"
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        parallel.distributed_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"):
        parallel.distributed_launch({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="RLPA_DISTRIBUTED_HEARTBEAT_TIMEOUT_S='soon': expected an integer"):
        parallel.distributed_launch({"RLPA_DISTRIBUTED_HEARTBEAT_TIMEOUT_S": "soon"})


def test_each_process_writes_its_own_cache_file_and_reads_them_all(tmp_path):
    path = tmp_path / "llm_cache.jsonl"
    ResponseCache(path, process=0, processes=1).put("single", "from a one-process run")
    first, second = ResponseCache(path, process=0, processes=2), ResponseCache(path, process=1, processes=2)
    first.put("a", "answer of process 0")
    second.put("b", "answer of process 1")
    assert (first.path.name, second.path.name) == ("llm_cache.process0.jsonl", "llm_cache.process1.jsonl")
    assert len(path.read_text().splitlines()) == 1  # the shared file is only read by several processes
    (tmp_path / "llm_cache.process1.jsonl").open("a").write('{"key": "torn", "cont')  # a writer mid-line
    later = ResponseCache(path, process=0, processes=1)
    assert (later.get("single"), later.get("a"), later.get("b"), later.get("torn")) == (
        "from a one-process run", "answer of process 0", "answer of process 1", None)


def test_agreement_names_the_differing_keys():
    every = [{"config": {"ppo": {"actor_lr": 3e-5, "epochs": 1}}, "devices": {"local_devices": 8}},
             {"config": {"ppo": {"actor_lr": 1e-6, "epochs": 1}}, "devices": {"local_devices": 8}},
             {"config": {"ppo": {"actor_lr": 3e-5, "epochs": 1}}, "devices": {"local_devices": 4}}]
    lines = multihost.describe_differences(every)
    assert lines[0].startswith("process 1's config differs at ppo.actor_lr: 1e-06 (process 0: 3e-05)")
    assert lines[1].startswith("process 2's devices differs at local_devices: 4 (process 0: 8)")


# ---------------------------------------------------------------------------------------------
# Two processes


def test_global_batch_from_process_rows_equals_one_process(tmp_path):
    first, second = run_worker("arrays", tmp_path)
    alone = worker.run_program(parallel.make_mesh(worker.MESH))  # this process: 8 devices, one process
    assert sorted(first["rows"] + second["rows"]) == list(range(worker.ROWS))
    for result in (first, second):
        np.testing.assert_allclose(result["hidden"], alone["hidden"], atol=1e-5)
        np.testing.assert_allclose(result["local_hidden"], np.asarray(alone["hidden"])[result["rows"]], atol=1e-5)
        assert result["total"] == pytest.approx(alone["total"], abs=1e-5)
        assert "multihost.local_rows" in result["fetch_error"]  # device_get's guard, not JAX's bare error
        assert result["max"] == [4, 10]
        # Rewards 0 (1 sample) and 1, 1 (2 samples): the mean over all 3; invalid counts summed.
        assert result["metrics"] == {"reward": pytest.approx(2 / 3), "invalid_samples": 1.0}
        assert result["records"] == [{"phase": "ppo", "step": 0, "reward": pytest.approx(2 / 3)}]
        assert result["agreement_error"] == "process 1: ppo.clip_eps: expected a number > 0"
        assert result["verdicts"] == [0, 10, 20, 30, 40, 50, 60]  # in request order, from both processes
    assert (first["judged_here"], second["judged_here"]) == ([0, 2, 4, 6], [1, 3, 5])
    assert alone["fetch_error"] is None
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # process 0 alone writes


def test_checkpoint_written_by_two_processes_restores_in_two(tmp_path):
    (saved, _), (restored, other) = run_worker("save", tmp_path), run_worker("restore", tmp_path)
    assert saved["saved"]
    for result in (restored, other):
        assert (result["step"], result["meta"]) == (1, {"iteration": 1, "processes": 2})
        assert result["equal"] and result["same_sharding"]
    # The HF export gathered every shard from both processes; process 0 wrote it once.
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = dict(hf_export.hf_tensors(worker.params_on(parallel.make_mesh(worker.MESH)), worker.MODEL))
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(exported[name], tensor)


def checkpoint_files(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def resume_with_step_2_failing_on_process_1(tmp_path, how: str) -> list[dict]:
    """Two processes resume from steps 1 and 2 (saved by two), process 1 alone failing to read step
    2's files (tests/multihost_worker.py READ_FAILURE: the run directory is shared, so real damage
    is seen by every process)."""
    children = start_processes(lambda _: [str(REPO / "tests" / "multihost_worker.py"), "resume", str(tmp_path)],
                               tmp_path, extra_env={worker.READ_FAILURE: f"1:{how}"})
    return worker_results(children, "resume", tmp_path)


def test_a_step_damaged_for_one_process_is_skipped_by_both(tmp_path):
    run_worker("save_steps", tmp_path)
    for result in resume_with_step_2_failing_on_process_1(tmp_path, "torn"):
        assert result["error"] is None, result["error"]
        assert (result["step"], result["meta"], result["step_scale"]) == (1, {"iteration": 1}, 1.0)
        assert result["actor_equal"] and result["listing"] == ["1", "2.corrupt"]
    # Process 0 read step 2 whole; it went back to step 1 with process 1, and says why.
    assert "step 2 cannot be read (process 1: JSONDecodeError" in (tmp_path / "stderr0").read_text()


def test_a_step_one_process_cannot_read_stops_both_and_moves_nothing(tmp_path):
    run_worker("save_steps", tmp_path)
    before = checkpoint_files(tmp_path / "checkpoints")
    first, second = resume_with_step_2_failing_on_process_1(tmp_path, "eio")
    assert first["error"] == second["error"] and first["error_type"] == second["error_type"] == "CheckpointReadError"
    assert first["error"].startswith(f"{tmp_path / 'checkpoints' / '2'}: ") and "\n" not in first["error"]
    assert "process 1: OSError: [Errno 5] Input/output error" in first["error"]
    assert checkpoint_files(tmp_path / "checkpoints") == before


def test_processes_that_list_different_steps_stop_before_reading(tmp_path):
    run_worker("save_steps", tmp_path)
    before = checkpoint_files(tmp_path / "checkpoints")
    first, second = resume_with_step_2_failing_on_process_1(tmp_path, "unlisted")
    assert first["error"] == second["error"] and first["error_type"] == "CheckpointReadError"
    assert first["error"].startswith(f"{tmp_path / 'checkpoints'}: the processes list different checkpoint steps "
                                     "(process 0: [2, 1]; process 1: [1]); nothing was moved")
    assert checkpoint_files(tmp_path / "checkpoints") == before


def test_processes_that_disagree_on_the_config_all_stop_with_one_message(tmp_path):
    def argv(process: int) -> list[str]:
        lr = "3e-5" if process == 0 else "1e-6"
        return [str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"), f"ppo.actor_lr={lr}",
                f"output_dir={tmp_path / 'runs'}"]

    results = finish(start_processes(argv, tmp_path), tmp_path)
    for index, result in enumerate(results):
        assert result.returncode == 2, tail(tmp_path, index)
        assert "process 1's config differs at ppo.actor_lr: 1e-06 (process 0: 3e-05)" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_killed_process_stops_the_other_through_the_heartbeat(tmp_path):
    heartbeat_s = 5
    children = start_processes(lambda _: [str(REPO / "tests" / "multihost_worker.py"), "wait", str(tmp_path)], tmp_path,
                               extra_env={"RLPA_DISTRIBUTED_HEARTBEAT_TIMEOUT_S": str(heartbeat_s)})
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(child.poll() is None for child in children), tail(tmp_path, 0) + tail(tmp_path, 1)
            assert time.monotonic() < deadline, "the processes never met"
            time.sleep(0.2)
        time.sleep(1.0)  # both in the loop of collectives
        children[1].send_signal(signal.SIGKILL)
        # It stops by itself, ~heartbeat_s later on an idle machine; the deadline only guards against
        # it never noticing (collectives would wait for the dead peer for XLA's 30-minute timeout).
        survivor = finish(children[:1], tmp_path)[0]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert survivor.returncode != 0
    assert "another task died" in survivor.stderr or "heartbeat" in survivor.stderr, tail(tmp_path, 0)
