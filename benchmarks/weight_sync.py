"""The weight sync's memory per device, read from compiled programs on 8 fake CPU devices.

SamplingLayout (rlpa_jax/generation/layout.py) turns the trainer's FSDP float32 masters into the
sampler's replicated per-layer copy in the compute dtype, once per rollout. This compiles (never
runs: `jax.ShapeDtypeStruct` arguments, no weights allocated) both forms of it for a real Qwen2.5
shape on a data=1 fsdp=8 tensor=1 mesh and prints each program's memory_analysis():

- one program: the whole copy in one jitted call (what SamplingLayout was);
- layer at a time: SamplingLayout's programs now (one layer; a block of vocabulary rows; the rest).

Peak per device while the sync runs, beside the training state = the masters it reads
(arguments) + the copy (outputs; for the layer-at-a-time sync, the whole copy is held by the end)
+ the largest temporaries of one program.

    PYTHONPATH=. python benchmarks/weight_sync.py --model 3b      # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlpa_jax.config.tree import MeshConfig  # noqa: E402
from rlpa_jax.generation.layout import SamplingLayout  # noqa: E402
from rlpa_jax.model.hf import load_config  # noqa: E402
from rlpa_jax.model.layer_stacks import unstack_layers  # noqa: E402
from rlpa_jax.model.qwen2 import init_params  # noqa: E402
from rlpa_jax.runtime import parallel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {name: REPO / "benchmarks" / "configs" / f"qwen2.5-{name}" for name in ("0.5b", "3b", "7b")}
GB = 1e9


def per_device_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="3b", choices=sorted(MODELS))
    parser.add_argument("--layout", default="replicated", choices=("replicated", "tensor"))
    args = parser.parse_args(argv)
    config = load_config(MODELS[args.model], compute_dtype="bfloat16")
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    masters = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                           parallel.param_shardings(config, mesh))
    layout = SamplingLayout(config, mesh, args.layout)
    copy_bytes = per_device_bytes(layout.abstract(masters))

    rows = []
    start = time.time()
    whole = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(config.dtype), unstack_layers(p, config)),
                    out_shardings=layout.shardings).lower(masters).compile().memory_analysis()
    rows.append(("one program (before)", 1, whole.argument_size_in_bytes, whole.temp_size_in_bytes,
                 whole.output_size_in_bytes))
    for program in layout.lower_sync(masters):
        memory = program.lowered.compile().memory_analysis()
        rows.append((f"layer at a time: {program.name}", program.calls, memory.argument_size_in_bytes,
                     memory.temp_size_in_bytes, memory.output_size_in_bytes))
    seconds = time.time() - start

    print(f"Qwen2.5-{args.model}, bfloat16 copy, fsdp=8 -> {args.layout}; per device (GB); "
          f"masters {per_device_bytes(masters) / GB:.2f}, copy {copy_bytes / GB:.2f}; compiled in {seconds:.0f} s\n")
    print("| program | calls per sync | arguments | temporaries | outputs |")
    print("|---|---|---|---|---|")
    for name, count, arguments, temporaries, outputs in rows:
        print(f"| {name} | {count} | {arguments / GB:.3f} | {temporaries / GB:.3f} | {outputs / GB:.3f} |")
    before = per_device_bytes(masters) + copy_bytes + whole.temp_size_in_bytes
    after = per_device_bytes(masters) + copy_bytes + max(r[3] for r in rows[1:])
    print(f"\npeak while syncing (masters + copy + largest temporaries): before {before / GB:.2f} GB, "
          f"after {after / GB:.2f} GB per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
