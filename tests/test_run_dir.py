"""A job never starts over an earlier run of itself in its run directory (app/run_dir.py): a new
run stops naming the directory and the choices, --resume needs something to resume, --fresh moves
the earlier run aside whole and leaves what the jobs share. The trainer-level checks (two real
runs, byte for byte) are in tests/test_trainer.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from rlpa_jax.app.run_dir import JOBS, RunDirectoryError, earlier_run, prepare_run_dir

REPO = Path(__file__).resolve().parents[1]


def contents(directory: Path) -> dict[str, str]:
    """Every file under `directory` by relative path, with its sha256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def earlier_training_run(run_dir: Path) -> None:
    for step in (2, 4):
        (run_dir / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (run_dir / "checkpoints" / str(step) / "state" / "data").write_bytes(bytes([step]) * 64)
    (run_dir / "metrics.jsonl").write_text('{"phase": "eval_start", "step": 0}\n')
    (run_dir / "config.yaml").write_text("name: tiny\n")
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    (run_dir / "sft").mkdir()
    (run_dir / "sft" / "800").mkdir()


def test_a_new_run_into_an_earlier_one_stops_naming_it_and_the_choices_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "tiny"
    earlier_training_run(run_dir)
    before = contents(run_dir)
    with pytest.raises(RunDirectoryError, match=rf"{run_dir} holds an earlier train run \(checkpoints/ steps 2, 4; "
                                                r"metrics.jsonl\).*--resume.*name=<other>.*--fresh"):
        prepare_run_dir(run_dir, "new")
    assert contents(run_dir) == before


def test_resume_needs_a_checkpoint_and_resume_if_present_does_not(tmp_path):
    with pytest.raises(RunDirectoryError, match=rf"--resume: nothing to resume in {tmp_path / 'typo'}"):
        prepare_run_dir(tmp_path / "typo", "resume")
    assert not (tmp_path / "typo").exists()
    assert prepare_run_dir(tmp_path / "typo", "resume_if_present") is False
    earlier_training_run(tmp_path / "tiny")
    assert prepare_run_dir(tmp_path / "tiny", "resume") is True
    assert prepare_run_dir(tmp_path / "tiny", "resume_if_present") is True


def test_what_a_crashed_start_leaves_is_no_earlier_run(tmp_path):
    (tmp_path / "tiny" / "checkpoints").mkdir(parents=True)  # created, never saved into
    (tmp_path / "tiny" / "config.yaml").write_text("name: tiny\n")
    (tmp_path / "tiny" / "metrics.jsonl").write_text("")
    assert earlier_run(tmp_path / "tiny", JOBS["train"]) is None
    assert prepare_run_dir(tmp_path / "tiny", "new") is False


def test_fresh_moves_the_earlier_run_aside_whole_and_keeps_what_jobs_share(tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    earlier_training_run(run_dir)
    before = contents(run_dir)
    assert prepare_run_dir(run_dir, "fresh") is False
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.")]
    assert f"moved the earlier train run in {run_dir}" in capsys.readouterr().out
    moved = {name: digest for name, digest in before.items() if not name.startswith(("tokenizer/", "sft/"))}
    assert contents(aside) == moved  # byte for byte
    assert sorted(p.name for p in run_dir.iterdir()) == ["sft", "tokenizer"]
    earlier_training_run(tmp_path / "again")
    prepare_run_dir(tmp_path / "again", "fresh")
    assert prepare_run_dir(run_dir, "new") is False  # nothing of a training run left


def test_sft_and_dpo_runs_are_their_own(tmp_path):
    run_dir = tmp_path / "tiny"
    earlier_training_run(run_dir)  # with an SFT run's step (sft/800), no DPO run
    assert prepare_run_dir(run_dir, "new", "dpo") is False
    (run_dir / "sft_history.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(RunDirectoryError, match=r"holds an earlier sft run \(sft/ steps 800; sft_history.jsonl\)"
                                                r".*Give the new run"):
        prepare_run_dir(run_dir, "new", "sft")
    with pytest.raises(ValueError, match=r"sft start mode 'resume' is not one of new, fresh"):
        prepare_run_dir(run_dir, "resume", "sft")


def test_train_py_resume_on_a_missing_run_exits_non_zero_naming_the_directory(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--resume", f"output_dir={tmp_path}",
                             "name=typo"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert f"train.py: --resume: nothing to resume in {tmp_path / 'typo'}" in result.stderr
    assert "Traceback" not in result.stderr
