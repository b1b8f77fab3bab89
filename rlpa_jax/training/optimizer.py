"""The optimizer every stage uses: global-norm clipping, then AdamW on float32 master weights with
a linear warm-up and a cosine decay (the paper's recipe)."""

from __future__ import annotations

import optax


def lr_schedule(peak_lr: float, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak."""
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
