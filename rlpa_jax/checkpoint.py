"""Orbax checkpoints: save, restore (straight into shardings) and find the latest step.

A checkpoint step holds a dict of pytrees ("state": actor/critic params, optimizer states, RNG ...)
and a JSON document ("meta": model config, data position, anything plain), so a run can resume
exactly and export its policy without the code that trained it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlpa_jax.model.qwen2 import Qwen2Config


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with our two items, "state" and "meta"."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = True) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        if wait:
            self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._require_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
        """Restore (state, meta). `abstract_state` (arrays or ShapeDtypeStructs with shardings)
        places every array straight into its sharding; without it arrays come back as saved."""
        step = self._require_step(step)
        state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def _require_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no checkpoint steps found")
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; steps found: {steps}")
        return step

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def model_config_to_meta(config: Qwen2Config) -> dict:
    return dataclasses.asdict(config)


def model_config_from_meta(meta: dict, source: str) -> Qwen2Config:
    try:
        return Qwen2Config(**meta["model_config"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{source}: checkpoint meta has no valid 'model_config' ({error})") from None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings when present) for restoring into the same placement."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
