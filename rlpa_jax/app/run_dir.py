"""How a job starts in its run directory, decided before anything is built or written.

A run directory (output_dir/name) holds one run of each job: PPO training (checkpoints/,
metrics.jsonl and what it exports), the SFT warm start (sft/, sft_history.jsonl) and DPO (dpo/,
dpo_history.jsonl), beside what they share (the tiny world's tokenizer/). A new run never writes
over an earlier run of its job: its first checkpoint would land among the old run's steps, orbax's
max_to_keep would then delete the old run's newest ones, the old run's start evaluation would
pass for the new one's and metrics.jsonl would mix the two. The ways to start (launch/train.py's
flags; sft.py and dpo.py take --fresh):

- `new` (the default): nothing of an earlier run of the job may be there; if something is, the
  program stops with one message naming the directory, what is there and the choices below.
- `resume` (--resume, training only): continue from the newest checkpoint; nothing to resume is an
  error naming the directory.
- `resume_if_present` (--resume-if-present): resume when there is a checkpoint, else start anew
  (a job a cluster may restart with the same command).
- `fresh` (--fresh): move the earlier run's files aside into `<run_dir>.<date of its newest
  file>` (never deleted; what the jobs share stays), say so, and start anew.

An earlier run is a saved checkpoint step or a non-empty history file: what a crashed start
leaves (config.yaml, an empty tensorboard/) is not one and is written over. With several
processes, all inspect the (shared) directory before process 0 moves anything, and all decide alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from pathlib import Path

from rlpa_jax.runtime import multihost

log = logging.getLogger(__name__)

START_MODES = ("new", "resume", "resume_if_present", "fresh")


@dataclasses.dataclass(frozen=True)
class Job:
    checkpoints: str  # its checkpoint folder in the run directory
    history: str  # its records, one JSON line each
    outputs: tuple[str, ...] = ()  # what else it writes there (moved aside with it)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.checkpoints, self.history, *self.outputs)


JOBS = {
    "train": Job("checkpoints", "metrics.jsonl", ("tensorboard", "wandb", "rewards.png", "hf", "config.yaml")),
    "sft": Job("sft", "sft_history.jsonl"),
    "dpo": Job("dpo", "dpo_history.jsonl"),
}


class RunDirectoryError(ValueError):
    """The run directory does not suit the way the job was asked to start; the message says what to do."""


def checkpoint_steps(directory: Path) -> list[int]:
    """The saved steps in a checkpoint folder (orbax's numbered step folders)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def earlier_run(run_dir: Path, job: Job) -> str | None:
    """What `run_dir` holds of an earlier run of `job`, in a few words, or None when nothing."""
    steps = checkpoint_steps(run_dir / job.checkpoints)
    history = run_dir / job.history
    found = [f"{job.checkpoints}/ steps {', '.join(map(str, steps))}"] if steps else []
    if history.is_file() and history.stat().st_size > 0:
        found.append(job.history)
    return "; ".join(found) or None


def aside_path(run_dir: Path, job: Job) -> Path:
    """Where `fresh` moves an earlier run: `<run_dir>.<date of its newest file>`, numbered if taken."""
    present = [run_dir / name for name in job.files if (run_dir / name).exists()]
    times = [p.stat().st_mtime for top in present for p in [top, *(top.rglob("*") if top.is_dir() else [])]]
    stamp = datetime.datetime.fromtimestamp(max(times)).strftime("%Y%m%d-%H%M%S")
    candidate, number = run_dir.with_name(f"{run_dir.name}.{stamp}"), 1
    while candidate.exists():
        number += 1
        candidate = run_dir.with_name(f"{run_dir.name}.{stamp}-{number}")
    return candidate


def move_aside(run_dir: Path, job: Job) -> Path:
    """Move the job's files out of `run_dir` into a new sibling folder; that folder."""
    target = aside_path(run_dir, job)
    target.mkdir()
    for name in job.files:
        if (run_dir / name).exists():
            os.rename(run_dir / name, target / name)
    return target


def prepare_run_dir(run_dir: str | Path, mode: str = "new", job: str = "train") -> bool:
    """Check `run_dir` for a `job` started as `mode` (and for `fresh`, move an earlier run aside);
    whether it resumes. Raises RunDirectoryError, naming the directory and the choices, before
    anything is written."""
    if mode not in START_MODES or (job != "train" and mode not in ("new", "fresh")):
        raise ValueError(f"{job} start mode {mode!r} is not one of "
                         f"{', '.join(START_MODES if job == 'train' else ('new', 'fresh'))}")
    run_dir, spec = Path(run_dir), JOBS[job]
    found = earlier_run(run_dir, spec)
    # Every process looks before process 0 moves anything (the directory is usually shared).
    found_anywhere = multihost.agree_on_any(found is not None)
    resumable = multihost.agree_on_any(bool(checkpoint_steps(run_dir / spec.checkpoints)))
    if mode == "resume" and not resumable:
        raise RunDirectoryError(
            f"--resume: nothing to resume in {run_dir} (no checkpoint in {run_dir / spec.checkpoints}). Start it "
            "without --resume, or check the run's name and output_dir")
    if mode in ("resume", "resume_if_present") and resumable:
        return True
    if found_anywhere and mode != "fresh":
        flags = "Continue it with --resume, give" if job == "train" else "Give"
        raise RunDirectoryError(
            f"{run_dir} holds an earlier {job} run ({found or 'seen by another process'}); a new one would mix "
            f"with it. {flags} the new run another name (name=<other> or output_dir=<dir>), or pass --fresh to "
            f"move the earlier run aside (to {run_dir}.<date>) and start anew")
    if found_anywhere:
        if multihost.is_main_process():
            target = move_aside(run_dir, spec)
            message = f"--fresh: moved the earlier {job} run in {run_dir} ({found}) to {target}"
            log.info("%s", message)
            print(message, flush=True)
        multihost.barrier("earlier run moved aside")
    return False
