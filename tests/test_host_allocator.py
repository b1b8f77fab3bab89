"""The CPU launch restart with glibc's allocator tunables (rlpa_jax/runtime/host_allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlpa_jax.runtime import host_allocator

REPO = Path(__file__).resolve().parents[1]


def test_wanted_on_cpu_machines_only_and_never_over_the_users_setting():
    assert host_allocator.wanted({}, has_gpu=False)
    assert host_allocator.wanted({"JAX_PLATFORMS": "cpu"}, has_gpu=True)
    assert not host_allocator.wanted({}, has_gpu=True)
    assert not host_allocator.wanted({"JAX_PLATFORMS": "cuda"}, has_gpu=False)
    assert not host_allocator.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, has_gpu=False)
    assert not host_allocator.wanted({"RLPA_HOST_ALLOCATOR": "default"}, has_gpu=False)


def test_a_script_restarts_once_with_the_tunables_in_the_same_process():
    script = ("import os, sys; from rlpa_jax.runtime import host_allocator; print('start', os.getpid(), flush=True); "
              "host_allocator.ensure(); print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RLPA_HOST_ALLOCATOR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, "an-argument"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")  # timeout: a hang guard (two bare starts)
    starts = [line for line in out if line.startswith("start")]
    runs = [line for line in out if line.startswith("run")]
    assert len(starts) == 2 and len(runs) == 1  # restarted once, ran once
    pid = starts[0].split()[1]
    assert runs[0] == f"run {pid} {host_allocator.TUNABLES} ['an-argument']"
