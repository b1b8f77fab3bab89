"""The policy's output scale as one learned inverse temperature, on its own learning rate.

The final RMSNorm's weight multiplies every hidden unit just before the (linear, bias-free)
unembedding, so multiplying the whole weight by s multiplies every logit by s: it is sampling at
temperature 1/s. Much of what PPO can gain on the embedded world lies in that one direction (the
SFT policy samples worse than it knows: it scores better at lower temperatures; docs/RESULTS.md
has the measurements), and the policy gradient points along it, but Adam moves each weight by
about the learning rate per step: at a learning rate that keeps the rest of a tiny policy intact,
a run barely moves the final norm. Here the final norm moves as one scalar, in log space:
the gradient with respect to log s (sum over the hidden dimensions of gradient x weight) goes
through the optimizer at a learning rate of its own, and the resulting step multiplies the whole
weight by exp(step), so every update rescales all logits alike and Adam sees one consistent
signal instead of many noisy ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OUTPUT_SCALE = "final_norm"  # the parameter-path component of the policy's output scale


def is_output_scale(path) -> bool:
    return any(getattr(key, "key", None) == OUTPUT_SCALE for key in path)


def _map_output_scale(fn, tree, params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, weight: fn(leaf, weight) if is_output_scale(path) else leaf, tree, params)


def log_scale_gradient() -> optax.GradientTransformation:
    """The output scale's gradient becomes d loss / d log s (s multiplying the whole weight),
    spread evenly over the elements (each holds it / sqrt(size), so a global-norm clip sees its
    true size): one scalar direction for the optimizer that follows."""

    def spread(g, w):
        return jnp.full_like(g, jnp.sum(g * w) / jnp.sqrt(g.size))

    def update(updates, state, params=None):
        return _map_output_scale(spread, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def multiplicative_scale_update(factor: float) -> optax.GradientTransformation:
    """Reads the optimizer's (uniform) step of log s, times `factor`, and turns it into the
    update that multiplies the weight by exp(step)."""

    def update(updates, state, params=None):
        return _map_output_scale(lambda u, w: w * jnp.expm1(factor * u.mean()), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_output_scale_lr(optimizer: optax.GradientTransformation, peak_lr: float,
                         output_scale_lr: float | None) -> optax.GradientTransformation:
    """`optimizer` (built for `peak_lr`), with the output scale learned as one log-scale on
    `output_scale_lr` (same schedule shape); unchanged when `output_scale_lr` is None."""
    if output_scale_lr is None:
        return optimizer
    return optax.chain(log_scale_gradient(), optimizer, multiplicative_scale_update(output_scale_lr / peak_lr))


def output_scale_ratio(params, reference) -> float:
    """How far the policy's logits have been scaled from the reference's (its inverse temperature
    relative to the start): the ratio of the final norms' mean weights."""
    return float(jnp.mean(params[OUTPUT_SCALE]["scale"]) / jnp.mean(reference[OUTPUT_SCALE]["scale"]))
