"""One jitted, sharded optimizer step for any loss that returns LossTerms (PPO actor and critic, SFT, DPO).

A batch (any pytree of row-major arrays: a dict, an rl.experience.Experience) is cut into
micro-batches; jitted calls add up the gradient of sum(loss) / (units in the whole batch), so the
result equals one big-batch step whatever the split, and each micro-batch may be trimmed to its own
length bucket. Then the optimizer (training/optimizer.py) applies the update. With a mesh,
parameters and optimizer state keep the shardings the logical-axis rules give them and batches are
split over (data, fsdp).

The two jitted steps check their arguments with chex (tree structures, shapes and dtypes: under jit
the checks run once, while tracing, and add nothing to the compiled program).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rlpa_jax.model.qwen2 import Params
from rlpa_jax.runtime import multihost, parallel
from rlpa_jax.training.losses import LossTerms, add_terms, summary

Batch = Any  # a pytree of arrays whose leading axis is rows
LossFn = Callable[[Params, Batch], LossTerms]


class Trainable(NamedTuple):
    params: Params
    opt_state: Any


def accumulate_gradients(loss_fn: LossFn, params: Params, grads: Params, terms: LossTerms, micro_batch: Batch,
                         total_units: jax.Array) -> tuple[Params, LossTerms]:
    """Adds one micro-batch's gradient of sum(loss) / total_units to the running sums."""
    chex.assert_trees_all_equal_shapes_and_dtypes(
        grads, params, custom_message="training/updater.py: the running gradient sum is shaped like the parameters")
    chex.assert_equal_shape_prefix(jax.tree.leaves(micro_batch), 1,
                                   custom_message="training/updater.py: every array of a micro-batch has one row "
                                                  "per example")
    chex.assert_rank(total_units, 0, custom_message="training/updater.py: total_units is a scalar")

    def scaled_loss(p):
        micro_terms = loss_fn(p, micro_batch)
        return micro_terms.total / total_units, micro_terms

    (_, micro_terms), micro_grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, micro_grads), add_terms(terms, micro_terms)


def apply_gradients(optimizer: optax.GradientTransformation, trainable: Trainable, grads: Params,
                    terms: LossTerms) -> tuple[Trainable, dict[str, jax.Array]]:
    chex.assert_trees_all_equal_shapes_and_dtypes(
        grads, trainable.params, custom_message="training/updater.py: the gradients are shaped like the parameters")
    updates, opt_state = optimizer.update(grads, trainable.opt_state, trainable.params)
    params = optax.apply_updates(trainable.params, updates)
    metrics = {f"loss_{k}": v for k, v in summary(terms).items()} | {"grad_norm": optax.tree.norm(grads)}
    return Trainable(params, opt_state), metrics


class Updater:
    """One optimizer step per call, accumulated over micro-batches; fixed shardings with a mesh.

    `loss_mask(batch)` gives the units the loss is averaged over (response tokens, target tokens,
    preference pairs): the gradient is normalised by their count in the whole batch, so any split
    gives the full-batch result. Micro-batches are separate jitted calls, so each may have its own
    shape: `trim` (when given) cuts every micro-batch to its own length buckets, and one program is
    compiled per shape in use.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batch_size: int,
                 loss_mask: Callable[[Batch], Any], mesh: Mesh | None = None,
                 param_shardings: Params | None = None, trim: Callable[[Batch], Batch] | None = None):
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.micro_batch_size, self.loss_mask = micro_batch_size, loss_mask
        self.mesh, self.param_shardings = mesh, param_shardings
        self.trim = trim
        self._accumulate = self._apply = self._zero_terms = None

    def init(self, params: Params) -> Trainable:
        if self.mesh is None:
            return Trainable(params, jax.jit(self.optimizer.init)(params))
        opt_shardings = self.opt_state_shardings(params)
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        return Trainable(params, opt_state)

    def opt_state_shardings(self, params: Params):
        shapes = jax.eval_shape(self.optimizer.init, params)
        return optax.tree_map_params(
            self.optimizer, lambda _, sharding: sharding, shapes, self.param_shardings,
            transform_non_params=lambda _: parallel.replicated(self.mesh),
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )

    def _build(self, trainable: Trainable, micro_batch: Batch) -> None:
        # The loss decides which diagnostics it sums; the running sums start as zeros of that shape.
        self._zero_terms = jax.tree.map(lambda _: np.zeros((), np.float32),
                                        jax.eval_shape(self.loss_fn, trainable.params, micro_batch))
        accumulate = lambda p, g, t, b, n: accumulate_gradients(self.loss_fn, p, g, t, b, n)  # noqa: E731
        apply = lambda tr, g, t: apply_gradients(self.optimizer, tr, g, t)  # noqa: E731
        # The running gradient sum is donated: accumulating costs no second copy of the gradients.
        if self.mesh is None:
            self._accumulate = jax.jit(accumulate, donate_argnums=1)
            self._apply = jax.jit(apply, donate_argnums=0)
            return
        state = Trainable(self.param_shardings, self.opt_state_shardings(trainable.params))
        scalar = parallel.replicated(self.mesh)  # a prefix: every loss term is a replicated scalar
        self._accumulate = jax.jit(accumulate, donate_argnums=1, out_shardings=(self.param_shardings, scalar))
        self._apply = jax.jit(apply, donate_argnums=0, in_shardings=(state, self.param_shardings, scalar),
                              out_shardings=(state, scalar))

    def _put(self, micro_batch: Batch) -> Batch:
        if self.mesh is None:
            return micro_batch
        # Every process holds the whole micro-batch (the gathered experience): each places its rows.
        return jax.tree.map(lambda v: multihost.put_identical(v, parallel.batch_sharding(self.mesh, np.ndim(v))),
                            micro_batch)

    def lower(self, trainable: Trainable, micro_batch: Batch) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """(the micro-batch gradient step, the optimizer step) lowered, not run, for these possibly
        abstract arguments (with a mesh, their shardings are the Updater's own)."""
        with parallel.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if self._accumulate is None:
                self._build(trainable, micro_batch)
            units = np.float32(1.0)
            return (self._accumulate.lower(trainable.params, trainable.params, self._zero_terms, micro_batch, units),
                    self._apply.lower(trainable, trainable.params, self._zero_terms))

    def __call__(self, trainable: Trainable, batch: Batch) -> tuple[Trainable, dict[str, float]]:
        micro_batches = split_micro_batches(batch, self.micro_batch_size)
        if self.trim is not None:
            micro_batches = [self.trim(micro) for micro in micro_batches]
        total_units = np.float32(max(float(np.sum(self.loss_mask(batch))), 1.0))
        with parallel.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if self._accumulate is None:
                self._build(trainable, micro_batches[0])
            grads = jax.tree.map(jnp.zeros_like, trainable.params)
            terms = self._zero_terms
            for micro in micro_batches:
                grads, terms = self._accumulate(trainable.params, grads, terms, self._put(micro), total_units)
            return self._apply(trainable, grads, terms)


def num_rows(batch: Batch) -> int:
    return len(jax.tree.leaves(batch)[0])


def split_micro_batches(batch: Batch, micro_batch_size: int) -> list[Batch]:
    rows = num_rows(batch)
    if rows % micro_batch_size:
        raise ValueError(f"batch of {rows} rows is not a multiple of micro_batch_size={micro_batch_size}")
    return [jax.tree.map(lambda v: np.asarray(v)[start:start + micro_batch_size], batch)
            for start in range(0, rows, micro_batch_size)]
