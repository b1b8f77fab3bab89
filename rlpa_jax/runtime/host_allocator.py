"""Keep the host allocator's big blocks between calls on CPU-only machines (glibc malloc tunables).

XLA:CPU allocates each program's temporaries with `posix_memalign` from a thread of its pool, on
every execution. glibc gives each thread its own arena, whose heaps hold at most 64 MB, so a larger
block (a 2-layer model's update already needs ~300 MB of temporaries) is `mmap`ed and `munmap`ed
on every call, and every page of it is faulted in afresh: measured on the 2-core CI machine, 77k
page faults and ~110 ms of kernel time per update of `benchmarks/grpo_trl.py`'s model, a fifth of
the step (docs/PERF.md). One arena that never maps or trims keeps those blocks and reuses them;
torch on the same machine benefits alike.

The tunables are read when a process starts, so `ensure()` restarts the launch script once with
them set (`os.execv`: same process id, same arguments), before any heavy import. It does nothing
when the machine has an NVIDIA GPU (the device holds the big buffers there), when the user set
GLIBC_TUNABLES themselves, or with RLPA_HOST_ALLOCATOR=default. The cost of keeping blocks: the
process's resident memory stays at its peak instead of shrinking between calls.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One arena for every thread (thread arenas cannot hold big blocks), no mmap for big blocks, and
# never give the heap's free top back to the kernel.
TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
OPT_OUT = "RLPA_HOST_ALLOCATOR"


def wanted(environ: dict[str, str], has_gpu: bool) -> bool:
    """Whether a process with this environment should run with TUNABLES."""
    if environ.get(OPT_OUT, "") == "default" or "GLIBC_TUNABLES" in environ:
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    return platforms == "cpu" or (not platforms and not has_gpu)


def nvidia_gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()


def ensure() -> None:
    """Restart this script with TUNABLES when `wanted` (glibc only: Linux)."""
    if not sys.platform.startswith("linux") or not wanted(dict(os.environ), nvidia_gpu_present()):
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
