"""Losses as sums and counts, so micro-batches add up exactly whatever the split.

A loss function returns `LossTerms`: the summed loss over its units (tokens, or preference pairs),
how many units there were, and any diagnostics of its own as sums over the same units. The mean
over a whole batch is the sum of its micro-batches' terms divided by their count (a mean of
micro-batch means would weight short responses wrongly), and each diagnostic is logged under its
own name as sum / count, so DPO reports its reward accuracy as `reward_accuracy`, not in a field
named after PPO.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class LossTerms(NamedTuple):
    """total: summed loss; count: units summed over; sums: named diagnostics, summed per unit."""

    total: jax.Array
    count: jax.Array
    sums: dict[str, jax.Array]


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
    """Field-wise sum of two LossTerms (micro-batch accumulation)."""
    chex.assert_trees_all_equal_shapes(a, b, custom_message="training/losses.py add_terms: LossTerms of one loss "
                                                            "(the same diagnostics, the same shapes)")
    return jax.tree.map(jnp.add, a, b)


def summary(terms: LossTerms) -> dict[str, jax.Array]:
    """The per-unit mean loss, the unit count (`tokens`) and every diagnostic as a per-unit mean."""
    count = jnp.maximum(terms.count, 1.0)
    return {"mean": terms.total / count, "tokens": terms.count} | {k: v / count for k, v in terms.sums.items()}


def as_float(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(jnp.float32)


def masked_sum(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Sum of `values` over valid positions (all axes, or one)."""
    chex.assert_equal_shape([values, mask],
                            custom_message="training/losses.py masked_sum: values and mask share one shape")
    return jnp.sum(jnp.asarray(values, jnp.float32) * as_float(mask), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of `values` over valid positions; 0 where nothing is valid (instead of NaN)."""
    count = jnp.sum(as_float(mask), axis=axis)
    return masked_sum(values, mask, axis) / jnp.maximum(count, 1.0)
