"""No test can hang the run: pyproject's per-test time limits, as `make test` runs them (xdist).

pytest runs in a child on a small test file with this project's pytest settings, only the two
limits shrunk to seconds: a test past `timeout` fails alone and the next test runs; a test stuck
where Python's signal handler never runs (SIGALRM blocked here, as in C code that never returns
to the interpreter) is ended at `faulthandler_timeout` with every thread's stack, its worker
reported crashed, and the run stops instead of waiting forever.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S, STOP_S = 2, 6
# Each child run takes ~STOP_S plus pytest's start-up; this only guards against a hang.
HANG_GUARD_S = 300

SLEEPS_PAST_ITS_TIMEOUT = """
import time

def test_sleeps_past_its_timeout():
    time.sleep(600)

def test_runs_after_the_timeout():
    pass
"""

STUCK_OUT_OF_PYTHONS_REACH = """
import signal
import time

def test_stuck_where_no_python_signal_handler_runs():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(600)

def test_never_reached():
    pass
"""


def run_pytest(directory: Path, name: str, source: str) -> subprocess.CompletedProcess:
    """pytest -n 1 (one xdist worker, as make test's) on `source` with pyproject's settings."""
    (directory / name).write_text(source)
    command = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(directory),
               "-p", "no:cacheprovider", "-n", "1", "--max-worker-restart", "0", "-v",
               "-o", f"timeout={TIMEOUT_S}", "-o", f"faulthandler_timeout={STOP_S}", name]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)


def test_a_test_past_its_timeout_fails_alone_and_the_next_one_runs(tmp_path):
    result = run_pytest(tmp_path, "test_sleeper.py", SLEEPS_PAST_ITS_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"Failed: Timeout (>{TIMEOUT_S:.1f}s) from pytest-timeout." in output
    assert "1 failed, 1 passed" in output and "crashed" not in output


def test_a_test_stuck_out_of_pythons_reach_ends_the_run_with_its_stacks(tmp_path):
    result = run_pytest(tmp_path, "test_stuck.py", STUCK_OUT_OF_PYTHONS_REACH)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    stuck = "test_stuck.py::test_stuck_where_no_python_signal_handler_runs"
    assert f"worker 'gw0' crashed while running '{stuck}'" in output
    assert f"Timeout (0:00:0{STOP_S})!" in output and "in test_stuck_where_no_python_signal_handler_runs" in output
    assert "test_never_reached PASSED" not in output
