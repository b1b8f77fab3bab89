"""Resuming tells damage from trouble: a step whose read fails with damage is moved aside and an
older one used (tests/test_checkpoint.py makes each kind of damage for real); any other failure
(EIO, a permission, memory, an unknown error) stops with CheckpointReadError and renames nothing.

The classification is checked on the exceptions orbax 0.12.8 and tensorstore raised for real damage
and for real permission problems (their texts are copied from runs, paths shortened). The injected
errors are raised where orbax reads: etils' epath open (JSON files) and tensorstore.open (arrays);
the permission problems are real, in a child process running as user nobody (root reads anything).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest
import tensorstore
from etils import epath
from test_checkpoint import assert_state_equal, damage, saved_steps

from rlpa_jax.runtime.checkpoint import Checkpointer, CheckpointError, CheckpointReadError, abstract_like
from rlpa_jax.runtime.read_failures import DAMAGED, READ, TROUBLE, classify_read_failure, combine_outcomes

REPO = Path(__file__).resolve().parents[1]
DATA = '"actor.layers.attn.o_kernel/0.0.0.0" in OCDBT database at local file "/r/ckpt/2/state/"'
ARRAY_INDEX = ("Encountered error while reading array index: (slice(0, 2, 1), slice(0, 64, 1)). See full "
               "TensorStore details: <bound method spec of TensorStore({")


def chained(*errors: BaseException) -> BaseException:
    """errors[0] raised from errors[1], raised from errors[2] ..., as orbax chains them."""
    for outer, inner in zip(errors, errors[1:]):
        outer.__cause__ = inner
    return errors[0]


DAMAGE = {
    "array data cut short": chained(Exception(ARRAY_INDEX), ValueError(
        f"OUT_OF_RANGE: Error reading {DATA}: Requested byte range [227590, 257931) is not valid for value of size "
        "136932")),
    "array data deleted": chained(Exception(ARRAY_INDEX), ValueError(
        f"FAILED_PRECONDITION: Error reading {DATA}: Truncated Zstd-compressed stream; at byte 0")),
    "OCDBT manifest deleted": ValueError(
        'NOT_FOUND: Error opening "zarr" driver: Metadata at "actor.embed/.zarray" in OCDBT database at local file '
        '"/r/ckpt/2/state/" does not exist [tensorstore_spec=\'{"context":{}}\']'),
    "OCDBT manifest cut short": ValueError(
        'DATA_LOSS: Error opening "zarr" driver: Error reading "actor.embed/.zarray" in OCDBT database at local file '
        '"/r/ckpt/2/state/": Error decoding local file "/r/ckpt/2/state/manifest.ocdbt": Error decoding manifest: '
        "Length in header (115) does not match actual length (57); at byte 12"),
    "state metadata deleted": FileNotFoundError("Metadata file (named _METADATA) does not exist at /r/ckpt/2/state."),
    "meta document deleted": FileNotFoundError("File /r/ckpt/2/meta/metadata not found."),
    "a file missing (OS error)": FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/ckpt/2/meta"),
    "meta document torn": json.JSONDecodeError("Unterminated string starting at", '{"iteration', 1),
    "meta document empty": chained(json.JSONDecodeError("Expecting value", "", 0), StopIteration(0)),
    "meta document no UTF-8": UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte"),
    "item directory deleted": KeyError("Item \"meta\" was not found in the checkpoint. Available items: ['state']"),
    "shape unlike the target's": ValueError(
        "Requested shape: (3, 64, 2, 16) is not compatible with the stored shape: (2, 64, 2, 16). Truncating/padding "
        "is disabled."),
    "tree unlike the target's": ValueError(
        "User-provided restore item and on-disk value metadata tree structures do not match: {'critic': ...}"),
}

TROUBLE_SEEN = {
    "EIO": OSError(errno.EIO, "Input/output error", "/r/ckpt/2/meta/metadata"),
    "JSON file may not be read": PermissionError(errno.EACCES, "Permission denied", "/r/ckpt/2/state/_METADATA"),
    "out of memory (OS)": OSError(errno.ENOMEM, "Cannot allocate memory"),
    "out of memory": MemoryError(),
    "Ctrl-C": KeyboardInterrupt(),
    "array file may not be read": chained(Exception(ARRAY_INDEX), ValueError(
        f"PERMISSION_DENIED: Error reading {DATA}: Failed to open: \"/r/ckpt/2/state/ocdbt.process_0/d/721f\": "
        "Permission denied [os_error_code='13']")),
    "symbolic link loop": ValueError(
        f"UNKNOWN: Error reading {DATA}: Failed to open: \"/r/ckpt/2/state/ocdbt.process_0/d/721f\": Too many levels "
        "of symbolic links [os_error_code='40']"),
    "EIO, older tensorstore text": ValueError(
        f"UNAVAILABLE: Error reading {DATA}: Error reading local file: [OS error 5: Input/output error]"),
    "OS error under a damage status": ValueError(
        f"FAILED_PRECONDITION: Error reading {DATA}: Failed to open: Is a directory [os_error_code='21']"),
    "EIO behind a damage error": chained(json.JSONDecodeError("Expecting value", "", 0),
                                         OSError(errno.EIO, "Input/output error")),
    "unknown tensorstore status": ValueError(f"INVALID_ARGUMENT: Error reading {DATA}"),
    "metadata that parses but lacks a key": KeyError("tree_metadata"),
    "an error orbax has no words for": RuntimeError("Event loop is closed"),
    "a ValueError of no known kind": ValueError("Found incomplete checkpoint at /r/ckpt/2."),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damage_is_told_by_the_exception_chain(name):
    assert classify_read_failure(DAMAGE[name]) == DAMAGED


@pytest.mark.parametrize("name", TROUBLE_SEEN)
def test_everything_else_is_trouble(name):
    assert classify_read_failure(TROUBLE_SEEN[name]) == TROUBLE


def test_a_chain_that_loops_is_read_once():
    error = ValueError("OUT_OF_RANGE: x")
    error.__context__ = KeyError("y")
    error.__context__.__context__ = error
    assert classify_read_failure(error) == DAMAGED


def test_the_processes_outcomes_combine_to_the_worst():
    assert combine_outcomes([[READ, ""]]) == (READ, "")
    assert combine_outcomes([[DAMAGED, "JSONDecodeError: x"]]) == (DAMAGED, "JSONDecodeError: x")
    assert combine_outcomes([[READ, ""], [READ, ""]]) == (READ, "")
    assert combine_outcomes([[READ, ""], [DAMAGED, "JSONDecodeError: x"]]) == (
        DAMAGED, "process 1: JSONDecodeError: x")
    assert combine_outcomes([[DAMAGED, "a"], [TROUBLE, "OSError: EIO"], [READ, ""]]) == (
        TROUBLE, "process 1: OSError: EIO")
    assert combine_outcomes([[DAMAGED, "a"], [DAMAGED, "b"], [DAMAGED, "c"]]) == (
        DAMAGED, "process 0: a (and 2 more processes)")
    assert combine_outcomes([[TROUBLE, "a"], [TROUBLE, "b"]]) == (TROUBLE, "process 0: a (and 1 more process)")


def test_a_state_unlike_every_step_is_damage_of_each_and_moves_nothing(tmp_path):
    """orbax's shape mismatch counts as damage (the step cannot serve this run); when no step
    reads, the fault may be the state's, and nothing is moved."""
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    wider = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]) if x.ndim else (), x.dtype,
                                                        sharding=x.sharding), abstract_like(states[2]))
    before = listing(directory)
    with pytest.raises(CheckpointError) as stop:
        Checkpointer(directory).restore_latest_readable(wider)
    assert type(stop.value) is CheckpointError
    assert str(stop.value).count("is not compatible with the stored shape") == 2
    assert listing(directory) == before


