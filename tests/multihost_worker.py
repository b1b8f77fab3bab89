"""One process of a multi-process test run (tests/test_multihost.py starts several of these).

    python tests/multihost_worker.py SCENARIO OUT_DIR [dotted config overrides, for `ppo` and `offline`]

The process joins the others through rlpa_jax's own start-up (parallel.initialize_distributed,
from the JAX_* variables the test sets), runs SCENARIO and writes what it saw to
OUT_DIR/process<k>.json for the test to compare with a one-process run.
"""

from __future__ import annotations

import errno
import faulthandler
import io
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from eval_launch_worker import device_get_of_own_arrays

from rlpa_jax.app import build, jobs
from rlpa_jax.config.loading import load_config
from rlpa_jax.config.tree import MeshConfig
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.model.qwen2 import Qwen2Config, init_params
from rlpa_jax.rl.metrics import MetricsLog
from rlpa_jax.runtime import hf_export, multihost, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, abstract_like, restore_actor_params

ROWS, WIDTH = 16, 6
MESH = MeshConfig(data=2, fsdp=2, tensor=2)  # rows over data*fsdp=4, copies over tensor
MODEL = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def global_batch() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(ROWS, WIDTH)).astype(np.float32)


def weights() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(WIDTH, WIDTH)).astype(np.float32)


@jax.jit
def program(batch, w):
    """A global program: rows stay sharded, the total is a cross-device (and cross-process) sum."""
    hidden = jnp.tanh(batch @ w)
    return hidden, jnp.sum(hidden ** 2)


def run_program(mesh) -> dict:
    """The rows this process holds, built into the global batch, through `program`."""
    sharding = parallel.batch_sharding(mesh)
    rows = multihost.local_row_indices(sharding, (ROWS, WIDTH))
    batch = multihost.global_from_local_rows(global_batch()[rows], sharding, ROWS)
    w = jax.device_put(weights(), parallel.replicated(mesh))
    with parallel.activate(mesh):
        hidden, total = program(batch, w)
    out = {"rows": rows.tolist(), "local_hidden": multihost.local_rows(hidden).tolist(),
           "hidden": multihost.gather(hidden).tolist(), "total": float(multihost.fetch(total))}
    try:
        multihost.fetch(hidden)
        out["fetch_error"] = None
    except multihost.NotAddressable as error:
        out["fetch_error"] = str(error)
    return out


def scenario_arrays(out_dir: Path) -> dict:
    mesh = parallel.make_mesh(MESH)
    result = run_program(mesh)
    k = multihost.process_index()
    result["max"] = multihost.agree_on_max((3 + k, 10 - k))
    # Process k scored k + 1 samples of reward k each and saw k invalid ones.
    result["metrics"] = multihost.reduce_metrics({"reward": k * (k + 1), "invalid_samples": k}, {"reward": k + 1})
    metrics = MetricsLog(out_dir / "run", tensorboard=False)
    metrics.write("ppo", 0, {"reward": result["metrics"]["reward"]})
    result["records"] = metrics.records("ppo")
    facts = {"config": {"ppo": {"actor_lr": 3e-5}}, "devices": multihost.device_facts()}
    multihost.check_agreement(facts)  # the same everywhere: passes
    try:  # process 1 could not load its config: every process stops with its message
        multihost.check_agreement({"error": "ppo.clip_eps: expected a number > 0"} if k == 1 else facts)
        result["agreement_error"] = None
    except multihost.ProcessMismatch as error:
        result["agreement_error"] = str(error)
    judge = RecordingJudge()  # DPO's held-out judge calls: each request judged by one process
    result["verdicts"] = jobs.judged_by_every_process(judge, list(range(7)))
    result["judged_here"] = judge.seen
    return result


class RecordingJudge:
    """A response judge whose verdict on request r is 10 r; it remembers what it was asked."""

    def __init__(self):
        self.seen: list = []

    async def judge(self, requests):
        self.seen += requests
        return [10 * r for r in requests]


