"""File-system errors the user can fix end in one line on stderr and status 1; bugs keep their traceback.

The errors are real where this machine can make them: a path through a regular file (ENOTDIR), a
directory opened as a file (EISDIR), a missing parent (ENOENT), a hard link to a directory (EPERM, even
for root), a read-only and a full tmpfs mounted in a private mount namespace (`unshare -m`, so nothing
leaks into the machine's mounts), and a write into a directory without write permission (EACCES; a
child run as root becomes user nobody first, since root ignores permission bits).
Only EDQUOT is raised by hand: no file system here has quotas. Cases the machine cannot make skip.
"""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rlpa_jax.app import cli

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
sys.path.insert(0, {repo!r})
from rlpa_jax.app import cli
{before}
with cli.exit_on_os_error("train.py"):
{body}
"""
# Child processes import jax and the whole package: minutes at most on a loaded machine; this
# only guards against a hang.
CHILD_HANG_GUARD_S = 300


def child_code(body: str, before: str = "") -> str:
    """A child that imports cli, runs `before`, then `body` inside exit_on_os_error."""
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    return CHILD.format(repo=str(REPO), before=before, body=indented)


def one_line_exit(capsys, block) -> str:
    """Runs `block` inside exit_on_os_error; returns the one stderr line after checking status 1."""
    with pytest.raises(SystemExit) as stop:
        with cli.exit_on_os_error("train.py"):
            block()
    assert stop.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Errors made in this process


def test_a_path_through_a_regular_file(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a directory")
    line = one_line_exit(capsys, lambda: cli.check_writable(tmp_path / "runs" / "x" / "checkpoints"))
    assert line.startswith(f"train.py: cannot use {tmp_path / 'runs' / 'x'}")
    assert line.endswith(": Not a directory (errno 20, ENOTDIR)")


def test_a_directory_where_a_file_should_be(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").mkdir()
    line = one_line_exit(capsys, lambda: open(tmp_path / "metrics.jsonl", "w"))
    assert line == f"train.py: cannot use {tmp_path / 'metrics.jsonl'}: Is a directory (errno 21, EISDIR)"


def test_a_missing_parent_directory(tmp_path, capsys):
    line = one_line_exit(capsys, lambda: open(tmp_path / "nowhere" / "metrics.jsonl", "w"))
    assert line == (f"train.py: cannot access {tmp_path / 'nowhere' / 'metrics.jsonl'}: "
                    "No such file or directory (errno 2, ENOENT)")


def test_an_operation_not_permitted_names_both_paths(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    line = one_line_exit(capsys, lambda: os.link(tmp_path / "run", tmp_path / "alias"))  # EPERM, root or not
    assert line == (f"train.py: cannot access {tmp_path / 'run'} -> {tmp_path / 'alias'}: "
                    "Operation not permitted (errno 1, EPERM)")


def test_a_quota_exceeded(tmp_path, capsys):
    # Raised by hand: no file system on this machine has quotas. It checks the wording only.
    path = tmp_path / "checkpoints" / "4"

    def write():
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))

    line = one_line_exit(capsys, write)
    assert line == f"train.py: cannot write {path}: Disk quota exceeded (errno 122, EDQUOT)"


def test_not_enough_free_space_is_named_before_anything_is_written(tmp_path, capsys):
    disk = shutil.disk_usage(tmp_path)
    needed = disk.total + 1
    with pytest.raises(cli.NotEnoughSpaceError) as error:
        cli.check_writable(tmp_path / "run", needed_bytes=needed)
    assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
    assert error.value.filename == str(tmp_path / "run") and error.value.needed_bytes == needed
    assert error.value.free_bytes <= disk.total
    line = one_line_exit(capsys, lambda: cli.check_writable(tmp_path / "run", needed_bytes=needed))
    assert line.startswith(f"train.py: cannot write {tmp_path / 'run'}: not enough free space: {needed:,} bytes (")
    assert " needed, " in line and " free (errno 28, ENOSPC)" in line


def test_a_writable_directory_passes_and_keeps_no_probe(tmp_path):
    assert cli.check_writable(tmp_path / "runs" / "x", needed_bytes=1) == tmp_path / "runs" / "x"
    assert list((tmp_path / "runs" / "x").iterdir()) == []


def test_an_error_raised_from_an_os_error_is_explained_too(tmp_path, capsys):
    """Libraries that wrap the OSError (`raise SaveError(...) from error`) still get one line."""
    path = tmp_path / "checkpoints" / "4"

    def save():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError as error:
            raise RuntimeError("checkpoint save failed") from error

    line = one_line_exit(capsys, save)
    assert line == f"train.py: cannot write {path}: No space left on device (errno 28, ENOSPC)"


# ---------------------------------------------------------------------------------------------
# Programming errors keep their traceback


def test_other_exceptions_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError, match="actor"):
        with cli.exit_on_os_error("train.py"):
            {}["actor"]
    with pytest.raises(ConnectionRefusedError):  # an OSError, but not one the user fixes on disk
        with cli.exit_on_os_error("train.py"):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(NameError):  # a bug while handling a user's OSError is still a bug
        with cli.exit_on_os_error("train.py"):
            try:
                open(tmp_path / "nowhere" / "file")
            except FileNotFoundError:
                undefined_name  # noqa: F821, B018


def test_a_bug_prints_its_traceback():
    result = subprocess.run([sys.executable, "-c", child_code("1 / 0")], capture_output=True, text=True,
                            timeout=CHILD_HANG_GUARD_S)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError" in result.stderr


# ---------------------------------------------------------------------------------------------
# Read-only and full file systems, and a user without permission, in child processes


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory):
    """Skips unless this process may mount a tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = tmp_path_factory.mktemp("mount-probe")
    result = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {result.stderr.strip()}")


