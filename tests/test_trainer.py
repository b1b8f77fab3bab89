"""End-to-end PPO runs on a tiny model: a short run, resume after Ctrl-C, NaN stop, HF export."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from run_logs import offline_wandb, tensorboard_scalars, wandb_config, wandb_records, wandb_scalars

from rlpa_jax.app.build import build_trainer
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.tree import to_dict
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.rl.trainer import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.conversations=2", "rollout.max_rounds=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
    "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256",
    "ppo.train_batch_size=8", "ppo.micro_batch_size=4", "ppo.iterations=4", "sft.enabled=false",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.checkpoint_every=2", "data.num_personas=16",
    "mesh.devices=1", "rollout.eval_conversations=4",
]


def small_config(tmp_path, *extra):
    return load_config(None, SMALL + [f"output_dir={tmp_path}", *extra])


def reproducible(metrics: dict) -> dict:
    """Metrics without wall-clock entries (seconds, rates) or per-process compile counts."""
    return {k: v for k, v in metrics.items() if k != "sampler_compiles" and not k.endswith(("_s", "per_s"))}


@contextlib.contextmanager
def judge_without_verdicts(monkeypatch):
    """An OpenAI-compatible judge on 127.0.0.1 that answers the start-up probe, then never gives a
    verdict; every policy turn parses as a well-formed one (an untrained policy rarely writes one,
    and only those go to the judges)."""
    from openai_server import OpenAIServer, Reply

    from rlpa_jax.dialogue.chat import format_turn, parse_turn
    from rlpa_jax.dialogue.profile import ProfileItem
    from rlpa_jax.rl import environment

    turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nice! Which ward do you work on?"))
    monkeypatch.setattr(environment, "parse_turn", lambda text: turn)

    def handler(request):
        prompt = request["messages"][-1]["content"]
        return Reply(content="OK" if prompt == "Reply with OK." else "I would rather not say.")

    with OpenAIServer(handler) as server:
        yield server


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    # Logged to TensorBoard and to Weights & Biases (offline): logging changes no metric.
    config = small_config(tmp_path_factory.mktemp("full"), "logging.tensorboard=true", "logging.wandb=true")
    with offline_wandb(tmp_path_factory.mktemp("wandb_home")):
        summary = build_trainer(config).train()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, summary, [r for r in records if r["phase"] == "ppo"]


def test_short_run_logs_checkpoints_and_exports(uninterrupted):
    config, summary, records = uninterrupted
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["samples"] == 2 * 2 * 2 and np.isfinite(r["loss_mean"]) and r["logprob_gap"] < 1e-4
        assert r["entropy_reply"] > 0 and r["entropy_profile"] >= 0 and r["output_scale"] > 0
    assert set(summary) == {"start", "end"} and (config.run_dir / "rewards.png").stat().st_size > 0
    # The held-out evaluation reports profile F1 per turn, and the turns average to the whole.
    end = summary["end"]
    assert set(end) >= {"profile_f1_turn1", "profile_f1_turn2"}
    assert np.mean([end["profile_f1_turn1"], end["profile_f1_turn2"]]) == pytest.approx(end["profile_f1"])
    assert {"revealed_turn2", "written_turn2", "right_turn2", "revealed_items"} <= set(end)
    steps = sorted(int(p.name) for p in (config.run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(config.run_dir / "hf", dtype=torch.float32)
    assert model.config.vocab_size == 512
    # Evaluation loads the policy with the system prompt it was trained with; so does the export.
    from rlpa_jax.dialogue.chat import load_prompt
    from rlpa_jax.eval.policies import JaxPolicy
    system_prompt = load_prompt(config.rollout.system_prompt)
    assert JaxPolicy.from_checkpoint(config.run_dir).system_prompt == system_prompt
    # The command-line export reads only the policy out of the PPO checkpoint.
    out = config.run_dir / "hf_cli"
    result = subprocess.run([sys.executable, str(REPO / "launch" / "export_hf.py"), "--checkpoint", str(config.run_dir),
                             "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    for folder in (config.run_dir / "hf", out):
        assert json.loads((folder / "rlpa_format.json").read_text())["system_prompt"] == system_prompt
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        shown = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        assert shown.startswith(f"<|im_start|>system\n{system_prompt}<|im_end|>")


def test_wandb_logged_what_tensorboard_logged_and_the_config(uninterrupted):
    config, _, records = uninterrupted
    logged = wandb_records(config.run_dir)
    assert wandb_scalars(logged) == pytest.approx(tensorboard_scalars(config.run_dir / "tensorboard"), rel=2**-23)
    assert {(f"ppo/{key}", r["step"]) for r in records for key in ("reward", "kl", "loss_mean")} <= set(
        wandb_scalars(logged))
    assert wandb_config(logged) == json.loads(json.dumps(to_dict(config)))
    assert next(r["run"] for r in logged if r["type"] == "run")["display_name"] == config.name


def test_resume_after_ctrl_c_gives_the_same_metrics(tmp_path, uninterrupted):
    _, _, reference = uninterrupted
    config = small_config(tmp_path)
    first = build_trainer(config)
    # Ctrl-C during iteration 1: the run finishes it, saves at 2 and stops.
    first.on_iteration_end.append(lambda i, m: signal.raise_signal(signal.SIGINT) if i == 1 else None)
    first.train()
    assert first.checkpointer.latest_step() == 2
    build_trainer(config, "resume").train()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["phase"] == "ppo"]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for ours, theirs in zip(resumed[2:], reference[2:]):
        ours, theirs = reproducible(ours), reproducible(theirs)
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key != "phase":
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("damage", ["truncated array file", "meta deleted"])
def test_resume_past_a_damaged_newest_checkpoint_gives_the_same_metrics(tmp_path, uninterrupted, damage):
    source, _, reference = uninterrupted
    config = small_config(tmp_path)
    shutil.copytree(source.run_dir, config.run_dir)
    newest = config.run_dir / "checkpoints" / "4"
    if damage == "truncated array file":
        data = max((newest / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
        os.truncate(data, data.stat().st_size // 2)
    else:
        (newest / "meta" / "metadata").unlink()
    build_trainer(config, "resume").train()
    assert (config.run_dir / "checkpoints" / "4.corrupt").is_dir()  # kept aside for inspection
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["phase"] == "ppo"]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for ours, theirs in zip(resumed[2:], reference[2:]):  # iterations 2 and 3 ran again from step 2
        ours, theirs = reproducible(ours), reproducible(theirs)
        assert ours.keys() == theirs.keys() and all(
            ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6) for k in ours if k != "phase")


def test_resume_with_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path, uninterrupted):
    source, _, _ = uninterrupted
    config = small_config(tmp_path)
    shutil.copytree(source.run_dir, config.run_dir)
    for step in (config.run_dir / "checkpoints").iterdir():
        if step.name.isdigit():
            (step / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step 4: .*\n.*step 2: "):
        build_trainer(config, "resume").train()


def test_resume_from_a_step_that_cannot_be_read_ends_in_one_line_and_renames_nothing(uninterrupted):
    """A permission problem is no damage: launch/train.py --resume stops with one line naming the
    step and the cause (status 1) and sets nothing aside. Run as user nobody, whom a root-owned
    directory of mode 000 keeps out (root reads anything)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    source, _, _ = uninterrupted
    # Under /tmp, not pytest's tmp_path: pytest makes its base directory 0700, which nobody cannot search.
    base = Path(tempfile.mkdtemp(prefix="rlpa-resume-eacces-"))
    try:
        run_dir = base / source.name
        shutil.copytree(source.run_dir, run_dir)
        for path in [base, *base.rglob("*")]:  # nobody's run: it could rename a step, as it would a damaged one
            os.chown(path, 65534, 65534)
        state = run_dir / "checkpoints" / "4" / "state"
        os.chown(state, 0, 0)
        state.chmod(0)

        def listing():
            return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*"))

        before = listing()
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                 str(REPO / "launch" / "train.py"), "--resume", *SMALL, f"output_dir={base}"],
                                capture_output=True, text=True, timeout=600, cwd="/",
                                # (the allocator's restart would exec a python nobody may not reach)
                                env=os.environ | {"MPLCONFIGDIR": str(base), "HOME": str(base),
                                                  "RLPA_HOST_ALLOCATOR": "default"})
        after = listing()
    finally:
        shutil.rmtree(base)
    if "setpriv:" in result.stderr:
        pytest.skip(f"cannot switch to user nobody: {result.stderr.strip()}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"train.py: {run_dir / 'checkpoints' / '4'}: cannot read checkpoint step 4 ("), line
    assert f"(PermissionError: [Errno 13] Permission denied: '{state}'" in line and "nothing was moved" in line, line
    assert after == before


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    run = build_trainer(config)
    original = run.actor_updater.__call__

    def poisoned(trainable, batch):
        trainable, metrics = original(trainable, batch)
        return trainable, metrics | {"loss_mean": float("nan")}

    calls = {"n": 0}
    healthy_calls = 2 * config.ppo.epochs  # two iterations of one minibatch (8 samples = train_batch_size) per epoch

    def update(trainable, batch):
        calls["n"] += 1
        return poisoned(trainable, batch) if calls["n"] > healthy_calls else original(trainable, batch)

    monkeypatch.setattr(run, "actor_updater", type("U", (), {"__call__": staticmethod(update), "param_shardings": run.actor_updater.param_shardings,
                                                               "optimizer": run.actor_updater.optimizer, "init": run.actor_updater.init,
                                                               "opt_state_shardings": run.actor_updater.opt_state_shardings})())
    with pytest.raises(TrainingDiverged, match=r"iteration 2: non-finite loss_mean.*last good checkpoint"):
        run.train()
    assert run.checkpointer.latest_step() == 2


def test_a_run_can_start_from_another_runs_policy(tmp_path, uninterrupted):
    source, _, _ = uninterrupted
    config = small_config(tmp_path, f"model.init_checkpoint={source.run_dir}", "ppo.iterations=1", "logging.export_hf=false")
    run = build_trainer(config)
    assert run.parts.tokenizer_dir == (source.run_dir / "tokenizer").absolute()  # the policy keeps its tokenizer
    state = run.initial_state()
    from rlpa_jax.runtime.checkpoint import restore_actor_params
    expected, _, _ = restore_actor_params(source.run_dir / "checkpoints")
    np.testing.assert_array_equal(np.asarray(state.actor.params["embed"]), np.asarray(expected["embed"]))
    bad = small_config(tmp_path / "bad", f"model.init_checkpoint={source.run_dir}", "model.tiny.hidden_size=32",
                       "model.tiny.intermediate_size=64")
    with pytest.raises(ValueError, match="differs from the configured"):
        build_trainer(bad).initial_state()


def test_profile_by_turn_says_what_was_revealed_written_and_right():
    from rlpa_jax.dialogue.chat import Message, format_turn, parse_turn
    from rlpa_jax.dialogue.judges import TurnScore
    from rlpa_jax.dialogue.personas import synthetic_personas
    from rlpa_jax.dialogue.profile import ProfileItem, profile_f1
    from rlpa_jax.dialogue.users.scripted import ScriptedUser
    from rlpa_jax.rl.environment import start_conversations
    from rlpa_jax.rl.rollout import Sample
    from rlpa_jax.rl.trainer import profile_by_turn

    persona = synthetic_personas(1, seed=3)[0]
    conversation = start_conversations([persona], ScriptedUser(), [0], first_id=5)[0]
    told = persona.items[0]
    conversation.history += [Message("assistant", "Hi! What do you do?"), Message("user", f"{told.slot}: {told.value}.")]
    wrong = ProfileItem("Location", "Atlantis")

    def sample(turn, items, matched):
        f1 = profile_f1(matched, len(items), len(persona.items))
        return Sample(5, turn, 0, np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float32), "",
                      parse_turn(format_turn(items, "Nice.")), TurnScore(f1, 1.0, f1 + 1.0, True, True), f1 + 1.0)

    got = profile_by_turn([sample(0, [], 0), sample(1, [told, wrong], 1), sample(1, [told], 1)], [conversation])
    assert got["revealed_turn1"] == 0 and got["written_turn1"] == 0 and got["right_turn1"] == 0
    assert got["revealed_turn2"] == 1 and got["written_turn2"] == 1.5 and got["right_turn2"] == 1


def test_an_llm_endpoint_that_does_not_answer_stops_the_run_at_start(tmp_path):
    # Port 9 (discard) on 127.0.0.1: nothing listens, the connection is refused at once.
    config = small_config(tmp_path, "judges.kind=llm", "judges.llm.base_url=http://127.0.0.1:9/v1",
                          "judges.llm.cache_path=null", "judges.llm.max_retries=0")
    with pytest.raises(ValueError, match=r"profile judge's LLM endpoint does not answer.*127\.0\.0\.1:9"):
        build_trainer(config)
    assert not (config.run_dir / "checkpoints").exists()  # nothing trained, nothing saved


def test_a_missing_evaluation_split_is_found_before_any_training(tmp_path, aloe_dir):
    partial = tmp_path / "aloe"
    shutil.copytree(aloe_dir, partial)
    (partial / "profile_eval.jsonl").unlink()
    config = small_config(tmp_path, "data.source=aloe", f"data.aloe_dir={partial}", "sft.enabled=true")
    with pytest.raises(FileNotFoundError, match="profile_eval.jsonl"):
        build_trainer(config)  # builds every part (the SFT warm start runs only in train())


def test_item_credit_with_a_judge_that_only_counts_is_refused_at_start(tmp_path):
    config = small_config(tmp_path, "ppo.advantage=grpo", "ppo.credit=item", "judges.kind=llm",
                          "judges.llm.base_url=http://127.0.0.1:9/v1")  # never called: refused first
    with pytest.raises(ValueError, match=r"ppo.credit=item needs a profile judge that says which items matched"):
        build_trainer(config)


def test_an_output_directory_that_cannot_be_made_ends_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *SMALL, f"output_dir={blocker}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: cannot") and str(blocker) in line and "ENOTDIR" in line, line


