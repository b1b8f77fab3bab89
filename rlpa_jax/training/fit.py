"""The offline training loop (SFT, DPO): their update, one optimizer step per scheduled batch, a record of each."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar

from jax.sharding import Mesh
from tqdm.auto import tqdm

from rlpa_jax.model.qwen2 import Params
from rlpa_jax.runtime import multihost
from rlpa_jax.training.optimizer import make_optimizer
from rlpa_jax.training.updater import Batch, LossFn, Updater

Rows = TypeVar("Rows")


class OfflineSettings(Protocol):
    """What an offline stage's settings say about its update (config.tree.SFTConfig, offline.dpo.DPOSettings)."""

    steps: int
    learning_rate: float
    batch_size: int
    warmup_steps: int


def offline_updater(loss_fn: LossFn, loss_mask: Callable[[Batch], Any], settings: OfflineSettings,
                    mesh: Mesh | None = None, param_shardings: Params | None = None) -> Updater:
    """The update of an offline stage: the shared AdamW schedule over settings.steps, warmed up over
    settings.warmup_steps of them (all of them at most), one micro-batch of settings.batch_size rows a step."""
    warmup_ratio = min(settings.warmup_steps / settings.steps, 1.0)
    optimizer = make_optimizer(settings.learning_rate, settings.steps, warmup_ratio=warmup_ratio)
    return Updater(loss_fn, optimizer, micro_batch_size=settings.batch_size, loss_mask=loss_mask, mesh=mesh,
                   param_shardings=param_shardings)


def fit(updater: Updater, params: Params, schedule: Sequence[Rows], make_batch: Callable[[Rows], Batch],
        record: Callable[[dict[str, float]], dict[str, float]], desc: str,
        progress: bool = True) -> tuple[Params, list[dict[str, float]]]:
    """Steps `params` once per entry of `schedule` (the batch `make_batch` builds from it); returns the
    trained parameters and one record per step (its number, then what `record` keeps of the step's
    metrics). `params` is donated to the jitted step: use the returned parameters afterwards.

    With several processes every one runs the same schedule on the same host batches (the
    Updater places each process's rows); a step's metrics are replicated scalars, read locally."""
    trainable = updater.init(params)
    history: list[dict[str, float]] = []
    bar = tqdm(schedule, desc=desc, disable=not progress or not multihost.is_main_process(), dynamic_ncols=True)
    for step, rows in enumerate(bar, start=1):
        trainable, metrics = updater(trainable, make_batch(rows))
        history.append({"step": float(step)} | record({k: float(v) for k, v in multihost.fetch(metrics).items()}))
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return trainable.params, history
