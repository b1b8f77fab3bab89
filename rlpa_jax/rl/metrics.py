"""Run metrics: one JSON line per step, TensorBoard scalars, optionally Weights & Biases, and
reward curves as a PNG.

With several processes, process 0 alone writes (the metrics it is given are already reduced over
processes) and reads: what it reads back is handed to every process, so all take the same
decisions (a resume's held-out start, for one) even without a file system they all see.

Weights & Biases (logging.wandb, the `wandb` extra) gets the scalars TensorBoard gets, under the
same "<phase>/<key>" names, and the run's config. W&B keeps one step counter per run that only
grows, while the phases count their own steps (sft 0..n, ppo 0..n, eval_start 0), so each phase
logs its step as "<phase>/step" and is plotted against it (wandb's define_metric), the same x-axis
TensorBoard shows. Its files go to <run>/wandb/; a resumed training run starts a new W&B run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import matplotlib

from rlpa_jax.runtime import multihost

matplotlib.use("Agg")  # files only: runs happen on headless hosts
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("reward", "mean turn reward"), ("profile_f1", "profile F1"), ("response_reward", "response reward"),
          ("kl", "KL to reference"), ("output_scale", "output scale (1 / temperature)"))


class MissingExtra(ValueError):
    """An option that needs a package of an optional extra which is not installed."""


@dataclass(frozen=True)
class WandbOptions:
    """Where a Weights & Biases run goes (logging.wandb_*) and the config it records."""

    project: str
    name: str
    entity: str | None = None  # None: the account's default entity
    config: Mapping[str, Any] = field(default_factory=dict)


def start_wandb_run(options: WandbOptions, run_dir: Path):
    """A W&B run writing under <run_dir>/wandb/ (imported here: wandb is an optional extra)."""
    try:
        import wandb
    except ImportError as error:
        raise MissingExtra("logging.wandb=true needs the wandb package, which is not installed: "
                           "pip install -e '.[wandb]' (the `wandb` extra), or set logging.wandb=false") from error
    return wandb.init(project=options.project, entity=options.entity, name=options.name, dir=str(run_dir),
                      config=dict(options.config))


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The entries of a record that are logged as scalars: finite numbers, the step aside."""
    return {key: value for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)}


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: WandbOptions | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writes = multihost.is_main_process()
        self._writer = None
        self._wandb = None
        self._wandb_phases: set[str] = set()
        if tensorboard and self._writes:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb is not None and self._writes:
            self._wandb = start_wandb_run(wandb, Path(run_dir))

    def write(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        if not self._writes:
            return
        record = {"phase": phase, "step": step} | {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in scalars(record).items():
                self._writer.add_scalar(f"{phase}/{key}", value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._write_wandb(phase, step, scalars(record))

    def _write_wandb(self, phase: str, step: int, values: Mapping[str, float]) -> None:
        if phase not in self._wandb_phases:  # the phase's own x-axis (module docstring)
            self._wandb.define_metric(f"{phase}/step")
            self._wandb.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._wandb_phases.add(phase)
        self._wandb.log({f"{phase}/step": step} | {f"{phase}/{key}": value for key, value in values.items()})

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop records of `phase` past `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self._writes or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and not (json.loads(line)["phase"] == phase and json.loads(line)["step"] > step)]
        self.path.write_text("".join(line + "\n" for line in kept))

    def records(self, phase: str) -> list[dict]:
        """Every record of `phase` (process 0's file; with several processes a collective)."""
        records = []
        if self._writes and self.path.exists():
            records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["phase"] == phase]
        return multihost.allgather_json(records)[0] if multihost.process_count() > 1 else records

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value):
    try:
        return float(value) if not isinstance(value, (int, str)) else value
    except (TypeError, ValueError):
        return str(value)


def plot_training(log: MetricsLog, output: Path, baseline: Mapping[str, float] | None = None,
                  final: Mapping[str, float] | None = None) -> Path:
    """Reward curves of the training rollouts per PPO iteration, with the held-out evaluations
    before (`baseline`) and after (`final`) PPO as dashed lines. Each iteration draws its own few
    users, so the training curve is noisy; the held-out lines (the same users twice) compare."""
    records = log.records("ppo")  # a collective with several processes: every process calls this
    if not multihost.is_main_process():  # process 0 alone draws the file
        return output
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        steps = [r["step"] for r in records if key in r]
        ax.plot(steps, [r[key] for r in records if key in r], marker="o", markersize=3, label="training rollouts")
        for evaluation, color, label in ((baseline, "gray", "held-out, before PPO"), (final, "tab:green", "held-out, after PPO")):
            if evaluation and key in evaluation:
                ax.axhline(evaluation[key], color=color, linestyle="--", label=label)
        if baseline or final:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
