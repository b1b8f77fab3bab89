"""launch/eval.py as one process of a multi-process test (tests/test_eval_multihost.py), with
jax.device_get refusing any array this process does not hold whole:

    python tests/eval_launch_worker.py [launch/eval.py's arguments]

A device_get of an array spread over several processes stops the run with a traceback naming it,
so a run that finishes fetched only what its process holds.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import jax

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "eval.py"
_device_get = jax.device_get


def device_get_of_own_arrays(tree):
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise AssertionError(f"process {jax.process_index()} called jax.device_get on an array of shape "
                                 f"{leaf.shape} spread over {len(leaf.sharding.device_set)} devices of several processes")
    return _device_get(tree)


if __name__ == "__main__":
    jax.device_get = device_get_of_own_arrays
    sys.argv = [str(LAUNCHER), *sys.argv[1:]]
    runpy.run_path(str(LAUNCHER), run_name="__main__")
