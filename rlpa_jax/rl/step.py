"""Jitted, sharded update steps for any loss that returns LossTerms (PPO actor, critic, SFT, DPO).

A batch is cut into micro-batches; jitted calls add up the gradient of sum(loss) / (tokens in the
whole batch), so the result equals one big-batch step whatever the split, and each micro-batch may
be trimmed to its own length bucket. Then optax applies global-norm clipping and AdamW on float32
master weights with a warm-up + cosine schedule. With a mesh, parameters and optimizer state keep
the shardings the logical-axis rules give them and batches are split over (data, fsdp).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

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


def accumulate_gradients(loss_fn: LossFn, params: Params, grads: Params, terms: ppo.LossTerms, micro_batch: Batch,
                         total_tokens: jax.Array) -> tuple[Params, ppo.LossTerms]:
    """Adds one micro-batch's gradient of sum(loss) / total_tokens to the running sums."""

    def scaled_loss(p):
        micro_terms = loss_fn(p, micro_batch)
        return micro_terms.total / total_tokens, micro_terms

    (_, micro_terms), micro_grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
    return jax.tree.map(jnp.add, grads, micro_grads), ppo.add_terms(terms, micro_terms)


def apply_gradients(optimizer: optax.GradientTransformation, trainable: Trainable, grads: Params,
                    terms: ppo.LossTerms) -> tuple[Trainable, dict[str, jax.Array]]:
    updates, opt_state = optimizer.update(grads, trainable.opt_state, trainable.params)
    params = optax.apply_updates(trainable.params, updates)
    metrics = {f"loss_{k}": v for k, v in ppo.summary(terms).items()} | {"grad_norm": optax.tree.norm(grads)}
    return Trainable(params, opt_state), metrics


class Updater:
    """One optimizer step per call, accumulated over micro-batches; fixed shardings with a mesh.

    Micro-batches are separate jitted calls, so each may have its own shape: `trim` (when given)
    cuts every micro-batch to its own length buckets, and one program is compiled per shape in
    use. The gradient is normalised by the tokens of the whole batch, so any split gives the
    full-batch result.
    """

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batch_size: int,
                 token_mask_key: str = "response_mask", mesh: Mesh | None = None,
                 param_shardings: Params | None = None, trim: Callable[[dict], dict] | None = None):
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.micro_batch_size, self.token_mask_key = micro_batch_size, token_mask_key
        self.mesh, self.param_shardings = mesh, param_shardings
        self.trim = trim
        self._accumulate = self._apply = None

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

    def _build(self, trainable: Trainable) -> None:
        accumulate = lambda p, g, t, b, n: accumulate_gradients(self.loss_fn, p, g, t, b, n)  # noqa: E731
        apply = lambda tr, g, t: apply_gradients(self.optimizer, tr, g, t)  # noqa: E731
        # The running gradient sum is donated: accumulating costs no second copy of the gradients.
        if self.mesh is None:
            self._accumulate = jax.jit(accumulate, donate_argnums=1)
            self._apply = jax.jit(apply, donate_argnums=0)
            return
        state = Trainable(self.param_shardings, self.opt_state_shardings(trainable.params))
        scalar = parallel.replicated(self.mesh)
        terms = ppo.LossTerms(scalar, scalar, scalar, scalar)
        self._accumulate = jax.jit(accumulate, donate_argnums=1, out_shardings=(self.param_shardings, terms))
        self._apply = jax.jit(apply, donate_argnums=0, in_shardings=(state, self.param_shardings, terms),
                              out_shardings=(state, scalar))

    def _put(self, micro_batch: dict[str, np.ndarray]) -> dict:
        if self.mesh is None:
            return micro_batch
        return {k: jax.device_put(v, parallel.batch_sharding(self.mesh, np.ndim(v))) for k, v in micro_batch.items()}

    def __call__(self, trainable: Trainable, batch: dict[str, np.ndarray]) -> tuple[Trainable, dict[str, float]]:
        micro_batches = split_micro_batches(batch, self.micro_batch_size)
        if self.trim is not None:
            micro_batches = [self.trim(micro) for micro in micro_batches]
        if self._accumulate is None:
            self._build(trainable)
        total_tokens = np.float32(max(float(np.sum(batch[self.token_mask_key])), 1.0))
        zero = np.zeros((), np.float32)
        with parallel.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            grads = jax.tree.map(jnp.zeros_like, trainable.params)
            terms = ppo.LossTerms(zero, zero, zero, zero)
            for micro in micro_batches:
                grads, terms = self._accumulate(trainable.params, grads, terms, self._put(micro), total_tokens)
            return self._apply(trainable, grads, terms)


def split_micro_batches(batch: dict[str, np.ndarray], micro_batch_size: int) -> list[dict[str, np.ndarray]]:
    rows = len(next(iter(batch.values())))
    if rows % micro_batch_size:
        raise ValueError(f"batch of {rows} rows is not a multiple of micro_batch_size={micro_batch_size}")
    return [{k: np.asarray(v)[start:start + micro_batch_size] for k, v in batch.items()}
            for start in range(0, rows, micro_batch_size)]


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