def params_on(mesh):
    """The tiny model's parameters with fixed random values, in the trainer's shardings over the
    global mesh; each process places only its own shards (built on the host: no compile)."""
    shapes = jax.eval_shape(lambda: init_params(MODEL, jax.random.key(3)))
    leaves, tree = jax.tree.flatten(shapes)
    shardings = jax.tree.leaves(parallel.param_shardings(MODEL, mesh))
    arrays = []
    for number, (shape, sharding) in enumerate(zip(leaves, shardings)):
        host = np.random.default_rng(number).normal(size=shape.shape).astype(shape.dtype)
        arrays.append(jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index]))
    return jax.tree.unflatten(tree, arrays)


def scenario_save(out_dir: Path) -> dict:
    mesh = parallel.make_mesh(MESH)
    params = params_on(mesh)
    state = {"actor": params, "step_scale": jax.device_put(jnp.float32(0.5), parallel.replicated(mesh))}
    checkpointer = Checkpointer(out_dir / "checkpoints")
    checkpointer.save(1, state, {"iteration": 1, "processes": multihost.process_count()})
    checkpointer.close()
    return {"saved": True}


def same_local_shards(a: jax.Array, b: jax.Array) -> bool:
    """Every shard this process holds of `a` equals `b`'s on the same device."""
    mine = {shard.device: np.asarray(shard.data) for shard in b.addressable_shards}
    return all(np.array_equal(np.asarray(shard.data), mine[shard.device]) for shard in a.addressable_shards)


def scenario_restore(out_dir: Path) -> dict:
    mesh = parallel.make_mesh(MESH)
    expected = {"actor": params_on(mesh), "step_scale": jax.device_put(jnp.float32(0.5), parallel.replicated(mesh))}
    checkpointer = Checkpointer(out_dir / "checkpoints")
    step, state, meta = checkpointer.restore_latest_readable(abstract_like(expected))
    checkpointer.close()
    equal = jax.tree.map(same_local_shards, state, expected)
    same_sharding = jax.tree.map(lambda a, b: a.sharding == b.sharding, state, expected)
    hf_export.export_hf(state["actor"], MODEL, out_dir / "hf")  # gathered from both, written by process 0
    return {"step": step, "meta": dict(meta), "equal": all(jax.tree.leaves(equal)),
            "same_sharding": all(jax.tree.leaves(same_sharding))}


def stepped_state(mesh, step: int) -> dict:
    """The tiny model's parameters and a replicated scalar that says which step saved them."""
    return {"actor": params_on(mesh), "step_scale": jax.device_put(jnp.float32(step), parallel.replicated(mesh))}


def scenario_save_steps(out_dir: Path) -> dict:
    mesh = parallel.make_mesh(MESH)
    checkpointer = Checkpointer(out_dir / "checkpoints")
    for step in (1, 2):
        checkpointer.save(step, stepped_state(mesh, step), {"iteration": step})
    checkpointer.close()
    return {"saved": [1, 2]}


# RLPA_TEST_READ_FAILURE=<k>:<how>: process k alone fails to read step 2's JSON files (the others
# read them), as a host with a flaky mount or a stale cache would: "eio" raises EIO, "torn" reads
# them cut short (what a half-written file gives); "unlisted": orbax's listing on process k lacks
# step 2.
READ_FAILURE = "RLPA_TEST_READ_FAILURE"


