"""Several real processes on this machine (jax.distributed over 127.0.0.1, gloo collectives, 4 fake
CPU devices each): the global batch built from each process's rows, metric reduction, the start-up
agreement, a peer that dies, an orbax checkpoint written and read by two processes, and PPO (with
its SFT warm start), launch/sft.py, dpo.py and export_hf.py as two processes against one.

Every child runs under a deadline and is killed past it, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file

import multihost_worker as worker
from rlpa_jax import build, multihost, parallel
from rlpa_jax.checkpoint import export_checkpoint
from rlpa_jax.dialogue.llm_cache import ResponseCache
from rlpa_jax.model import hf

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 150  # per multi-process run; they take seconds, minutes only on a starved machine
PPO_DEADLINE_S = 600  # a PPO run compiles its sampler, forwards and updates (minutes on 2 busy cores)
CHILD_XLA_FLAGS = ("--xla_force_host_platform_device_count=4 --xla_cpu_collective_call_terminate_timeout_seconds=1800 "
                   "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(process: int, processes: int, port: int, extra: dict | None = None) -> dict:
    """The test process's environment (conftest set 8 devices for it) with each child's own; one
    process alone (the reference run) gets all 8 devices and no coordinator."""
    env = dict(os.environ)
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    flags = CHILD_XLA_FLAGS if processes > 1 else CHILD_XLA_FLAGS.replace("device_count=4", "device_count=8")
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
               RLPA_DISTRIBUTED_INIT_TIMEOUT_S="60",
               JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"), TOKENIZERS_PARALLELISM="false")
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(process))
    env.update(extra or {})
    return env


def start_processes(argv: Callable[[int], list[str]], directory: Path, processes: int = 2,
                    extra_env: dict | None = None) -> list[subprocess.Popen]:
    """`processes` python children joined on a free 127.0.0.1 port; output goes to files (a pipe
    nobody reads could block a child)."""
    port = free_port()
    children = []
    for process in range(processes):
        out = open(directory / f"stdout{process}", "w")
        err = open(directory / f"stderr{process}", "w")
        children.append(subprocess.Popen([sys.executable, *argv(process)], cwd=directory, stdout=out, stderr=err,
                                         env=child_environment(process, processes, port, extra_env)))
    return children


def finish(children: list[subprocess.Popen], directory: Path, deadline_s: float = DEADLINE_S) -> list[Finished]:
    """Wait for every child (killing all of them past the deadline, then failing the test)."""
    started = time.monotonic()
    results = []
    for index, child in enumerate(children):
        try:
            child.wait(timeout=max(1.0, deadline_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
            pytest.fail(f"process {index} still running after {deadline_s} s:\n{tail(directory, index)}")
        results.append(Finished(child.returncode, (directory / f"stdout{index}").read_text(),
                                (directory / f"stderr{index}").read_text(), time.monotonic() - started))
    return results


def tail(directory: Path, index: int, lines: int = 30) -> str:
    text = "\n".join(p.read_text() for p in (directory / f"stdout{index}", directory / f"stderr{index}") if p.exists())
    return "\n".join([line for line in text.splitlines() if "[Gloo]" not in line][-lines:])


def start_worker(scenario: str, directory: Path, processes: int = 2, args: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    directory.mkdir(parents=True, exist_ok=True)
    return start_processes(lambda _: [str(REPO / "tests" / "multihost_worker.py"), scenario, str(directory), *args],
                           directory, processes)


def worker_results(children: list[subprocess.Popen], scenario: str, directory: Path,
                   deadline_s: float = DEADLINE_S) -> list[dict]:
    """What each process of a started worker wrote, once all exited 0."""
    results = finish(children, directory, deadline_s)
    for index, result in enumerate(results):
        assert result.returncode == 0, f"process {index} of {scenario}:\n{tail(directory, index)}"
    return [json.loads((directory / f"process{i}.json").read_text()) for i in range(len(children))]


def run_worker(scenario: str, directory: Path, processes: int = 2, args: tuple[str, ...] = (),
               deadline_s: float = DEADLINE_S) -> list[dict]:
    return worker_results(start_worker(scenario, directory, processes, args), scenario, directory, deadline_s)


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
    expected = dict(hf.hf_tensors(worker.params_on(parallel.make_mesh(worker.MESH)), worker.MODEL))
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(exported[name], tensor)


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


def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout(tmp_path):
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
        killed = time.monotonic()
        survivor = finish(children[:1], tmp_path, deadline_s=60)[0]
        waited = time.monotonic() - killed
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert survivor.returncode != 0
    assert waited < 60  # ~heartbeat_s on an idle machine
    assert "another task died" in survivor.stderr or "heartbeat" in survivor.stderr, tail(tmp_path, 0)


# ---------------------------------------------------------------------------------------------
# PPO over two processes


def ppo_records(directory: Path, phase: str = "ppo") -> list[dict]:
    records = [json.loads(line) for line in (directory / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("phase") == phase]


# What the run learned and scored (timings, rates and per-process counts differ by nature).
COMPARED = ("reward", "profile_f1", "response_reward", "well_formed", "best_of_n_reward", "response_tokens",
            "samples", "invalid_samples", "revealed_items", "kl", "logprob_gap", "entropy_profile", "entropy_reply",
            "kl_coef", "output_scale")


def test_ppo_over_two_processes_equals_one_process_and_resumes(tmp_path):
    tokenizer = f"model.tokenizer_path={tmp_path / 'tokenizer'}"
    alone_dir, pair_dir = tmp_path / "alone", tmp_path / "pair"
    (alone,) = run_worker("ppo", alone_dir, processes=1, args=(f"output_dir={alone_dir / 'runs'}", tokenizer),
                          deadline_s=PPO_DEADLINE_S)
    first, second = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer),
                               deadline_s=PPO_DEADLINE_S)

    # The in-run SFT warm start (the same entry point as launch/sft.py) ran as two processes too.
    warm_expected, warm_got = ppo_records(alone_dir, "sft"), ppo_records(pair_dir, "sft")
    assert [r["step"] for r in warm_got] == [r["step"] for r in warm_expected] == [1, 2]
    for want, have in zip(warm_expected, warm_got):
        for key in ("loss", "grad_norm", "tokens"):
            assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), ("sft", key)

    expected, got = ppo_records(alone_dir), ppo_records(pair_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1]
    assert all(r["grad_norm"] > 0 for r in expected) and expected[1]["kl"] > 0  # the runs learned something
    for want, have in zip(expected, got):
        loss_keys = [k for k in want if k.startswith(("loss", "grad", "critic"))]
        for key in COMPARED + tuple(loss_keys):
            if key in want:
                assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), key
    for stage in ("start", "end"):
        for key, value in alone["summary"][stage].items():
            assert first["summary"][stage][key] == pytest.approx(value, abs=1e-5), (stage, key)
    reference = np.load(alone_dir / "actor.npz")
    pair = np.load(pair_dir / "actor.npz")
    assert sorted(reference.files) == sorted(pair.files)
    for name in reference.files:
        np.testing.assert_allclose(pair[name], reference[name], atol=1e-5)

    # Each process played its own 4 conversations of each group of 8: judged and answered only
    # those, and between them every conversation once per turn (2 groups x 2 turns a rollout).
    for result in (first, second):
        assert result["shares"] == [8.0, 8.0]
    ppo_calls = slice(2 * 2, 2 * 2 + 2 * 2 * 2)  # after the starting evaluation's calls
    for turn_calls in zip(first["scored"][ppo_calls], second["scored"][ppo_calls]):
        mine, theirs = map(set, turn_calls)
        assert len(mine) == len(theirs) == 4 and not mine & theirs
    assert alone["shares"] == [None, None]

    # A checkpoint the two wrote resumes in two processes (one more iteration on top).
    resumed, _ = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer, "ppo.iterations=3",
                                                    "--resume"), deadline_s=PPO_DEADLINE_S)
    assert [r["step"] for r in ppo_records(pair_dir)] == [0, 1, 2]
    assert resumed["shares"] == [8.0]


# ---------------------------------------------------------------------------------------------
# SFT, DPO and the HF export over two processes


def history(directory: Path, job: str) -> list[dict]:
    return [json.loads(line) for line in (directory / "runs" / "tiny" / f"{job}_history.jsonl").read_text().splitlines()]


# What each step learned (DPO's reward accuracy is left out: it counts margins that may be 0 +- 1e-7).
OFFLINE_COMPARED = {"sft": ("loss", "grad_norm", "tokens"), "dpo": ("loss", "grad_norm", "reward_margin")}


def test_sft_dpo_and_export_over_two_processes_equal_one_process(tmp_path):
    """launch/sft.py, launch/dpo.py --init <that SFT checkpoint> and launch/export_hf.py of the DPO
    checkpoint, each as two processes, against the same scripts as one process on 8 devices."""
    alone_dir, pair_dir = tmp_path / "alone", tmp_path / "pair"
    tokenizer = f"model.tokenizer_path={tmp_path / 'tokenizer'}"
    # Trained here once, so that the two runs (started together) read one tokenizer.
    build.build_tokenizer(build.load_config(REPO / "configs" / "tiny.yaml", worker.OFFLINE_OVERRIDES + [tokenizer]))
    alone = start_worker("offline", alone_dir, processes=1, args=(f"output_dir={alone_dir / 'runs'}", tokenizer))
    pair = start_worker("offline", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer))
    (alone_result,) = worker_results(alone, "offline", alone_dir, deadline_s=PPO_DEADLINE_S)
    pair_results = worker_results(pair, "offline", pair_dir, deadline_s=PPO_DEADLINE_S)
    for result in (alone_result, *pair_results):
        assert result["statuses"] == {"sft": 0, "dpo": 0, "export": 0}

    for job, keys in OFFLINE_COMPARED.items():
        expected, got = history(alone_dir, job), history(pair_dir, job)
        assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
        for want, have in zip(expected, got):
            for key in keys:
                assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), (job, want["step"], key)
    assert history(alone_dir, "dpo")[-1]["loss"] < history(alone_dir, "dpo")[0]["loss"]  # DPO learned something
    reference, restored = np.load(alone_dir / "sft_actor.npz"), np.load(pair_dir / "sft_actor.npz")
    assert sorted(reference.files) == sorted(restored.files)
    for name in reference.files:
        np.testing.assert_allclose(restored[name], reference[name], atol=1e-5)

    # The export of the checkpoint the two processes wrote: equal to the one-process run's, and
    # exactly what one process exports from that same checkpoint; printed by process 0 only.
    exported = load_file(str(pair_dir / "hf" / "model.safetensors"))
    expected = load_file(str(alone_dir / "hf" / "model.safetensors"))
    here = load_file(str(export_checkpoint(pair_dir / "runs" / "tiny" / "dpo", tmp_path / "hf") / "model.safetensors"))
    assert sorted(exported) == sorted(expected) == sorted(here)
    for name, tensor in expected.items():
        np.testing.assert_allclose(exported[name], tensor, atol=1e-5)
        np.testing.assert_array_equal(exported[name], here[name])
    stdouts = [(pair_dir / f"stdout{i}").read_text() for i in range(2)]
    assert "exported to" in stdouts[0] and "exported to" not in stdouts[1]