def test_sampling_and_scoring_run_inside_the_mesh(tmp_path):
    # Outside parallel.activate the model's logical sharding constraints are no-ops: on 8 GPUs the
    # 3B scoring forward would move 164 GB of collectives per micro-batch instead of 12 (PERF.md).
    import flax.linen as nn

    trainer = build_trainer(small_config(tmp_path))
    seen = []

    def recording(fn, name):
        def wrapped(*args, **kwargs):
            seen.append((name, bool(nn.get_logical_axis_rules())))
            return fn(*args, **kwargs)
        return wrapped

    generator = trainer.engine.sampler
    generator._jitted = recording(generator._jitted, "sampler")
    prefix = trainer.engine.prefix_sampler  # rollout.prefix_cache (the default) samples through it
    if prefix is not None:
        prefix._jitted, prefix._copy = recording(prefix._jitted, "sampler"), recording(prefix._copy, "sampler")
    forwards = trainer.build_experience.forwards
    forwards._logprobs = recording(forwards._logprobs, "scoring")
    trainer.iteration(trainer.initial_state())
    assert {name for name, _ in seen} == {"sampler", "scoring"} and all(active for _, active in seen), seen


def test_a_run_that_would_not_fit_its_devices_stops_before_training(tmp_path):
    trainer = build_trainer(small_config(tmp_path, "mesh.fsdp=2", "mesh.data=2", "mesh.devices=4"))
    trainer.check_device_memory()  # CPU reports no device memory: skipped
    trainer.check_device_memory(device_bytes=1e12)  # a roomy device: every program fits
    with pytest.raises(ValueError, match=r"would not fit its devices: sampler: needs .* GB per device.*"
                                         r"rollout.conversations"):
        trainer.check_device_memory(device_bytes=2e6)
    programs = trainer.memory_programs()
    # The sampler's replicated copy on 4 devices is written by the weight sync's programs (a layer at
    # a time, then the rest); grpo: no critic.
    names = [p.name for p in programs]
    syncs = [name for name in names if name.startswith("weight sync (")]
    assert syncs and names == ["sampler", *syncs, "scoring forward", "actor micro-batch step"]
    # rollout.prefix_cache (the default) keeps one prompt cache per pipeline group beside the sampler.
    assert trainer.config.rollout.prefix_cache and trainer.engine.keeps_prefixes
    full_prefills = build_trainer(small_config(tmp_path / "full", "mesh.fsdp=2", "mesh.data=2", "mesh.devices=4",
                                               "rollout.prefix_cache=false")).memory_programs()
    r, config = trainer.config.rollout, trainer.model_config
    kept = (r.pipeline_groups + 1) * 2 * config.num_layers * 1 * 256 * config.num_kv_heads * config.head_dim * 4
    assert programs[0].resident_bytes - full_prefills[0].resident_bytes == kept  # 2 prompts, 1 row per device
    assert [p.resident_bytes for p in programs[1:]] == [p.resident_bytes for p in full_prefills[1:]]