def fail_reads_under(directory: Path, how: str) -> None:
    """Every file orbax opens under `directory` (through etils' epath, its lowest Python read)
    fails as `how` says from now on."""
    open_file = epath.backend._OsPathBackend.open

    def failing_open(self, path, mode, *args, **kwargs):
        if not Path(path).is_relative_to(directory):
            return open_file(self, path, mode, *args, **kwargs)
        if how == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        with open_file(self, path, mode, *args, **kwargs) as whole:
            text = whole.read()
        return (io.BytesIO if isinstance(text, bytes) else io.StringIO)(text[: len(text) // 2])

    epath.backend._OsPathBackend.open = failing_open


def scenario_resume(out_dir: Path) -> dict:
    """Checkpointer.resume over steps 1 and 2 (scenario save_steps), step 2 perhaps damaged or
    unreadable on one process only: what each process restored, or the error it stopped with."""
    mesh = parallel.make_mesh(MESH)
    directory = out_dir / "checkpoints"
    process, _, how = os.environ.get(READ_FAILURE, "").partition(":")
    if process == str(multihost.process_index()) and how == "unlisted":
        all_steps = ocp.CheckpointManager.all_steps
        ocp.CheckpointManager.all_steps = lambda self, *args, **kwargs: [
            step for step in all_steps(self, *args, **kwargs) if step != 2]
    elif process == str(multihost.process_index()):
        fail_reads_under(directory / "2", how)
    expected = stepped_state(mesh, 1)
    checkpointer = Checkpointer(directory)
    try:
        step, state, meta, _ = checkpointer.resume(abstract_like(expected))
    except CheckpointError as error:
        return {"step": None, "error": str(error), "error_type": type(error).__name__,
                "listing": sorted(p.name for p in directory.iterdir())}
    finally:
        checkpointer.close()
    equal = jax.tree.map(same_local_shards, state["actor"], expected["actor"])
    return {"step": step, "meta": dict(meta), "step_scale": float(multihost.fetch(state["step_scale"])),
            "actor_equal": all(jax.tree.leaves(equal)), "error": None,
            "listing": sorted(p.name for p in directory.iterdir())}


def scenario_wait(out_dir: Path) -> dict:
    """Both processes meet in collectives forever; the test kills one, and the other must stop by itself."""
    mesh = parallel.make_mesh(MESH)
    (out_dir / f"ready{multihost.process_index()}").write_text("ready")
    for _ in range(100_000):
        run_program(mesh)
        time.sleep(0.05)
    return {"finished": True}


REPO = Path(__file__).resolve().parents[1]
# A short SFT warm start and two PPO iterations of the embedded world, small: 16 conversations in 2 pipeline groups of 8 (one
# row per device of the 8-device mesh, so each of 2 processes plays 4 of every group), 2 turns, the second
# continuing the first's prompt cache.
PPO_OVERRIDES = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=600",
    "model.tiny.num_layers=1", "rollout.prompt_buckets=[128,256]", "rollout.max_prompt_tokens=256",
    "data.num_personas=64", "rollout.conversations=16", "rollout.pipeline_groups=2", "rollout.max_rounds=2",
    "rollout.samples_per_prompt=2", "rollout.max_new_tokens=24", "rollout.eval_conversations=8",
    "rollout.prefix_cache=true", "ppo.iterations=2", "ppo.epochs=1", "ppo.train_batch_size=32",
    "ppo.micro_batch_size=16",
    # The in-run SFT warm start, short: 4 dialogues of 2 turns, every step on all 8 examples.
    "sft.enabled=true", "sft.steps=2", "sft.batch_size=8", "sft.num_dialogues=4",
    # An untrained policy earns reward 0 everywhere, where no advantage moves anything: an entropy
    # bonus gives the actor a gradient, and the KL it then builds gives GAE's critic one.
    "ppo.advantage=gae", "ppo.entropy_coef=0.01", "logging.checkpoint_every=1", "logging.tensorboard=false",
    "logging.progress_bar=false", "logging.export_hf=false"]


def counting(method, seen: list, ids):
    """`method` that also records which conversations each call named (this process's calls)."""
    async def counted(*args, **kwargs):
        seen.append(sorted(ids(*args)))
        return await method(*args, **kwargs)
    return counted


def scenario_ppo(out_dir: Path, overrides: list[str]) -> dict:
    """launch/train.py on the tiny config (the same on every process); the final actor and which
    conversations this process scored and answered (counted by hooks on the trainer it builds)."""
    scored, answered, shares, pools, summaries = [], [], [], [], []
    build_trainer = build.build_trainer

    def build_counting_trainer(config, start="new"):
        trainer = build_trainer(config, start)
        environment = trainer.parts.environment
        environment.score = counting(environment.score, scored, lambda conversations, texts: [
            c.conversation_id for c in conversations])
        environment.user_sim.respond = counting(environment.user_sim.respond, answered, lambda users, histories: [
            id(u) for u in users])
        trainer.on_iteration_end.append(lambda iteration, metrics: shares.append(metrics.get("conversations_here")))
        if trainer.pool is not None:  # the `turn` schedule: the whole pool after each iteration
            trainer.on_iteration_end.append(lambda iteration, metrics: pools.append(trainer.pool.to_json()))
        train = trainer.train
        trainer.train = lambda resume=None: summaries.append(train(resume=resume)) or summaries[-1]
        built.append(trainer)
        return trainer

    built = []
    build.build_trainer = build_counting_trainer
    status = launch_main("train.py")(["--config", str(REPO / "configs" / "tiny.yaml"), *PPO_OVERRIDES, *overrides])
    trainer = built[0]
    actor = multihost.gather(trainer.restore().actor.params)
    if multihost.is_main_process():
        np.savez(out_dir / "actor.npz", *[np.asarray(x) for x in jax.tree.leaves(actor)])
    return {"status": status, "summary": summaries[0], "scored": scored, "answered": [len(a) for a in answered],
            "shares": shares, "pools": pools}


# The offline jobs on the same small world: a few SFT steps, then DPO from that checkpoint. 4 dialogues
# of 2 turns: 8 examples (8 pairs), so every batch of 8 holds them all and each job compiles its step once.
OFFLINE_OVERRIDES = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=600",
    "model.tiny.num_layers=1", "rollout.max_prompt_tokens=256", "rollout.max_rounds=2", "rollout.max_new_tokens=16",
    "data.num_personas=64", "sft.steps=3", "sft.batch_size=8", "sft.num_dialogues=4", "logging.progress_bar=false"]