def run_on_tmpfs(mountpoint: Path, options: str, body: str, before: str = "") -> subprocess.CompletedProcess:
    """`body` (inside exit_on_os_error) in a child that sees a 64 KiB tmpfs at `mountpoint`."""
    mountpoint.mkdir()
    shell = (f"mount -t tmpfs -o size=64k,{options} tmpfs '{mountpoint}' || exit 99; {before} "
             f"exec '{sys.executable}' -c \"$CHILD_CODE\"")
    return subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True,
                          timeout=CHILD_HANG_GUARD_S, env={**os.environ, "CHILD_CODE": child_code(body)})


def test_a_read_only_file_system(tmp_path, private_mounts):
    disk = tmp_path / "disk"
    result = run_on_tmpfs(disk, "ro", f"cli.check_writable({str(disk / 'runs' / 'x')!r})")
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"train.py: cannot write {disk / 'runs'}: Read-only file system (errno 30, EROFS)\n"


def test_a_full_file_system(tmp_path, private_mounts):
    disk = tmp_path / "disk"
    fill = f"dd if=/dev/zero of='{disk}/filler' bs=4k count=64 2>/dev/null;"
    result = run_on_tmpfs(disk, "rw", f"cli.check_writable({str(disk / 'runs' / 'x')!r})", before=fill)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"train.py: cannot write {disk / 'runs'}")
    assert lines[0].endswith(": No space left on device (errno 28, ENOSPC)")


def test_a_full_file_system_hit_by_a_plain_write(tmp_path, private_mounts):
    """Python's buffered writes report ENOSPC without the path: the line says so instead of guessing."""
    disk = tmp_path / "disk"
    body = f"with open({str(disk / 'state.bin')!r}, 'wb') as f:\n    f.write(bytes(1 << 20))"
    result = run_on_tmpfs(disk, "rw", body)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ("train.py: cannot write a file (the operating system did not say which): "
                             "No space left on device (errno 28, ENOSPC)\n")


# Root ignores permission bits, so a child running as root becomes user nobody, after its imports:
# nobody needs no access to the checkout (a fresh clone may sit under a mode-700 directory).
AS_NOBODY = """
import os
try:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
except PermissionError as error:
    sys.exit(f"cannot switch to user nobody: {error}")
"""


def test_permission_denied():
    # Under /tmp, not pytest's tmp_path: pytest makes its base directory 0700, which nobody cannot search.
    locked = Path(tempfile.mkdtemp(prefix="rlpa-eacces-"))
    try:
        locked.chmod(0o555)  # searchable, but no one except root may add entries
        code = child_code(f"cli.check_writable({str(locked / 'run')!r})", before=AS_NOBODY if os.geteuid() == 0 else "")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=CHILD_HANG_GUARD_S, cwd="/")
    finally:
        locked.chmod(0o700)
        shutil.rmtree(locked)
    if result.stderr.startswith("cannot switch to user nobody"):
        pytest.skip(result.stderr.strip())
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"train.py: cannot access {locked / 'run'}: Permission denied (errno 13, EACCES)\n"