def test_judges_that_stop_scoring_stop_the_run_with_a_checkpoint_and_their_error(tmp_path, monkeypatch):
    from rlpa_jax.rl.trainer import UnscoredRollouts

    with judge_without_verdicts(monkeypatch) as server:
        config = small_config(tmp_path, "judges.kind=llm", f"judges.llm.base_url={server.base_url}",
                              "judges.llm.cache_path=null", "judges.llm.max_retries=0",
                              "rollout.max_invalid_iterations=2", "ppo.iterations=3")
        trainer = build_trainer(config)
        with pytest.raises(UnscoredRollouts, match=r"iteration 1: 2 iterations in a row had more than 20% unscored "
                                                   r".*judge \(gpt-4o-mini at http://127\.0\.0\.1:\d+/v1\): "
                                                   r"no usable verdict after 3 attempt"):
            trainer.train()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["phase"] == "ppo"]
    assert [r["step"] for r in skipped] == [0] and skipped[0]["skipped_update"] == 1.0
    assert skipped[0]["invalid_samples"] == skipped[0]["samples"]
    assert trainer.checkpointer.latest_step() == 1  # --resume retries iteration 1 with the same state


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_an_unscored_stop_at_the_first_iteration_and_after_a_resume_keeps_its_diagnosis(tmp_path, monkeypatch, caplog,
                                                                                       checkpoint_every):
    """The stop saves the state its iteration started from, which is on disk already here (step 0
    right after the start, and the resumed step): it saves nothing new and raises its own error."""
    from rlpa_jax.rl.trainer import UnscoredRollouts

    with judge_without_verdicts(monkeypatch) as server:
        config = small_config(tmp_path, "judges.kind=llm", f"judges.llm.base_url={server.base_url}",
                              "judges.llm.cache_path=null", "judges.llm.max_retries=0",
                              "rollout.max_invalid_iterations=1", f"logging.checkpoint_every={checkpoint_every}",
                              "rollout.eval_conversations=1")
        diagnosis = r"iteration 0: 1 iterations in a row had more than 20% unscored .*no usable verdict after 3 attempt"
        first = build_trainer(config)
        with pytest.raises(UnscoredRollouts, match=diagnosis):
            first.train()
        assert first.checkpointer.all_steps() == [0]
        resumed = build_trainer(config, "resume")
        with pytest.raises(UnscoredRollouts, match=diagnosis):
            resumed.train()
        assert resumed.checkpointer.all_steps() == [0]
    assert "could not be saved" not in caplog.text  # the step on disk was kept, not saved over


