"""What every launch script does first: its config arguments (add_config_arguments: --config, the
overrides, --print-config, --help-config), joining the run's other processes when started as several
(`jax.distributed`), readable logs, the config (or a clear exit; processes that disagree on it all
stop with one error), the compile cache, and one-line exits for file-system problems the user can
fix (a full or read-only disk, permissions, a path that is missing or runs through a file):

    with cli.exit_on_os_error("train.py"):
        cli.check_writable(config.run_dir, needed_bytes=...)
        run(config)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax

from rlpa_jax.app import build
from rlpa_jax.config import reference
from rlpa_jax.config.loading import origin
from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import DEFAULT_CONFIG, to_dict
from rlpa_jax.runtime import multihost, parallel

# The tokenizers library warns (and disables its threads) when a process forks after using them;
# the launch scripts never fork, so say so before it is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T = TypeVar("T")

# Libraries that log every file written or request sent at INFO.
CHATTY_LOGGERS = ("absl", "jax._src.xla_bridge", "matplotlib", "httpx", "httpx2", "openai")


def setup_logging(process: int = 0, processes: int = 1) -> None:
    """INFO logs on the console; in a run of several processes only process 0 logs INFO (the others
    log warnings and errors, each line prefixed with its process)."""
    prefix = f"[process {process}] " if processes > 1 else ""
    # force: a library imported before this (absl, orbax) may already have given the root logger a
    # handler, which would make basicConfig a silent no-op.
    logging.basicConfig(level=logging.INFO if process == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", force=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def start(program: str) -> None:
    """Logging, and joining the other processes when launched as one of several (JAX_* variables,
    SLURM or Open MPI: parallel.initialize_distributed); before anything touches a device."""
    setup_logging()
    try:
        joined = parallel.initialize_distributed()
    except ValueError as error:  # a half-set or malformed JAX_* / RLPA_DISTRIBUTED_* variable
        print(f"{program}: {error}", file=sys.stderr)
        sys.exit(2)
    if joined:
        setup_logging(jax.process_index(), jax.process_count())


def several_processes() -> bool:
    """Whether this process is one of several (asked without touching a device when it is not)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def agree_or_exit(program: str, facts: Mapping[str, Any] | None, problem: str | None = None) -> None:
    """With several processes, all compare `facts` (the resolved config, the launch arguments)
    and this process's devices, and all exit with status 2 and one message naming the first keys
    that differ, or every process's `problem` (a config error one of them hit): never some
    stopping while the others wait for them. With one process only `problem` ends the program."""
    if several_processes():
        mine = {"error": problem} if problem is not None else {**facts, "devices": multihost.device_facts()}
        try:
            multihost.check_agreement(mine)
        except multihost.ProcessMismatch as error:
            problem = str(error)
    if problem is not None:
        print(f"{program}: {problem}", file=sys.stderr)
        sys.exit(2)


def load_config_or_exit(program: str, path: Path | None, overrides: list[str], arguments: Mapping[str, Any] | None = None,
                        job: str = "train"):
    """The validated config (names of implementations and the rules of `job`, the program's kind:
    train, sft, dpo, eval, included); a bad file or override prints every problem and exits with
    status 2. With several processes, they must agree on the config and on `arguments` (the
    script's other command-line arguments) too."""
    try:
        config, problem = build.load_config(path, overrides, job), None
    except ConfigError as error:
        config, problem = None, str(error)
    agree_or_exit(program, None if config is None else {"config": to_dict(config), "arguments": dict(arguments or {})},
                  problem)
    return config


