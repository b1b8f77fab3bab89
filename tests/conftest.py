"""Test-wide setup: 8 fake CPU devices, the persistent compilation cache, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens here at import.
"""

import fcntl
import gc
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


# Heavy test files take turns, machine-wide (both xdist workers, and a second `make test` beside
# this one), a whole file at a time. Those that start several JAX processes (each with its own XLA
# thread pools and, when paired, collectives that spin while they wait for a peer): two at once on
# the CI machine's 2 cores starved each other's compiles past their 600 s deadlines. Those that hold
# the real 0.5B model (up to 11 GB resident): beside a multi-process test's children and the other
# worker (whose freed memory glibc keeps under make test's tunables) the machine ran out of memory.
HEAVY_TESTS = ("test_multihost.py", "test_multihost_offline.py", "test_multihost_ppo.py", "test_multihost_turn.py",
               "test_eval_multihost.py", "test_real_model.py", "test_real_pipeline.py")


@pytest.fixture(autouse=True, scope="module")
def compiled_programs_released_after_each_file():
    """Each file's compiled programs go when it ends (the persistent cache keeps them on disk): a
    worker that kept every program it ever ran grew to 7 GB, and two `make test` runs side by side
    hold three such workers beside the real-model file."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
    """The heavy files first: under xdist they are one work unit (below), the longest, so it starts
    at once on one worker while the other takes the rest."""
    items.sort(key=lambda item: item.path.name not in HEAVY_TESTS)  # stable: each file keeps its order


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the heavy files as ONE unit: they run one after another on one worker
    and the other worker never sits idle waiting for the lock below (it only waits when a second
    `make test` on the machine holds it)."""
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling  # only under xdist

    class HeavyFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "heavy test files" if Path(file).name in HEAVY_TESTS else file

    config.option.loadscopereorder = False  # units in collection order: the heavy unit first
    return HeavyFilesTogether(config, log)


@pytest.fixture(autouse=True, scope="module")
def heavy_tests_take_turns(request):
    """The lock is held for the whole file: its module fixtures (a loaded model) live that long."""
    if request.node.path.name not in HEAVY_TESTS:
        yield
        return
    lock_path = Path(tempfile.gettempdir()) / f"rlpa-jax-heavy-tests-{os.getuid()}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after the module's last test
        yield