@pytest.mark.parametrize("checkpoint_every, failing_iteration", [(1, 0), (2, 1), (1, 2)])
def test_an_os_error_mid_run_keeps_its_own_message_and_the_state_before_it(tmp_path, caplog, checkpoint_every,
                                                                           failing_iteration):
    """A full disk (or any error) inside an iteration: the state that iteration started from is
    saved unless it is on disk already, the error itself reaches the caller, and a resume repeats
    the failed iteration."""
    config = small_config(tmp_path, f"logging.checkpoint_every={checkpoint_every}", "ppo.iterations=3",
                          "rollout.eval_conversations=1", "logging.export_hf=false")
    run = build_trainer(config)
    play = run.play

    def failing(iteration, key):
        if iteration == failing_iteration:
            raise OSError(28, "No space left on device", str(tmp_path / "scratch"))
        return play(iteration, key)

    run.play = failing
    with pytest.raises(OSError, match="No space left on device"):
        run.train()
    assert run.checkpointer.latest_step() == failing_iteration
    assert "could not be saved" not in caplog.text
    resumed = build_trainer(config, "resume")
    resumed.train()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "ppo"] == [0, 1, 2]


def test_a_second_run_into_the_same_directory_stops_or_moves_the_first_aside_intact(tmp_path, uninterrupted):
    from test_run_dir import contents

    from rlpa_jax.app.run_dir import JOBS, RunDirectoryError

    source, _, _ = uninterrupted
    config = small_config(tmp_path, "ppo.iterations=1", "logging.export_hf=false")
    shutil.copytree(source.run_dir, config.run_dir)
    first = contents(config.run_dir)
    with pytest.raises(RunDirectoryError, match=rf"{config.run_dir} holds an earlier train run"):
        build_trainer(config)
    assert contents(config.run_dir) == first
    build_trainer(config, "fresh").train()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(f"{config.name}.")]
    train_files = JOBS["train"].files  # what other jobs and tests wrote there (tokenizer/, hf_cli/) stays
    assert contents(aside) == {k: v for k, v in first.items() if k.split("/")[0] in train_files}
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in records] == [("eval_start", 0), ("ppo", 0), ("eval_end", 0)]


