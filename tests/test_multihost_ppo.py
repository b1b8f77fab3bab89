"""launch/train.py (PPO with its SFT warm start) as two processes x 4 CPU devices against one
process x 8: every metric and the final parameters, each process's own share of judge and user
calls, and resuming the two processes' checkpoint. Every process runs with jax.device_get refusing
an array it does not hold whole (tests/multihost_worker.py)."""

from __future__ import annotations

import numpy as np
import pytest
from multihost_launch import PPO_DEADLINE_S, assert_same_ppo_metrics, ppo_records, run_worker


def test_ppo_over_two_processes_equals_one_process_and_resumes(tmp_path):
    tokenizer = f"model.tokenizer_path={tmp_path / 'tokenizer'}"
    alone_dir, pair_dir = tmp_path / "alone", tmp_path / "pair"
    (alone,) = run_worker("ppo", alone_dir, processes=1, args=(f"output_dir={alone_dir / 'runs'}", tokenizer),
                          deadline_s=PPO_DEADLINE_S)
    first, second = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer),
                               deadline_s=PPO_DEADLINE_S)

    # The in-run SFT warm start (the same entry point as launch/sft.py) ran as two processes too.
    warm_expected, warm_got = ppo_records(alone_dir, "sft"), ppo_records(pair_dir, "sft")
    assert [r["step"] for r in warm_got] == [r["step"] for r in warm_expected] == [1, 2]
    for want, have in zip(warm_expected, warm_got):
        for key in ("loss", "grad_norm", "tokens"):
            assert have[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), ("sft", key)

    expected, got = ppo_records(alone_dir), ppo_records(pair_dir)
    assert [r["status"] for r in (alone, first, second)] == [0, 0, 0]  # launch/train.py's exit status
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1]
    assert all(r["grad_norm"] > 0 for r in expected) and expected[1]["kl"] > 0  # the runs learned something
    # The prefix cache runs over processes too: the same tokens prefilled (fewer than the prompts'),
    # generated and prompted as in one process.
    assert_same_ppo_metrics(expected, got, extra=("prefilled_tokens", "prompt_tokens", "generated_tokens"))
    assert all(r["prefilled_tokens"] < r["prompt_tokens"] for r in expected)
    for stage in ("start", "end"):
        for key, value in alone["summary"][stage].items():
            assert first["summary"][stage][key] == pytest.approx(value, abs=1e-5), (stage, key)
    reference = np.load(alone_dir / "actor.npz")
    pair = np.load(pair_dir / "actor.npz")
    assert sorted(reference.files) == sorted(pair.files)
    for name in reference.files:
        np.testing.assert_allclose(pair[name], reference[name], atol=1e-5)

    # Each process played its own 4 conversations of each group of 8: judged and answered only
    # those, and between them every conversation once per turn (2 groups x 2 turns a rollout).
    for result in (first, second):
        assert result["shares"] == [8.0, 8.0]
    ppo_calls = slice(2 * 2, 2 * 2 + 2 * 2 * 2)  # after the starting evaluation's calls
    for turn_calls in zip(first["scored"][ppo_calls], second["scored"][ppo_calls]):
        mine, theirs = map(set, turn_calls)
        assert len(mine) == len(theirs) == 4 and not mine & theirs
    assert alone["shares"] == [None, None]

    # A checkpoint the two wrote resumes in two processes (one more iteration on top).
    resumed, _ = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", tokenizer, "ppo.iterations=3",
                                                    "--resume"), deadline_s=PPO_DEADLINE_S)
    assert [r["step"] for r in ppo_records(pair_dir)] == [0, 1, 2]
    assert resumed["shares"] == [8.0]
