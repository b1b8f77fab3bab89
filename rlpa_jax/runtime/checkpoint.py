"""Orbax checkpoints: save, restore (straight into shardings) and find the latest step.

A checkpoint step holds a dict of pytrees ("state": actor/critic params, optimizer states, RNG ...)
and a JSON document ("meta": model config, data position, anything plain), so a run can resume
exactly and export its policy without the code that trained it. A run may add JSON documents of
its own beside them (the `turn` schedule's live conversations), read back by `resume`, and may
resume only part of a state (`partial`: a run without a critic from a checkpoint with one).

Saves are atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a save cut short leaves a directory that is never listed as a step. Resuming
(`resume`) still survives a step damaged later (a truncated array file, a deleted or torn metadata
file): it falls back to the newest step that reads, and moves the damaged ones aside. An error that
shows no damage (an I/O or permission error, memory, anything `classify_read_failure` does not know)
stops the resume instead and moves nothing: the step may be good. Several processes agree on every
step's outcome, so they resume from the same step or stop together.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# One error for "this checkpoint cannot be used", HF or orbax.
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.runtime import multihost
from rlpa_jax.runtime.hf_export import export_hf
from rlpa_jax.runtime.read_failures import (
    DAMAGED,
    READ,
    TROUBLE,
    classify_read_failure,
    combine_outcomes,
    describe_failure,
    first_access_error,
)

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"  # <step>.corrupt: a damaged step, kept for inspection


class CheckpointReadError(CheckpointError):
    """A checkpoint step could not be read, and the error shows no damage to it (an I/O or
    permission error, memory, an error not known as damage): the step may be good, so resuming
    stops instead of moving it aside and going back to an older one."""


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with our two items, "state" and "meta"."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = True,
             documents: dict[str, Any] | None = None) -> None:
        """`documents`: more JSON items by name (not "state" or "meta"), each its own directory in the step."""
        extra = {name: ocp.args.JsonSave(document) for name, document in (documents or {}).items()}
        if extra.keys() & {"state", "meta"}:
            raise ValueError(f"checkpoint documents may not be named 'state' or 'meta' (got {sorted(extra)})")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), **extra)
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
        state, meta, _ = self._read(self._require_step(step), abstract_state, ())
        return state, meta

    def _read(self, step: int, abstract_state: Any, documents: Sequence[str], partial: bool = False,
              manager: ocp.CheckpointManager | None = None) -> tuple[Any, dict, dict]:
        """(state, meta, {name: document or None where the step has none}), read by `manager`
        (default: the one that saves)."""
        manager = manager or self._manager
        present = [name for name in documents if (self.directory / str(step) / name).is_dir()]
        json_items = {"meta": ocp.args.JsonRestore()} | {name: ocp.args.JsonRestore() for name in present}
        if partial and abstract_state is not None:
            state = self._read_entries(step, abstract_state)
            restored = manager.restore(step, args=ocp.args.Composite(**json_items))
        else:
            state_args = (ocp.args.StandardRestore(abstract_state) if abstract_state is not None
                          else ocp.args.StandardRestore())
            restored = manager.restore(step, args=ocp.args.Composite(state=state_args, **json_items))
            state = restored["state"]
        return state, restored["meta"], {name: restored[name] if name in present else None for name in documents}

    def _read_entries(self, step: int, abstract_state: dict) -> dict:
        """The entries of `abstract_state` (a dict) out of the step's state; the step's other
        entries stay on disk, named in one INFO line."""
        # The manager that saved a step holds a Standard handler for "state", and only the PyTree
        # handler restores a part of a tree: a read-only manager of its own reads it (of this process
        # alone: see `resume`).
        manager = _checkpoint_manager(self.directory, this_process_only=True)
        try:
            saved = _state_tree(manager, step)
            target = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=abstract_state, restore_args=target, partial_restore=True)))["state"]
        finally:
            manager.close()
        left = sorted(set(saved) - set(abstract_state)) if isinstance(saved, dict) else []
        if left:
            log.info("checkpoint %s step %d: its %s not restored (this run's state has none)", self.directory, step,
                     ", ".join(left))
        return state

    def restore_latest_readable(self, abstract_state: Any = None) -> tuple[int, Any, dict]:
        """(step, state, meta) from the newest step that can be read (see `resume`)."""
        step, state, meta, _ = self.resume(abstract_state)
        return step, state, meta

    def resume(self, abstract_state: Any = None, documents: Sequence[str] = (),
               partial: bool = False) -> tuple[int, Any, dict, dict]:
        """(step, state, meta, {name: document}) from the newest step that can be read, for
        resuming a run; each of `documents` (JSON items save() wrote) is None where the step has
        none, and a step whose document is damaged counts as damaged. `partial` (with a dict
        `abstract_state`): a step's state may hold more entries than `abstract_state`; only its
        entries are read (this needs the step's state metadata, which a full restore with shapes
        does not).

        A step whose read fails with damage (`classify_read_failure`: a missing, truncated or torn
        file, metadata that does not parse, arrays or a tree that do not match `abstract_state`) is
        logged (step and cause) and the next older step is tried. Once one reads, the damaged newer
        steps are moved aside to `<directory>/<step>.corrupt` (kept for inspection, no longer
        listed, so the run's next saves of those step numbers do not collide). When none reads,
        CheckpointError names the directory and each step with its failure, and nothing is moved:
        the fault may be the caller's `abstract_state` (a state tree the code no longer builds), not
        the files. No steps at all is a CheckpointError too; callers that may start fresh check
        `latest_step()` first.

        Any other failure (an I/O, permission or memory error, an error not known as damage) stops
        at once with CheckpointReadError naming the step directory and the cause, and nothing is
        moved: a good step is never set aside for a fault of the machine. Ctrl-C stays a
        KeyboardInterrupt.

        With several processes, processes that list different steps stop with CheckpointReadError;
        then every process reads each step (its own shards) and all combine the
        outcomes (`combine_outcomes`): one process's damage sends all back to the older step, one
        process's other failure stops all with the same error, and process 0 alone moves the
        damaged steps aside once all agreed. Each process reads alone (`_process_reader`): orbax's
        own restore ends in a barrier of all processes, which a process whose read failed would
        never reach.
        """
        self._manager.reload()  # another process, or an earlier call, may have changed the directory
        steps = sorted(self.all_steps(), reverse=True)
        every = multihost.allgather_json(steps)
        if any(listed != every[0] for listed in every):  # a stale listing would take a good step for a deleted one
            seen = "; ".join(f"process {index}: {listed}" for index, listed in enumerate(every))
            raise CheckpointReadError(f"{self.directory}: the processes list different checkpoint steps ({seen}); "
                                      "nothing was moved: resume again once every host sees the same directory")
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint steps to resume from")
        failures: list[tuple[int, str]] = []
        reader = _process_reader(self.directory)
        try:
            for step in steps:
                kind, reason, error, read = self._attempt(reader, step, abstract_state, documents, partial)
                outcome, reason = combine_outcomes(multihost.allgather_json([kind, reason]))
                if outcome == TROUBLE:
                    if error is not None and not isinstance(error, Exception):
                        raise error  # Ctrl-C on this process: the others stop with CheckpointReadError
                    raise CheckpointReadError(self._trouble_message(step, reason, failures)) from error
                if outcome == DAMAGED:
                    log.warning("checkpoint %s step %d cannot be read (%s); trying an older step",
                                self.directory, step, reason)
                    failures.append((step, reason))
                    continue
                state, meta, found = read
                break
            else:
                tried = "\n".join(f"  step {step}: {reason}" for step, reason in failures)
                raise CheckpointError(f"{self.directory}: no checkpoint step can be read (tried {len(failures)}; "
                                      f"nothing was moved or deleted):\n{tried}")
        finally:
            reader.close()
        if failures:
            self._move_aside([bad for bad, _ in failures])
            log.warning("resuming from step %d of %s; damaged steps moved aside: %s", step, self.directory,
                        ", ".join(f"{bad}{CORRUPT_SUFFIX}" for bad, _ in failures))
        return step, state, meta, found

    def _attempt(self, reader: ocp.CheckpointManager, step: int, abstract_state: Any, documents: Sequence[str],
                 partial: bool) -> tuple[str, str, BaseException | None, Any]:
        """(READ, "", None, (state, meta, found)) or (DAMAGED or TROUBLE, one-line cause, the
        exception, None) for this process's read of `step`."""
        try:
            return READ, "", None, self._read(step, abstract_state, documents, partial, reader)
        except BaseException as caught:  # KeyboardInterrupt too: the other processes must hear of it
            error = caught
        kind, reason = classify_read_failure(error), describe_failure(error)
        if isinstance(error, Exception):
            # orbax asks `exists()` before reading metadata, which answers False for a directory it
            # may not list: a permission problem then looks like a missing file or a tree unlike the
            # target's. The files themselves say what is wrong.
            blocked = first_access_error(self.directory / str(step))
            if blocked is not None:
                kind, reason = TROUBLE, f"{describe_failure(blocked)} (where orbax saw {type(error).__name__})"
        return kind, reason, error, None

    def _trouble_message(self, step: int, reason: str, failures: list[tuple[int, str]]) -> str:
        damaged = (f"; the damaged newer step{'s' if len(failures) > 1 else ''} "
                   f"{', '.join(str(bad) for bad, _ in failures)} stay{'' if len(failures) > 1 else 's'} in place too"
                   if failures else "")
        return (f"{self.directory / str(step)}: cannot read checkpoint step {step} ({reason}); this is no damage "
                f"that sets a step aside (an I/O, permission or memory problem, or an error rlpa-jax does not know), "
                f"so nothing was moved and no older step was used{damaged}: fix the cause and resume again")

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f"{step}{CORRUPT_SUFFIX}"
                copy = 1
                while target.exists():  # the same step number went bad before
                    target = self.directory / f"{step}{CORRUPT_SUFFIX}.{copy}"
                    copy += 1
                source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("rlpa_jax.runtime.checkpoint.move_aside")
        self._manager.reload()

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


def policy_meta(config: Qwen2Config, tokenizer_dir: str | Path, system_prompt: str) -> dict:
    """What a checkpoint says about its policy, so evaluation, export and `model.init_checkpoint`
    need no config: the model, the tokenizer directory and the system prompt's name
    (configs/prompts/<name>.txt) it was trained with."""
    return {"model_config": model_config_to_meta(config), "tokenizer_dir": str(Path(tokenizer_dir).absolute()),
            "system_prompt": system_prompt}


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


def _checkpoint_manager(directory: Path, this_process_only: bool = False) -> ocp.CheckpointManager:
    # PyTree handler (not Standard): only it restores a part of the saved tree.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=_read_only_options(this_process_only), item_handlers=handlers)


def _process_reader(directory: Path) -> ocp.CheckpointManager:
    """A read-only manager whose restores wait for no other process (handlers from the restore
    arguments): each process reads its own shards, and `resume` agrees on the outcome itself."""
    return ocp.CheckpointManager(directory, options=_read_only_options(this_process_only=True))


def _read_only_options(this_process_only: bool) -> ocp.CheckpointManagerOptions:
    # save_interval_steps=0 and create=False: what read_only implies (orbax warns when it must set them).
    if not this_process_only:
        return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                        multiprocessing_options=alone)