def use_compilation_cache(config) -> None:
    """Persist compiled programs under the output directory unless the environment names a cache."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(config.output_dir) / ".jax_cache"))


def start_with_config(program: str, path: Path | None, overrides: list[str],
                      arguments: Mapping[str, Any] | None = None, job: str = "train", print_config: bool = False):
    """The opening of a launch script that runs a config: `start` (logs, the other processes), the
    validated config or an exit (load_config_or_exit, with the script's other `arguments` and its
    `job`'s rules), and the compile cache under its output directory. Returns the config.
    With `print_config` (--print-config) it prints the config instead and exits (print_config_and_exit)."""
    if print_config:
        print_config_and_exit(program, path, overrides, job)
    start(program)
    config = load_config_or_exit(program, path, overrides, arguments, job)
    use_compilation_cache(config)
    return config


# ---------------------------------------------------------------------------------------------
# The config's command-line arguments: the file, the overrides, the option reference, the resolved config


class _PrintOptionReference(argparse.Action):
    """--help-config [SECTION]: every option (or SECTION's) with its default, domain and meaning; exits."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = reference.reference_text(values or "")
        if not text:
            sections = ", ".join(s.key for s in reference.sections() if s.key)
            parser.error(f"{option_string} {values}: no option or section of that name; sections: {sections}")
        print(text, end="")
        parser.exit()


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "ppo.actor_lr=1e-6") -> None:
    """A launch script's config arguments: --config FILE, the dotted overrides (`example` shows
    one), --print-config (args.print_config, for start_with_config), --help-config [SECTION] (the
    option reference, then exit), and an epilog for --help that lists the config's sections."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML, each value with where it came from (default, "
                             "the YAML file and line, a command-line override), and exit without running")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION", action=_PrintOptionReference,
                        help="list every config option (or those of SECTION, e.g. ppo or rollout.top_p) with its "
                             "default, the values it accepts and its meaning, and exit")
    parser.add_argument("overrides", nargs="*", help=f"dotted config overrides key.path=value, e.g. {example}")
    sections = (f"config sections (every option: --help-config [SECTION], or docs/CONFIG.md):\n"
                f"{reference.sections_summary()}")
    parser.epilog = f"{parser.epilog}\n\n{sections}" if parser.epilog else sections


def print_config_and_exit(program: str, path: Path | None, overrides: list[str], job: str = "train") -> None:
    """--print-config: the validated config `job` would run, as YAML with where each value came from
    (config/reference.annotated_yaml), on stdout; status 0, or 2 with every problem of a bad config.
    Nothing is built and no device is touched."""
    try:
        config, sources = build.load_config_and_sources(path, overrides, job)
    except ConfigError as error:
        print(f"{program}: {error}", file=sys.stderr)
        sys.exit(2)
    given = f" with {' '.join(overrides)}" if overrides else ""
    heading = (f"{program} --print-config: {path or DEFAULT_CONFIG}{given}, checked for {job}; each role's "
               f"unset LLM fields are filled from the sections above it")
    print(reference.annotated_yaml(config, lambda key: origin(sources, key), heading), end="")
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# File-system errors the user causes and can fix: one line and status 1, not a traceback

CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
CANNOT_ACCESS = {errno.EACCES, errno.EPERM, errno.ENOENT}
CANNOT_USE = {errno.ENOTDIR, errno.EISDIR}
USER_OS_ERRORS = CANNOT_WRITE | CANNOT_ACCESS | CANNOT_USE
OS_ERROR_EXIT_STATUS = 1


class NotEnoughSpaceError(OSError):
    """A directory's file system has less free space than a run needs (errno ENOSPC)."""

    def __init__(self, directory: str | Path, needed_bytes: int, free_bytes: int):
        super().__init__(errno.ENOSPC, f"not enough free space: {_bytes(needed_bytes)} needed, "
                                       f"{_bytes(free_bytes)} free", str(directory))
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes


def _bytes(count: int) -> str:
    size, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{count:,} bytes" + ("" if unit == "B" else f" ({size:.1f} {unit})")


def user_os_error(error: BaseException) -> OSError | None:
    """The OSError the user can fix behind `error` (itself, or what it was raised from), else None.

    Only explicit causes (`raise ... from error`) are followed: an exception raised while handling
    an OSError is a different fault and keeps its traceback.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in USER_OS_ERRORS:
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def describe_os_error(error: OSError) -> str:
    """`cannot write runs/x/checkpoints/4: No space left on device (errno 28, ENOSPC)`."""
    verb = ("cannot write" if error.errno in CANNOT_WRITE else
            "cannot access" if error.errno in CANNOT_ACCESS else "cannot use")
    if error.filename is not None:
        path = os.fsdecode(error.filename)
        if error.filename2 is not None:
            path += f" -> {os.fsdecode(error.filename2)}"
        subject = f"{verb} {path}"
    else:
        subject = f"{verb} a file (the operating system did not say which)"
    cause = error.strerror or os.strerror(error.errno)
    return f"{subject}: {cause} (errno {error.errno}, {errno.errorcode.get(error.errno, '?')})"


@contextlib.contextmanager
def exit_on_os_error(program: str) -> Iterator[None]:
    """Ends the program with one line on stderr and status 1 when the block raises an OSError the
    user caused (USER_OS_ERRORS: permissions, a read-only or full disk, a quota, a missing path, a
    file where a directory should be); every other exception propagates with its traceback.

    Also a decorator: `@cli.exit_on_os_error("train.py")` over `main`.
    """
    try:
        yield
    except Exception as error:
        cause = user_os_error(error)
        if cause is None:
            raise
        print(f"{program}: {describe_os_error(cause)}", file=sys.stderr)
        raise SystemExit(OS_ERROR_EXIT_STATUS) from None


def run_or_exit(program: str, work: Callable[[], T], expected: tuple[type[BaseException], ...], status: int = 1) -> T:
    """work()'s result. A mistake the user can fix (an `expected` error: a missing file, a bad
    value, an unusable checkpoint) or a file-system problem ends the program with one line on
    stderr, without a traceback; programming errors keep theirs."""
    with exit_on_os_error(program):
        try:
            return work()
        except expected as error:
            print(f"{program}: {error}", file=sys.stderr)
            raise SystemExit(status) from None


def check_writable(directory: str | Path, needed_bytes: int = 0) -> Path:
    """Creates `directory` if needed, writes and removes a probe file in it, and checks that its file
    system has `needed_bytes` free; fails early, with an OSError naming the path, instead of hours
    into a run at the first checkpoint. NotEnoughSpaceError (an OSError, ENOSPC) when space is short.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise NotEnoughSpaceError(directory, needed_bytes, free)
    # pid and random: hosts of a multi-host run may probe the same shared directory at once
    probe = directory / f".rlpa-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, b"probe")
        os.fsync(descriptor)  # a full disk may only refuse the data when it is flushed
    except OSError as error:
        if error.filename is None:  # os.write and os.fsync errors do not carry the path
            error.filename = str(probe)
        raise
    finally:
        os.close(descriptor)
        probe.unlink()
    return directory
