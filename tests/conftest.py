"""Test-wide setup: 8 fake CPU devices, the persistent compilation cache, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens here at import.
"""

import fcntl
import os
import tempfile
from pathlib import Path

# 8 fake devices share the CI machine's 2 cores with a second test worker: a collective's threads
# can wait long for a core, and XLA:CPU aborts the whole process when one waits past its
# terminate timeout (seen in CI inside the 8-device update test). Slow is fine here; aborting is not.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
                                   "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def aloe_dir() -> Path:
    """The shared ALOE persona pool (never copied into the repo); tests skip when it is absent."""
    path = REPO.parent / "shared" / "data" / "aloe"
    if not path.is_dir():
        pytest.skip(f"ALOE data not found at {path}")
    return path


# Test files that start several JAX processes (each with its own XLA thread pools and, when paired,
# collectives that spin while they wait for a peer). Two such tests at once on the CI machine's 2
# cores, one per xdist worker, starved each other's compiles for minutes (a 1-process 8-device run
# compiling one small program past its 600 s deadline, twice in one fresh-clone run): they take turns.
MULTI_PROCESS_TESTS = ("test_multihost.py", "test_multihost_offline.py", "test_multihost_ppo.py",
                       "test_multihost_turn.py", "test_eval_multihost.py")


@pytest.fixture(autouse=True)
def one_multi_process_test_at_a_time(request):
    if request.node.path.name not in MULTI_PROCESS_TESTS:
        yield
        return
    # One lock for the machine: both xdist workers, and a second `make test` running beside this one.
    lock_path = Path(tempfile.gettempdir()) / f"rlpa-jax-multi-process-tests-{os.getuid()}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after the test
        yield
