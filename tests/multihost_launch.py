"""Starting several real processes on this machine for the multi-process tests (jax.distributed
over 127.0.0.1, gloo collectives, 4 fake CPU devices each, or one process with all 8), and reading
back what they wrote.

Every child runs under a deadline and is killed past it, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
# Per multi-process run, hang guards only. Beside other work (load average 7 on 2 cores) the runs of
# tests/test_multihost.py took 10-30 s each; a PPO run, which compiles its sampler, forwards and
# updates, took about 130 s (tests/test_multihost_turn.py: three in 392 s).
DEADLINE_S = 300
PPO_DEADLINE_S = 600
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
    """Wait for every child (killing all of them past the deadline, then failing the test). The
    deadline only guards against a hang: a run that needs it has failed whatever its time."""
    started = time.monotonic()
    results = []
    try:
        for index, child in enumerate(children):
            try:
                child.wait(timeout=max(1.0, deadline_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {index} still running after {deadline_s} s:\n{tail(directory, index)}")
            results.append(Finished(child.returncode, (directory / f"stdout{index}").read_text(),
                                    (directory / f"stderr{index}").read_text(), time.monotonic() - started))
    except BaseException:  # past the deadline, the test's own timeout (pytest-timeout) or ^C: no child outlives it
        for child in children:
            child.kill()
        raise
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


# PPO runs: what their metrics files hold, and what two runs must agree on


def ppo_records(directory: Path, phase: str = "ppo") -> list[dict]:
    records = [json.loads(line) for line in (directory / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("phase") == phase]


# What the run learned and scored (timings, rates and per-process counts differ by nature).
COMPARED = ("reward", "profile_f1", "response_reward", "well_formed", "best_of_n_reward", "response_tokens",
            "samples", "invalid_samples", "revealed_items", "kl", "logprob_gap", "entropy_profile", "entropy_reply",
            "kl_coef", "output_scale")


def assert_same_ppo_metrics(expected: list[dict], got: list[dict], extra: tuple[str, ...] = ()) -> None:
    for want, have in zip(expected, got):
        loss_keys = [k for k in want if k.startswith(("loss", "grad", "critic"))]
        for key in COMPARED + extra + tuple(loss_keys):
            if key in want:
                assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), (want["step"], key)