DPO_OVERRIDES = ["dpo.steps=3", "dpo.batch_size=8", "dpo.num_dialogues=4", "dpo.learning_rate=1e-3",
                 "dpo.warmup_steps=1"]


def launch_main(script: str):
    """launch/<script>'s main (the launch scripts are not a package)."""
    return runpy.run_path(str(REPO / "launch" / script), run_name=f"launch_{script[:-3]}")["main"]


def scenario_offline(out_dir: Path, overrides: list[str]) -> dict:
    """launch/sft.py, launch/dpo.py --init <the SFT checkpoint> and launch/export_hf.py of the DPO
    checkpoint, each run by every process as its main; process 0 keeps the SFT policy (gathered from
    the checkpoint every process restores together)."""
    config_overrides = OFFLINE_OVERRIDES + overrides
    config = load_config(REPO / "configs" / "tiny.yaml", config_overrides)
    statuses = {"sft": launch_main("sft.py")(["--config", str(REPO / "configs" / "tiny.yaml"), *config_overrides])}
    statuses["dpo"] = launch_main("dpo.py")(["--config", str(REPO / "configs" / "tiny.yaml"), "--init",
                                             str(config.run_dir / "sft"), *config_overrides, *DPO_OVERRIDES])
    statuses["export"] = launch_main("export_hf.py")(["--checkpoint", str(config.run_dir / "dpo"),
                                                      "--output", str(out_dir / "hf")])
    mesh = build.build_mesh(config)
    shardings = parallel.param_shardings(build.model_config(config), mesh)
    sft_params, _, _ = restore_actor_params(config.run_dir / "sft", shardings=shardings)
    sft_params = multihost.gather(sft_params)
    if multihost.is_main_process():
        np.savez(out_dir / "sft_actor.npz", *[np.asarray(x) for x in jax.tree.leaves(sft_params)])
    return {"statuses": statuses}


SCENARIOS = {"arrays": scenario_arrays, "save": scenario_save, "restore": scenario_restore, "wait": scenario_wait,
             "save_steps": scenario_save_steps, "resume": scenario_resume,
             "ppo": scenario_ppo, "offline": scenario_offline}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a stuck child is
    started = time.perf_counter()
    parallel.initialize_distributed()
    print(f"joined after {time.perf_counter() - started:.1f} s", flush=True)
    extra = [sys.argv[3:]] if scenario in ("ppo", "offline") else []
    if extra:  # the launch scripts: a device_get of an array another process holds part of fails the run
        jax.device_get = device_get_of_own_arrays
    result = SCENARIOS[scenario](out_dir, *extra) | {"process": multihost.process_index(), "processes": multihost.process_count()}
    (out_dir / f"process{multihost.process_index()}.json").write_text(json.dumps(result))
    print(f"{scenario} done after {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
