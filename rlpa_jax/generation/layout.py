"""The actor's parameters as the sampler reads them: one copy per rollout, in the sampling layout.

The trainer keeps float32 masters in its FSDP layout; the sampler decodes from a copy resharded on
device (`rollout.layout`: replicated, tensor-split, or the training layout itself), cast to the
compute dtype and split into per-layer arrays, the form the decode loop reads in place. The copy
is made one layer at a time (the weight sync), so the only temporary is one layer's gathered
masters, not the whole model's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlpa_jax.model.layer_stacks import has_stacked_layers, unstack_layers, unstacked_layer_name
from rlpa_jax.model.qwen2 import Params, Qwen2Config, init_params, param_logical_axes
from rlpa_jax.runtime import parallel

# Layout name -> mesh axes the sampler's copy of the parameters is NOT split over.
LAYOUTS: dict[str, frozenset[str] | None] = {
    "replicated": frozenset(parallel.MESH_AXES),  # every device holds all weights: no weight traffic
    "tensor": frozenset({"data", "fsdp"}),  # split over tensor only: for a model one device cannot hold
    "training": None,  # the trainer's own FSDP layout and float32 masters (every decode step gathers)
}


def _write_block(buffer: jax.Array, source: jax.Array, start: jax.Array, *, axis: int, size: int,
                 sharding: NamedSharding) -> jax.Array:
    """`buffer` (donated, placed by `sharding`) with source[start:start + size] along `axis` written
    in, cast to its dtype. The block is placed as the buffer is before the write: left to itself,
    XLA split the buffer as the source is, wrote the block there and gathered the whole buffer back
    (a float32 copy of the whole table). A last block that would run past the end starts earlier
    (dynamic slices clamp their start), so it rewrites a few rows with the same values."""
    block = jax.lax.dynamic_slice_in_dim(source, start, size, axis)
    block = jax.lax.with_sharding_constraint(block.astype(buffer.dtype), sharding)
    return jax.lax.dynamic_update_slice_in_dim(buffer, block, start, axis)


def vocab_blocks(config: Qwen2Config, shardings: Params) -> dict[str, tuple[int, int, int]]:
    """name -> (vocabulary axis, block size, blocks) of each top-level vocabulary parameter the sync
    writes in blocks of about one layer's parameters: where it is larger than a layer and the
    trainer's layout (`shardings`) leaves its vocabulary axis unsplit (a block is then a local
    slice of every device's shard)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    axes = param_logical_axes(config)
    per_layer = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["layers"])) // config.num_layers
    blocks = {}
    for name in VOCAB_PARAMS:
        if name not in shapes:
            continue
        axis, shape = axes[name].index("vocab"), shapes[name].shape
        spec = shardings[name].spec
        count = math.ceil(math.prod(shape) / per_layer)
        if count > 1 and (axis >= len(spec) or spec[axis] is None):
            size = math.ceil(shape[axis] / count)
            blocks[name] = (axis, size, math.ceil(shape[axis] / size))
    return blocks


def unstacked_shardings(shardings: Params, config: Qwen2Config) -> Params:
    """The shardings of `layer_stacks.unstack_layers`' output: each layer's leaves split as the stacked
    leaves are, without their leading "layers" axis (which the rules never split)."""
    layer = jax.tree.map(drop_layer_axis, shardings["layers"])
    return ({k: v for k, v in shardings.items() if k != "layers"}
            | {unstacked_layer_name(i): layer for i in range(config.num_layers)})


# Top-level parameters with a vocabulary axis: larger than a layer (Qwen2.5-3B: 311M against 77M
# parameters), so the sync writes them in blocks of vocabulary rows.
VOCAB_PARAMS = ("embed", "lm_head")