def test_grpo_with_the_kl_in_the_loss_skips_the_actor_forward_and_logs_the_kl(tmp_path, caplog):
    caplog.set_level("INFO", logger="rlpa_jax.app.build")
    # 2 conversations x 2 turns x 2 samples = 8 rows = one optimizer step of train_batch_size 8.
    trainer = build_trainer(small_config(tmp_path, "ppo.advantage=grpo", "ppo.kl_penalty=loss", "ppo.kl_estimator=k3", "ppo.epochs=1",
                                         "ppo.adaptive_kl=true", "ppo.kl_target=0.5", "ppo.kl_horizon=8"))
    assert "scoring forward is skipped" in caplog.text
    assert "old_logprobs" not in trainer.build_experience.update_fields
    trainer.memory_programs()  # the actor's micro-batch step lowers with the new fields
    scored = []
    forwards = trainer.build_experience.forwards
    logprobs = forwards.logprobs
    forwards.logprobs = lambda params, experience: scored.append(params) or logprobs(params, experience)
    state = trainer.initial_state()
    # A reference away from the actor (the tiny policy's rewards may all tie: no GRPO gradient).
    state = dataclasses.replace(state, reference=jax.tree.map(lambda x: x * 1.05, state.reference))
    records = []
    for _ in range(2):
        state, metrics = trainer.iteration(state)
        records.append(metrics | {"next_kl_coef": state.kl_coef})
    assert state.iteration == 2 and state.critic is None  # grpo: no critic at all
    # The reference's forward only, once an iteration.
    assert [p is state.reference for p in scored] == [True] * len(scored) == [True, True]
    first, second = records
    assert first["loss_kl"] > 0 and second["kl"] == second["loss_kl"] and "logprob_gap" not in second
    assert second["loss_approx_kl"] == 0.0 and np.isfinite(second["loss_mean"])
    # Adaptive KL read the update's KL: below target, the coefficient shrinks.
    assert second["next_kl_coef"] < second["kl_coef"] == first["next_kl_coef"]


