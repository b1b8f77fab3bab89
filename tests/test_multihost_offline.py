"""launch/sft.py, dpo.py and export_hf.py as two processes against one."""

from __future__ import annotations

import json
from pathlib import Path

import multihost_worker as worker
import numpy as np
import pytest
from multihost_launch import PPO_DEADLINE_S, REPO, start_worker, worker_results
from safetensors.numpy import load_file

from rlpa_jax.app import build
from rlpa_jax.runtime.checkpoint import export_checkpoint

# ---------------------------------------------------------------------------------------------
# SFT, DPO and the HF export over two processes


def history(directory: Path, job: str) -> list[dict]:
    return [json.loads(line) for line in (directory / "runs" / "tiny" / f"{job}_history.jsonl").read_text().splitlines()]


# What each step learned (DPO's reward accuracy is left out: it counts margins that may be 0 +- 1e-7).
OFFLINE_COMPARED = {"sft": ("loss", "grad_norm", "tokens"), "dpo": ("loss", "grad_norm", "reward_margin")}


def test_sft_dpo_and_export_over_two_processes_equal_one_process(tmp_path):
    """launch/sft.py, launch/dpo.py --init <that SFT checkpoint> and launch/export_hf.py of the DPO
    checkpoint, each as two processes, against the same scripts as one process on 8 devices."""
    alone_dir, pair_dir = tmp_path / "alone", tmp_path / "pair"
    tokenizer = f"model.tokenizer_path={tmp_path / 'tokenizer'}"
    # Trained here once, so that the two runs (started together) read one tokenizer.
    build.build_tokenizer(build.load_config(REPO / "configs" / "tiny.yaml", worker.OFFLINE_OVERRIDES + [tokenizer]))
    alone = start_worker("offline", alone_dir, processes=1, args=(f"output_dir={alone_dir / 'runs'}", tokenizer))
    pair = start_worker("offline", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer))
    (alone_result,) = worker_results(alone, "offline", alone_dir, deadline_s=PPO_DEADLINE_S)
    pair_results = worker_results(pair, "offline", pair_dir, deadline_s=PPO_DEADLINE_S)
    for result in (alone_result, *pair_results):
        assert result["statuses"] == {"sft": 0, "dpo": 0, "export": 0}

    for job, keys in OFFLINE_COMPARED.items():
        expected, got = history(alone_dir, job), history(pair_dir, job)
        assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
        for want, have in zip(expected, got):
            for key in keys:
                assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), (job, want["step"], key)
    assert history(alone_dir, "dpo")[-1]["loss"] < history(alone_dir, "dpo")[0]["loss"]  # DPO learned something
    reference, restored = np.load(alone_dir / "sft_actor.npz"), np.load(pair_dir / "sft_actor.npz")
    assert sorted(reference.files) == sorted(restored.files)
    for name in reference.files:
        np.testing.assert_allclose(restored[name], reference[name], atol=1e-5)

    # The export of the checkpoint the two processes wrote: equal to the one-process run's, and
    # exactly what one process exports from that same checkpoint; printed by process 0 only.
    exported = load_file(str(pair_dir / "hf" / "model.safetensors"))
    expected = load_file(str(alone_dir / "hf" / "model.safetensors"))
    here = load_file(str(export_checkpoint(pair_dir / "runs" / "tiny" / "dpo", tmp_path / "hf") / "model.safetensors"))
    assert sorted(exported) == sorted(expected) == sorted(here)
    for name, tensor in expected.items():
        np.testing.assert_allclose(exported[name], tensor, atol=1e-5)
        np.testing.assert_array_equal(exported[name], here[name])
    stdouts = [(pair_dir / f"stdout{i}").read_text() for i in range(2)]
    assert "exported to" in stdouts[0] and "exported to" not in stdouts[1]
