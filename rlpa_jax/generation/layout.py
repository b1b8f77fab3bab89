"""The actor's parameters as the sampler reads them: one copy per rollout, in the sampling layout.

The trainer keeps float32 masters in its FSDP layout; the sampler decodes from a copy resharded on
device (`rollout.layout`: replicated, tensor-split, or the training layout itself), cast to the
compute dtype and split into per-layer arrays, the form the decode loop reads in place.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlpa_jax.model.layer_stacks import has_stacked_layers, unstack_layers, unstacked_layer_name
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.runtime import parallel

# Layout name -> mesh axes the sampler's copy of the parameters is NOT split over.
LAYOUTS: dict[str, frozenset[str] | None] = {
    "replicated": frozenset(parallel.MESH_AXES),  # every device holds all weights: no weight traffic
    "tensor": frozenset({"data", "fsdp"}),  # split over tensor only: for a model one device cannot hold
    "training": None,  # the trainer's own FSDP layout and float32 masters (every decode step gathers)
}


def unstacked_shardings(shardings: Params, config: Qwen2Config) -> Params:
    """The shardings of `layer_stacks.unstack_layers`' output: each layer's leaves split as the stacked
    leaves are, without their leading "layers" axis (which the rules never split)."""
    def drop_layer_axis(sharding: NamedSharding) -> NamedSharding:
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))

    layer = jax.tree.map(drop_layer_axis, shardings["layers"])
    return ({k: v for k, v in shardings.items() if k != "layers"}
            | {unstacked_layer_name(i): layer for i in range(config.num_layers)})


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

        def reshard(params: Params) -> Params:
            params = unstack_layers(params, config) if has_stacked_layers(params) else params
            return jax.tree.map(lambda x: x.astype(self.dtype), params)

        self._reshard = jax.jit(reshard, out_shardings=self.shardings)

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