def test_a_grpo_run_checkpoints_no_critic(uninterrupted):
    import orbax.checkpoint as ocp

    config, _, _ = uninterrupted
    assert config.ppo.advantage == "grpo"
    manager = ocp.CheckpointManager(config.run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    for step in (2, 4):
        saved = manager.item_metadata(step)["state"]
        assert set(getattr(saved, "tree", saved)) == {"actor", "reference"}
    manager.close()


def old_layout_checkpoint(trainer, step: int, kl_coef: float):
    """A checkpoint as the trainer wrote it before TrainState, whatever its advantage estimator: the
    dict {"actor", "critic", "reference"} of a PPO trainer's updaters (a critic made from the policy),
    with the iteration and KL coefficient in the meta. Returns that dict."""
    from rlpa_jax.model.qwen2 import critic_params_from_policy, init_params
    from rlpa_jax.runtime.checkpoint import policy_meta
    from rlpa_jax.training.updater import Trainable

    model_config = trainer.model_config
    actor = init_params(model_config, jax.random.key(5))
    critic = critic_params_from_policy(actor, model_config)
    critic = jax.tree.map(lambda x: x + 0.25, critic)  # a critic some training moved
    reference = jax.tree.map(lambda x: x * 0.5, actor)
    state = {"actor": Trainable(actor, trainer.actor_updater.optimizer.init(actor)),
             "critic": Trainable(critic, trainer.critic_updater.optimizer.init(critic)), "reference": reference}
    meta = {"iteration": step, "kl_coef": kl_coef, "seed": trainer.config.seed} | policy_meta(
        model_config, trainer.parts.tokenizer_dir, trainer.config.rollout.system_prompt)
    trainer.checkpointer.save(step, state, meta)
    return state


def test_a_checkpoint_from_before_train_state_resumes_with_and_without_a_critic(tmp_path, caplog):
    from rlpa_jax.rl import memory_check

    gae = build_trainer(small_config(tmp_path, "ppo.advantage=gae", "ppo.credit=turn"))
    old = old_layout_checkpoint(gae, step=3, kl_coef=0.02)
    state = gae.restore()
    assert (state.iteration, state.kl_coef) == (3, 0.02)
    for restored, saved in ((state.actor, old["actor"]), (state.critic, old["critic"]),
                            (state.reference, old["reference"])):
        jax.tree.map(np.testing.assert_array_equal, restored, saved)
    # PPO with GAE trains the restored critic (the update donates the state's arrays: keep copies).
    before = jax.tree.map(np.array, state.critic.params)
    after, metrics = gae.iteration(state)
    assert after.iteration == 4 and np.isfinite(metrics["critic_loss_mean"])
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after.critic.params, before)
    assert any(jax.tree.leaves(moved))

    # The same checkpoint resumes a grpo run: the critic stays on disk, one INFO line says so.
    grpo = build_trainer(small_config(tmp_path, "ppo.advantage=grpo", "ppo.credit=turn"), "resume")
    assert grpo.critic_updater is None
    with caplog.at_level("INFO", logger="rlpa_jax.runtime.checkpoint"):
        state = grpo.restore()
    assert state.critic is None and (state.iteration, state.kl_coef) == (3, 0.02)
    jax.tree.map(np.testing.assert_array_equal, state.actor, old["actor"])
    jax.tree.map(np.testing.assert_array_equal, state.reference, old["reference"])
    dropped = [r.getMessage() for r in caplog.records
               if r.name == "rlpa_jax.runtime.checkpoint" and "not restored" in r.getMessage()]
    assert len(dropped) == 1 and "step 3: its critic not restored" in dropped[0], dropped

    # Nor does the memory check count a critic the run does not hold.
    critic_bytes = memory_check.per_device_bytes(gae.abstract_state().critic)
    with_critic, without = gae.memory_programs(), grpo.memory_programs()
    assert [p.name for p in with_critic] == [p.name for p in without] + ["critic micro-batch step"]
    assert [a.resident_bytes - b.resident_bytes for a, b in zip(with_critic, without)] == [critic_bytes] * len(without)
    assert gae.checkpoint_bytes() - grpo.checkpoint_bytes() == sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(gae.abstract_state().critic))
