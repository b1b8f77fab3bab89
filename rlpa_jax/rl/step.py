"""Jitted, sharded update steps for any loss that returns LossTerms (PPO actor, critic, SFT, DPO).

A batch arrives as (micro_batches, micro_batch_size, ...) arrays; one `lax.scan` accumulates the
gradient of sum(loss) / (tokens in the whole batch), so the result equals one big-batch step
whatever the split. Then optax applies global-norm clipping and AdamW on float32 master weights
with a warm-up + cosine schedule. With a mesh, parameters and optimizer state keep the shardings
the logical-axis rules give them and batches are split over (data, fsdp).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlpa_jax import parallel
from rlpa_jax.model.qwen2 import Params, Qwen2Config, forward, init_params, param_logical_axes
from rlpa_jax.rl import ppo

Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch], ppo.LossTerms]


class Trainable(NamedTuple):
    params: Params
    opt_state: Any


def lr_schedule(peak_lr: float, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak (the paper's recipe)."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak_lr, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * min_lr_ratio,
    )


def make_optimizer(peak_lr: float, total_steps: int, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.0,
                   grad_clip: float = 1.0, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1) -> optax.GradientTransformation:
    schedule = lr_schedule(peak_lr, total_steps, warmup_ratio, min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    )


def accumulate_and_apply(loss_fn: LossFn, optimizer: optax.GradientTransformation, trainable: Trainable,
                         batch: Batch, token_mask_key: str) -> tuple[Trainable, dict[str, jax.Array]]:
    """One optimizer step over all micro-batches of `batch` (leaves: (micro_batches, size, ...))."""
    # Normalise by the tokens of the whole batch, so micro-batches add up to the full-batch mean.
    total_tokens = jnp.maximum(jnp.sum(batch[token_mask_key].astype(jnp.float32)), 1.0)

    def micro_step(carry, micro_batch):
        grads, terms = carry

        def scaled_loss(params):
            micro_terms = loss_fn(params, micro_batch)
            return micro_terms.total / total_tokens, micro_terms

        (_, micro_terms), micro_grads = jax.value_and_grad(scaled_loss, has_aux=True)(trainable.params)
        return (jax.tree.map(jnp.add, grads, micro_grads), ppo.add_terms(terms, micro_terms)), None

    zero_grads = jax.tree.map(jnp.zeros_like, trainable.params)
    zero = jnp.zeros((), jnp.float32)
    (grads, terms), _ = jax.lax.scan(micro_step, (zero_grads, ppo.LossTerms(zero, zero, zero, zero)), batch)
    updates, opt_state = optimizer.update(grads, trainable.opt_state, trainable.params)
    params = optax.apply_updates(trainable.params, updates)
    metrics = {f"loss_{k}": v for k, v in ppo.summary(terms).items()} | {"grad_norm": optax.tree.norm(grads)}
    return Trainable(params, opt_state), metrics


class Updater:
    """A jitted optimizer step for one loss, with fixed shardings when a mesh is given."""

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batch_size: int,
                 token_mask_key: str = "response_mask", mesh: Mesh | None = None,
                 param_shardings: Params | None = None):
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.micro_batch_size, self.token_mask_key = micro_batch_size, token_mask_key
        self.mesh, self.param_shardings = mesh, param_shardings
        self._step = None

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

    def _build(self, trainable: Trainable, batch: Batch):
        step = lambda t, b: accumulate_and_apply(self.loss_fn, self.optimizer, t, b, self.token_mask_key)  # noqa: E731
        if self.mesh is None:
            return jax.jit(step, donate_argnums=0)
        state_shardings = Trainable(self.param_shardings, self.opt_state_shardings(trainable.params))
        batch_shardings = {k: micro_batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}
        return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, parallel.replicated(self.mesh)), donate_argnums=0)

    def __call__(self, trainable: Trainable, batch: dict[str, np.ndarray]) -> tuple[Trainable, dict[str, float]]:
        micro = split_micro_batches(batch, self.micro_batch_size)
        if self._step is None:
            self._step = self._build(trainable, micro)
        if self.mesh is not None:
            micro = {k: jax.device_put(v, micro_batch_sharding(self.mesh, v.ndim)) for k, v in micro.items()}
            with parallel.activate(self.mesh):
                trainable, metrics = self._step(trainable, micro)
        else:
            trainable, metrics = self._step(trainable, micro)
        return trainable, metrics


def micro_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """(micro_batches, rows, ...): rows over (data, fsdp); micro-batches run one after another."""
    return NamedSharding(mesh, PartitionSpec(None, parallel.BATCH_AXES, *([None] * (ndim - 2))))


def split_micro_batches(batch: dict[str, np.ndarray], micro_batch_size: int) -> dict[str, np.ndarray]:
    rows = len(next(iter(batch.values())))
    if rows % micro_batch_size:
        raise ValueError(f"batch of {rows} rows is not a multiple of micro_batch_size={micro_batch_size}")
    return {k: np.asarray(v).reshape(rows // micro_batch_size, micro_batch_size, *np.shape(v)[1:]) for k, v in batch.items()}


def param_shardings(config: Qwen2Config, mesh: Mesh, head="lm") -> Params:
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))
    return parallel.shardings_for(param_logical_axes(config, head), abstract, mesh)


# ---------------------------------------------------------------------------------------------
# Sequences: prompt (left-padded to P) followed by the response (R tokens); predictions for the
# response come from positions P-1 .. P+R-2.


def response_logits(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int, head="lm"):
    out, _ = forward(params, config, tokens, attention_mask, head=head)
    return out[:, -response_length - 1:-1]


def response_logprobs(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    logits = response_logits(params, config, tokens, attention_mask, response_length)
    targets = tokens[:, -response_length:]
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return logprobs, logits


def response_values(params: Params, config: Qwen2Config, tokens, attention_mask, response_length: int):
    return response_logits(params, config, tokens, attention_mask, response_length, head="value")


def actor_loss_fn(config: Qwen2Config, clip_eps: float, entropy_coef: float) -> LossFn:
    def loss(params, batch):
        length = batch["response_mask"].shape[-1]
        logprobs, logits = response_logprobs(params, config, batch["tokens"], batch["attention_mask"], length)
        terms = ppo.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["response_mask"], clip_eps)
        if entropy_coef:
            entropy = ppo.entropy_from_logits(logits, batch["response_mask"])
            terms = terms._replace(total=terms.total - entropy_coef * entropy.total)
        return terms
    return loss


def critic_loss_fn(config: Qwen2Config, value_clip_eps: float) -> LossFn:
    def loss(params, batch):
        length = batch["response_mask"].shape[-1]
        values = response_values(params, config, batch["tokens"], batch["attention_mask"], length)
        return ppo.value_loss(values, batch["old_values"], batch["returns"], batch["response_mask"], value_clip_eps)
    return loss
