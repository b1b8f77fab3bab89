"""PPO on the `turn` schedule (a pool of live conversations) as two processes against one: every
metric, the final parameters, the pool every process holds, each process's own calls, and resume."""

from __future__ import annotations

import numpy as np
from multihost_launch import PPO_DEADLINE_S, assert_same_ppo_metrics, ppo_records, run_worker


def test_turn_schedule_over_two_processes_equals_one_process_and_resumes(tmp_path):
    # The PPO test's world on the paper's schedule: a pool of 16 live conversations (2 groups of 8,
    # 4 of each per process), one turn each per iteration, 2 turns a dialogue. Group advantages (no
    # critic: fewer programs to compile); the entropy bonus still moves the actor.
    args = (f"model.tokenizer_path={tmp_path / 'tokenizer'}", "rollout.schedule=turn", "ppo.advantage=grpo")
    alone_dir, pair_dir = tmp_path / "alone", tmp_path / "pair"
    (alone,) = run_worker("ppo", alone_dir, processes=1, args=(f"output_dir={alone_dir / 'runs'}", *args),
                          deadline_s=PPO_DEADLINE_S)
    first, second = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", *args),
                               deadline_s=PPO_DEADLINE_S)

    expected, got = ppo_records(alone_dir), ppo_records(pair_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1]
    assert [r["pool_turn"] for r in expected] == [1, 2] and expected[1]["kl"] > 0
    assert_same_ppo_metrics(expected, got, ("pool_turn", "conversations_started", "conversations_finished"))
    reference, pair = np.load(alone_dir / "actor.npz"), np.load(pair_dir / "actor.npz")
    # Two updates whose gradients are summed over 2 processes in another order than over 8 devices
    # of one: float32 rounding, which Adam can make a whole step. It moves a weight by about its
    # learning rate (~8e-6 here) whatever the gradient's size, and these gradients (rewards of 0:
    # the entropy bonus and the KL term alone) are ~0 on many weights, where the rounding picks the step's
    # sign: one weight came out 1.7e-5 off (one step flipped); a flip in each of the 2 steps would
    # be ~3.3e-5. The weights cannot show a missed or extra step (one more iteration moved them by
    # at most 1.6e-5, measured); the metrics compared above at 1e-5 do, and the final norm's output
    # scale, which moves 5e-3 a step.
    for name in reference.files:
        np.testing.assert_allclose(pair[name], reference[name], atol=5e-5)
    # Every process holds the one-process run's whole pool after every iteration (histories, user
    # RNGs, active flags): what each process saves in its checkpoint.
    assert len(alone["pools"]) == 2 and alone["pools"][1]["slots"][0]["turn"] == 2
    assert first["pools"] == second["pools"] == alone["pools"]

    # Each process judged and answered only its own 4 conversations of each group of 8 (the
    # group's slots 0-3 on process 0, 4-7 on process 1), between them every one once per turn.
    for result in (first, second):
        assert result["shares"] == [8.0, 8.0]
    ppo_calls = slice(2 * 2, 2 * 2 + 2 * 2)  # after the starting evaluation's calls: 2 iterations x 2 groups
    for call, (mine, theirs) in enumerate(zip(first["scored"][ppo_calls], second["scored"][ppo_calls])):
        group = list(range(call % 2, 16, 2))
        assert (mine, theirs) == (group[:4], group[4:])
    assert first["answered"][ppo_calls] == second["answered"][ppo_calls] == [4] * 4

    # A checkpoint the two wrote resumes in two processes: iteration 2 refills every slot (each
    # dialogue has had its 2 turns) with users dealt the same on both.
    resumed, other = run_worker("ppo", pair_dir, args=(f"output_dir={pair_dir / 'runs'}", *args, "ppo.iterations=3",
                                                       "--resume"), deadline_s=PPO_DEADLINE_S)
    records = ppo_records(pair_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert (records[2]["conversations_started"], records[2]["pool_turn"]) == (16, 1)
    assert resumed["pools"] == other["pools"] and resumed["pools"][0]["started"] == 32
