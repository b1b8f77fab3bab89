"""Weights & Biases beside TensorBoard (rl/metrics.py): the same scalars at the same steps, the
config, and a clear error without the package. wandb runs for real, offline (no network, no
account); its run files are read back with its own reader (tests/run_logs.py)."""

from __future__ import annotations

import math
import sys

import pytest
from run_logs import offline_wandb, tensorboard_scalars, wandb_config, wandb_history, wandb_records, wandb_scalars

from rlpa_jax.app.build import wandb_options
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.tree import to_dict
from rlpa_jax.rl.metrics import MetricsLog, MissingExtra, WandbOptions

# As a run writes them: the SFT steps, the held-out evaluation, then PPO iterations counted from 0
# again, with entries TensorBoard leaves out (a string, a NaN).
RECORDS = [
    ("sft", 0, {"loss": 2.5, "tokens": 96}),
    ("sft", 1, {"loss": 2.25, "tokens": 96}),
    ("eval_start", 0, {"reward": 0.125, "profile_f1": 0.5}),
    ("ppo", 0, {"reward": 0.25, "kl": 0.0, "samples": 8, "note": "warm-up", "ratio": float("nan")}),
    ("ppo", 1, {"reward": 0.375, "kl": 0.001953125, "samples": 8, "note": "", "ratio": 1.0}),
]


def test_wandb_gets_the_tensorboard_scalars_at_the_same_steps_and_the_config(tmp_path):
    config = {"name": "tiny", "ppo": {"actor_lr": 3e-05, "iterations": 2}, "model": {"path": None}}
    with offline_wandb(tmp_path / "wandb_home"):
        log = MetricsLog(tmp_path / "run", tensorboard=True,
                         wandb=WandbOptions(project="rlpa-test", name="tiny-run", config=config))
        for phase, step, metrics in RECORDS:
            log.write(phase, step, metrics)
        log.close()
        records = wandb_records(tmp_path / "run")
    logged = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    expected = {(f"{phase}/{key}", step): value for phase, step, metrics in RECORDS for key, value in metrics.items()
                if not isinstance(value, str) and math.isfinite(value)}
    assert set(logged) == set(expected)
    assert wandb_scalars(records) == expected
    # TensorBoard keeps float32 (simple_value): equal to W&B's float64 to float32's precision.
    assert logged == {tag: pytest.approx(value, rel=2**-23) for tag, value in expected.items()}
    # One row per record, each with its phase's step (the x-axis each phase is plotted against).
    assert [{k: v for k, v in row.items() if k.endswith("/step")} for row in wandb_history(records)] == [
        {f"{phase}/step": step} for phase, step, _ in RECORDS]
    axes = {r["metric"]["glob_name"]: r["metric"]["step_metric"] for r in records
            if r["type"] == "metric" and "glob_name" in r["metric"]}
    assert axes == {"sft/*": "sft/step", "eval_start/*": "eval_start/step", "ppo/*": "ppo/step"}
    assert wandb_config(records) == config
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "rlpa-test" and run["display_name"] == "tiny-run"


def test_the_config_options_name_the_wandb_run():
    assert wandb_options(load_config(None, [])) is None  # off by default
    config = load_config(None, ["logging.wandb=true", "name=exp1", "logging.wandb_project=proj"])
    options = wandb_options(config)
    assert (options.project, options.name, options.entity) == ("proj", "exp1", None)
    assert options.config == to_dict(config)
    named = wandb_options(load_config(None, ["logging.wandb=true", "logging.wandb_run_name=first try",
                                             "logging.wandb_entity=lab"]))
    assert (named.name, named.entity) == ("first try", "lab")


def test_without_the_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's way to make `import wandb` fail
    with pytest.raises(MissingExtra, match=r"logging.wandb=true needs the wandb package.*'\.\[wandb\]'"):
        MetricsLog(tmp_path, tensorboard=False, wandb=WandbOptions(project="p", name="n"))
    MetricsLog(tmp_path, tensorboard=False).close()  # off: wandb is never imported
