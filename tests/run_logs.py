"""Reading back what a run logged: TensorBoard event files and Weights & Biases offline runs.

The W&B side is read by wandb's own reader of its run files (`wandb leet inspect --json`, one
record per line), so a test sees what a later `wandb sync` would upload."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from tensorboardX.proto import event_pb2


def tensorboard_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every event file under `directory` (TFRecord framing: length, its
    CRC, the event, its CRC)."""
    found = {}
    for path in sorted(Path(directory).iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            found.update({(value.tag, event.step): value.simple_value for value in event.summary.value})
            at += 12 + length + 4
    return found


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the one offline W&B run under <run_dir>/wandb/, as wandb's reader prints it."""
    runs = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run([str(wandb_cli), "leet", "inspect", str(runs[0]), "--json"], capture_output=True,
                          text=True, timeout=300)  # a hang guard only
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def wandb_history(records: list[dict]) -> list[dict]:
    """The logged rows (what run.log was given), W&B's own underscored entries left out."""
    return [{k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in records if r["type"] == "history"]


def wandb_scalars(records: list[dict]) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the history, each "<phase>/<key>" at its row's "<phase>/step"."""
    found = {}
    for row in wandb_history(records):
        for tag, value in row.items():
            phase = tag.split("/", 1)[0]
            if tag != f"{phase}/step":
                found[(tag, row[f"{phase}/step"])] = value
    return found


def wandb_config(records: list[dict]) -> dict:
    """The config the run recorded (W&B's own `_wandb` entry left out)."""
    config = {}
    for record in records:
        if record["type"] == "run":
            config.update(record["run"].get("config", {}).get("update", {}))
        elif record["type"] == "config":
            config.update(record["config"].get("update", {}))
    return {k: v for k, v in config.items() if k != "_wandb"}


@contextlib.contextmanager
def offline_wandb(directory: Path):
    """W&B in offline mode with every file it keeps outside a run (settings, cache) under
    `directory`: no network, no account, nothing in the home directory."""
    saved = dict(os.environ)
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(directory),
                      WANDB_CACHE_DIR=str(directory / "cache"), WANDB_CONFIG_DIR=str(directory / "config"),
                      WANDB_DATA_DIR=str(directory / "data"))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