def _state_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    """A step's state tree as saved, with array metadata for leaves (no array is read)."""
    tree = manager.item_metadata(step)["state"]
    return getattr(tree, "tree", tree)


def actor_params_path(state_tree: Any, directory: Path) -> tuple:
    """Where the policy parameters sit in a checkpoint's state tree (from its metadata).

    A PPO run saves its TrainState as {"actor": Trainable(params, opt_state), "reference": ...,
    and "critic" when it has one} (rl/train_state.py; checkpoints from before the TrainState hold
    the same dict), which orbax stores with the actor as the dict {"params", "opt_state"} (what
    orbax restores a NamedTuple as); launch/sft.py and launch/dpo.py save {"actor": params}.
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
    else on this process's first device.
    """
    manager = _checkpoint_manager(directory)
    try:
        steps = list(manager.all_steps())
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint for step {step}; steps found: {sorted(steps)}")
        state_tree = _state_tree(manager, step)
        path = actor_params_path(state_tree, directory)
        leaves = state_tree
        for key in path:
            leaves = leaves[key]
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
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


def read_meta(directory: Path, step: int | None = None) -> dict:
    """A step's meta (default: the latest step's), read without touching the arrays or writing."""
    manager = _checkpoint_manager(directory)
    try:
        step = max(manager.all_steps()) if step is None else step
        if step not in manager.all_steps():
            raise FileNotFoundError(f"{directory}: no checkpoint for step {step}; steps found: "
                                    f"{sorted(manager.all_steps())}")
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    finally:
        manager.close()


