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

from rlpa_jax.model.hf import export_hf
from rlpa_jax.model.qwen2 import Params, Qwen2Config


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


# ---------------------------------------------------------------------------------------------
# Reading only the policy out of a run's checkpoint (for evaluation and export)


def _step_dirs(directory: Path) -> list[int]:
    return sorted(int(child.name) for child in directory.iterdir() if child.is_dir() and child.name.isdigit())


def checkpoint_directory(path: str | Path) -> Path:
    """The orbax directory holding numbered steps: `path` itself, or its checkpoints/ or sft/."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} does not exist (expected e.g. runs/<name>/checkpoints)")
    for candidate in (path, path / "checkpoints", path / "sft"):
        if candidate.is_dir() and _step_dirs(candidate):
            return candidate
    raise FileNotFoundError(
        f"{path}: no checkpoint steps found (expected numbered step directories here or in its "
        f"checkpoints/ or sft/ subdirectory, as written by launch/train.py and launch/sft.py)")


def _checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    # PyTree handler (not Standard): only it restores a part of the saved tree.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def actor_params_path(state_tree: Any, directory: Path) -> tuple:
    """Where the policy parameters sit in a checkpoint's state tree (from its metadata).

    A PPO run saves {"actor": Trainable(params, opt_state), ...}, which orbax stores as the dict
    {"params", "opt_state"} (what orbax restores a NamedTuple as); launch/sft.py saves {"actor": params}.
    """
    if not isinstance(state_tree, dict) or "actor" not in state_tree:
        keys = sorted(state_tree) if isinstance(state_tree, dict) else type(state_tree).__name__
        raise KeyError(f"{directory}: checkpoint state has no 'actor' entry (found {keys}); "
                       "expected a checkpoint from launch/train.py or launch/sft.py")
    actor = state_tree["actor"]
    if isinstance(actor, dict) and set(actor) == {"params", "opt_state"}:
        return ("actor", "params")
    return ("actor",)


def restore_actor_params(directory: Path, step: int | None = None, shardings: Any = None) -> tuple[Params, dict, int]:
    """(policy params, meta, step) read from an orbax checkpoint, restoring nothing else.

    The optimizer state, critic and reference are left on disk (for a 3B run they are several
    times the policy's size). Arrays land on `shardings` (a tree like the params) when given,
    else on the first device.
    """
    manager = _checkpoint_manager(directory)
    try:
        steps = list(manager.all_steps())
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint for step {step}; steps found: {sorted(steps)}")
        state_tree = manager.item_metadata(step)["state"]
        state_tree = getattr(state_tree, "tree", state_tree)
        path = actor_params_path(state_tree, directory)
        leaves = state_tree
        for key in path:
            leaves = leaves[key]
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, leaves)
        target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                                                          sharding=sharding), leaves, shardings)
        item = _nest(path, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    params = restored["state"]
    for key in path:
        params = params[key]
    return params, dict(restored["meta"] or {}), int(step)


def _nest(path: tuple, leaf: Any) -> Any:
    """{"actor": {"params": leaf}} for path ("actor", "params")."""
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def export_checkpoint(checkpoint: str | Path, output: str | Path, step: int | None = None,
                      tokenizer: str | Path | None = None, dtype: str = "float32") -> Path:
    """A checkpoint's policy as a Hugging Face directory (loads with AutoModelForCausalLM). Reads only
    the policy (not the critic, reference or optimizer state); the meta names the model config and
    the tokenizer directory (`tokenizer` overrides it)."""
    directory = checkpoint_directory(checkpoint)
    params, meta, _ = restore_actor_params(directory, step)
    config = model_config_from_meta(meta, str(directory))
    tokenizer = tokenizer or (Path(meta["tokenizer_dir"]) if meta.get("tokenizer_dir") else None)
    return export_hf(params, config, Path(output), tokenizer_dir=tokenizer, dtype=dtype)