# ---------------------------------------------------------------------------------------------
# Errors injected where orbax reads: nothing renamed, and the step reads once the fault is gone


def listing(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def fail_json_reads(monkeypatch, step_dir: Path, error: BaseException) -> None:
    """orbax opens JSON files (meta, documents, state/_METADATA) through etils' epath backend."""
    open_file = epath.backend._OsPathBackend.open

    def failing_open(self, path, mode, *args, **kwargs):
        if Path(path).is_relative_to(step_dir):
            raise error
        return open_file(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(epath.backend._OsPathBackend, "open", failing_open)


def fail_array_reads(monkeypatch, step_dir: Path, error: BaseException) -> None:
    """orbax opens every array (and the OCDBT database under it) with tensorstore.open."""
    open_store = tensorstore.open

    def failing_open(spec, *args, **kwargs):
        text = json.dumps(spec.to_json() if hasattr(spec, "to_json") else spec, default=str)
        if f"{step_dir}/" in text:
            raise error
        return open_store(spec, *args, **kwargs)

    monkeypatch.setattr(tensorstore, "open", failing_open)


INJECTED = {
    "EIO reading JSON": (fail_json_reads, OSError(errno.EIO, os.strerror(errno.EIO)), "Input/output error"),
    "permission reading JSON": (fail_json_reads, PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                                "Permission denied"),
    "EIO reading arrays": (fail_array_reads, OSError(errno.EIO, os.strerror(errno.EIO)), "Input/output error"),
    "no memory reading arrays": (fail_array_reads, MemoryError("out of host memory"), "MemoryError"),
}


@pytest.mark.parametrize("name", INJECTED)
def test_a_read_error_that_shows_no_damage_stops_and_renames_nothing(tmp_path, monkeypatch, name):
    inject, error, cause = INJECTED[name]
    directory = tmp_path / "ckpt"
    states = saved_steps(directory)
    before = listing(directory)
    inject(monkeypatch, directory / "2", error)
    with pytest.raises(CheckpointReadError) as stop:
        Checkpointer(directory).restore_latest_readable(None)
    message = str(stop.value)
    assert message.startswith(f"{directory / '2'}: cannot read checkpoint step 2 (") and cause in message
    assert "\n" not in message and "nothing was moved" in message
    assert listing(directory) == before
    monkeypatch.undo()  # the fault passes: the step was good all along
    step, state, _ = Checkpointer(directory).restore_latest_readable(None)
    assert step == 2
    assert_state_equal(state, states[2])


def test_trouble_after_damage_moves_neither(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    saved_steps(directory, steps=(1, 2, 3))
    damage(directory / "3", "truncated array file")
    before = listing(directory)
    fail_json_reads(monkeypatch, directory / "2", OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(CheckpointReadError, match=r"/2: cannot read checkpoint step 2 \(.*the damaged newer step 3 "
                                                  r"stays in place too"):
        Checkpointer(directory, max_to_keep=5).restore_latest_readable(None)
    assert listing(directory) == before


def test_ctrl_c_while_reading_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    saved_steps(directory)
    before = listing(directory)
    fail_array_reads(monkeypatch, directory / "2", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(directory).restore_latest_readable(None)
    assert listing(directory) == before


# ---------------------------------------------------------------------------------------------
# Real permission problems, as user nobody


RESUME = """
import sys
from rlpa_jax.runtime.checkpoint import Checkpointer, CheckpointReadError
from rlpa_jax.runtime.read_failures import classify_read_failure
checkpointer = Checkpointer(sys.argv[1])
try:
    checkpointer.restore(2)
except Exception as error:
    print(f"orbax's error alone: {classify_read_failure(error)}")
try:
    step = checkpointer.restore_latest_readable()[0]
except CheckpointReadError as error:
    print(f"CheckpointReadError: {error}")
else:
    print(f"resumed from step {step}")
"""


def largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("blocked, orbax_alone", [
    (largest_array_file, TROUBLE),  # tensorstore: "PERMISSION_DENIED: ... [os_error_code='13']"
    # orbax's exists() answers False: "_METADATA does not exist", which alone reads as damage
    (lambda step_dir: step_dir / "state", DAMAGED),
], ids=["array file", "state directory"])
def test_a_step_user_nobody_may_not_read_is_not_moved_aside(blocked, orbax_alone):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    # Under /tmp, not pytest's tmp_path: pytest makes its base directory 0700, which nobody cannot search.
    base = Path(tempfile.mkdtemp(prefix="rlpa-resume-eacces-"))
    try:
        base.chmod(0o755)
        directory = base / "ckpt"
        saved_steps(directory)
        for path in [directory, *directory.rglob("*")]:  # nobody's run: it could rename step 2
            os.chown(path, 65534, 65534)
        path = blocked(directory / "2")
        os.chown(path, 0, 0)
        path.chmod(0)  # root reads it anyway; nobody may not
        before = listing(directory)
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                 RESUME, str(directory)], capture_output=True, text=True, timeout=300, cwd="/",
                                env=os.environ | {"PYTHONPATH": str(REPO), "MPLCONFIGDIR": "/tmp"})
        after = listing(directory)
    finally:
        shutil.rmtree(base)
    if "setpriv:" in result.stderr:
        pytest.skip(f"cannot switch to user nobody: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    alone, line = result.stdout.strip().splitlines()
    assert alone == f"orbax's error alone: {orbax_alone}"
    assert line.startswith(f"CheckpointReadError: {directory / '2'}: cannot read checkpoint step 2 (PermissionError: "
                           f"[Errno 13] Permission denied: '{path}' (where orbax saw "), line
    assert after == before