def _nest(path: tuple, leaf: Any) -> Any:
    """{"actor": {"params": leaf}} for path ("actor", "params")."""
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def export_checkpoint(checkpoint: str | Path, output: str | Path, step: int | None = None,
                      tokenizer: str | Path | None = None, dtype: str = "float32",
                      shardings_for: Callable[[Qwen2Config], Any] | None = None) -> Path:
    """A checkpoint's policy as a Hugging Face directory (loads with AutoModelForCausalLM). Reads only
    the policy (not the critic, reference or optimizer state); the meta names the model config and
    the tokenizer directory (`tokenizer` overrides it).

    `shardings_for(model config)` places the restored policy (e.g. over a global mesh: with several
    processes every one must call this, and process 0 alone writes); without it the policy lands
    whole on this process's first device."""
    directory = checkpoint_directory(checkpoint)
    shardings = None
    if shardings_for is not None:  # the model's shape, hence its shardings, is in the meta
        shardings = shardings_for(model_config_from_meta(read_meta(directory, step), str(directory)))
    params, meta, _ = restore_actor_params(directory, step, shardings)
    config = model_config_from_meta(meta, str(directory))
    tokenizer = tokenizer or (Path(meta["tokenizer_dir"]) if meta.get("tokenizer_dir") else None)
    return export_hf(params, config, Path(output), tokenizer_dir=tokenizer, dtype=dtype)