def drop_layer_axis(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


@dataclasses.dataclass(frozen=True)
class SyncProgram:
    """One program of the weight sync, lowered for abstract parameters (the memory check compiles it)."""

    name: str
    lowered: jax.stages.Lowered
    arguments: Any  # the abstract parameters it reads (resident anyway: the actor's)
    outputs: Any  # the abstract part of the sampling copy it writes
    calls: int  # how many times one sync runs it


class SamplingLayout:
    """The actor's parameters as the sampler reads them: resharded on device (inside jit, no host
    round trip) to `layout`, cast to the compute dtype and split into per-layer arrays
    (`layer_stacks.unstack_layers`), once per rollout.

    Under FSDP each decode step would all-gather every layer's weights, one token step at a time
    (for Qwen2.5-3B ~11 GB of float32 per generated token against ~6 GB of bfloat16 weights read
    from HBM); the resharded copy is a weight sync done once per iteration, device to device, and
    costs a copy of the weights in the compute dtype until the rollout drops it. The copy is
    already per layer, the form the decode loop reads in place, so a sampler call makes no
    second, per-call copy of the layer weights (sampler.decode splits only stacked parameters).

    The copy is made layer by layer: one program slices a layer out of the stacked masters (the
    layer index is an argument: one compiled program for every layer), gathers it into the layout
    and casts it; the embedding (and an untied head) is written into its copy in blocks of
    vocabulary rows of about a layer's size (`vocab_blocks`; the copy's buffer is donated, never
    the masters); one more program casts the rest (the final norm). As one
    program, XLA gathered every float32 master before casting: for Qwen2.5-3B on fsdp=8, 11.1 GB
    of temporaries per device beside the training state and the 6.2 GB copy, more than the
    rollout itself needed (docs/GPU_READINESS.md; benchmarks/weight_sync.py). Nothing is donated:
    the trainer keeps its masters. Same values as one program, bit for bit (a cast per element).

    The `training` layout hands the actor's own stacked FSDP parameters over unchanged (no copy):
    each sampler call then splits them and each decode step gathers a layer at a time. So does
    any layout for an actor already in its dtype and placement (one device, float32 compute): see
    `in_layout`.
    """

    def __init__(self, config: Qwen2Config, mesh: Mesh | None, layout: str = "replicated"):
        if layout not in LAYOUTS:
            raise ValueError(f"rollout.layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self.config = config
        self.shardings = None  # of the per-layer parameters the sampler reads; None: no copy made
        if LAYOUTS[layout] is None or mesh is None:
            self._reshard = None
            return
        self._stacked_shardings = parallel.param_shardings(config, mesh, unused=LAYOUTS[layout])
        self.shardings = unstacked_shardings(self._stacked_shardings, config)
        self.dtype = config.dtype
        layer_shardings = jax.tree.map(drop_layer_axis, self._stacked_shardings["layers"])
        rest_shardings = {k: v for k, v in self._stacked_shardings.items() if k != "layers"}

        def cast(tree: Params) -> Params:
            return jax.tree.map(lambda x: x.astype(self.dtype), tree)

        def one_layer(layers: Params, index: jax.Array) -> Params:
            return cast(jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), layers))

        self._sync_layer = jax.jit(one_layer, out_shardings=layer_shardings)  # from the stacked masters
        self._cast_layer = jax.jit(cast, out_shardings=layer_shardings)  # an already split layer
        self._vocab_blocks = vocab_blocks(config, parallel.param_shardings(config, mesh))
        self._sync_rest = jax.jit(cast, out_shardings={k: v for k, v in rest_shardings.items()
                                                       if k not in self._vocab_blocks})
        self._write_blocks = {
            name: jax.jit(functools.partial(_write_block, axis=axis, size=size, sharding=rest_shardings[name]),
                          donate_argnums=0, out_shardings=rest_shardings[name])
            for name, (axis, size, _) in self._vocab_blocks.items()}
        self._empty = {  # the copy's buffer the blocks are written into
            name: jax.jit(functools.partial(jnp.zeros, self._copy_shape(name), self.dtype),
                          out_shardings=rest_shardings[name])
            for name in self._vocab_blocks}
        self._reshard = self._sync

    def in_layout(self, params: Params) -> bool:
        """Whether the sampler reads `params` as they are, without the per-rollout copy: in the
        compute dtype and placed as this layout places them, per layer (this layout's own output,
        passed again) or still stacked (one device in float32 compute: the actor itself).

        Stacked parameters in layout are not copied: each sampler call splits them, as every call
        did before the copy was per layer. That keeps one-device float32 runs (tests, `make demo`)
        the same bit for bit (the per-layer prefill, unrolled, rounds differently from the layer
        scan: ~5e-7 in log-probs) at the same peak memory (the split lives for a call, where a
        per-layer copy would live for the rollout); the cost is the split's time on every call."""
        shardings = self._stacked_shardings if has_stacked_layers(params) else self.shardings
        if jax.tree.structure(params) != jax.tree.structure(shardings):
            return False
        return all(x.dtype == self.dtype and x.sharding.is_equivalent_to(sharding, len(x.shape))
                   for x, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))

    def _sync(self, params: Params) -> Params:
        """The sampling copy of `params` (stacked or split): a program call per layer and per block
        of vocabulary rows, one for the rest."""
        rest = {k: v for k, v in params.items()
                if k != "layers" and k not in self._layer_names() and k not in self._vocab_blocks}
        vocab = {name: self._sync_vocab(name, params[name]) for name in self._vocab_blocks}
        if has_stacked_layers(params):
            layers = {name: self._sync_layer(params["layers"], jnp.int32(i))
                      for i, name in enumerate(self._layer_names())}
        else:
            layers = {name: self._cast_layer(params[name]) for name in self._layer_names()}
        return self._sync_rest(rest) | vocab | layers

    def _copy_shape(self, name: str) -> tuple[int, ...]:
        return jax.eval_shape(lambda: init_params(self.config, jax.random.key(0)))[name].shape

    def _sync_vocab(self, name: str, source: jax.Array) -> jax.Array:
        _, size, blocks = self._vocab_blocks[name]
        copy = self._empty[name]()
        for block in range(blocks):
            copy = self._write_blocks[name](copy, source, jnp.int32(block * size))
        return copy

    def _layer_names(self) -> list[str]:
        return [unstacked_layer_name(i) for i in range(self.config.num_layers)]

    def lower_sync(self, params: Params) -> list[SyncProgram]:
        """The weight sync's programs lowered for `params` as shapes, dtypes and shardings (the
        training state's): one layer's, one vocabulary block's per blocked parameter, the rest's.
        Empty where no copy is made."""
        if self._reshard is None or self.in_layout(params):
            return []
        copy = self.abstract(params)
        names = self._layer_names()
        if has_stacked_layers(params):
            index = jax.ShapeDtypeStruct((), jnp.int32)
            layer = SyncProgram("one layer", self._sync_layer.lower(params["layers"], index), params["layers"],
                                copy[names[0]], len(names))
        else:
            layer = SyncProgram("one layer", self._cast_layer.lower(params[names[0]]), params[names[0]],
                                copy[names[0]], len(names))
        programs = [layer]
        for name in self._vocab_blocks:
            buffer = copy[name]
            lowered = self._write_blocks[name].lower(buffer, params[name], jax.ShapeDtypeStruct((), jnp.int32))
            programs.append(SyncProgram(f"{name} block", lowered, params[name], buffer, self._vocab_blocks[name][2]))
        rest = {k: v for k, v in params.items() if k != "layers" and k not in names and k not in self._vocab_blocks}
        programs.append(SyncProgram("the rest", self._sync_rest.lower(rest), rest, {k: copy[k] for k in rest}, 1))
        return programs

    def __call__(self, params: Params) -> Params:
        return params if self._reshard is None or self.in_layout(params) else self._reshard(params)

    def abstract(self, params: Params) -> Params:
        """What `__call__` returns for `params` given as shapes, dtypes and shardings (the training
        state's, `jax.ShapeDtypeStruct`s): the arguments to lower the sampler with, no memory."""
        if self._reshard is None or self.in_layout(params):
            return params
        shapes = jax.eval_shape(lambda p: unstack_layers(p, self.config) if has_stacked_layers(p) else p, params)
        return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, self.dtype, sharding=sharding),
                            shapes, self.shardings)
