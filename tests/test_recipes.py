"""docs/RECIPES.md followed as written: the local-endpoint overrides (read from the document with
bash) against a real server on 127.0.0.1, the SLURM batch file (run by bash with `srun` recorded)
on as many fake devices as it asks for, and the package's dependencies and training path in a
virtual environment without torch."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from openai_server import OpenAIServer, Reply
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rlpa_jax.app import build
from rlpa_jax.config.options import ConfigError
from rlpa_jax.dialogue.chat import Message, format_turn, parse_turn
from rlpa_jax.dialogue.judges import ResponseRequest
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.users import OPENING_MESSAGE
from rlpa_jax.rl import environment as environment_module

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout
RECIPES = REPO_ROOT / "docs" / "RECIPES.md"
SBATCH = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
PROBE = "Reply with OK."


def bash_words(script: str, array: str) -> list[str]:
    """The words of bash array `array` after bash runs `script` (quoting, comments and all)."""
    out = subprocess.run(["bash", "-c", f'{script}\nprintf "%s\\0" "${{{array}[@]}}"'], capture_output=True,
                         text=True, check=True).stdout
    return out.split("\0")[:-1]


def documented_block(array: str) -> list[str]:
    """The bash array `array` that a block of docs/RECIPES.md defines, as bash reads it."""
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", RECIPES.read_text(), re.S) if b.startswith(f"{array}=(")]
    return bash_words(block, array)


# --- a local endpoint for the LLM roles --------------------------------------------


def answer_as_the_roles(request: dict) -> Reply:
    """The start-up probe, the paper's judges (a \\boxed{} verdict or count) or the paper's user."""
    text = " ".join(m["content"] for m in request["messages"])
    if request["messages"][-1]["content"] == PROBE:
        return Reply(content="OK")
    if "boxed" in text:
        return Reply(content="Fine. \\boxed{1}")
    return Reply(content="I work night shifts as a nurse.")


# The policy swapped for a tiny random model and the rollout shrunk to fit a test; the LLM sections
# (every role's endpoint, model, key, limits, prices, caches) are the recipe's.
TINY_POLICY = [
    "model.path=null", "model.compute_dtype=float32", "model.remat=none", "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512", "data.source=synthetic", "data.num_personas=16",
    "rollout.conversations=2", "rollout.pipeline_groups=1", "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=16", "rollout.prompt_buckets=[128,256]", "rollout.max_prompt_tokens=256",
    "rollout.system_prompt=policy_system_tiny", "ppo.train_batch_size=4", "ppo.micro_batch_size=2",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.export_hf=false",
]


def test_local_endpoint_recipe_trains_through_one_server(tmp_path, monkeypatch):
    overrides = documented_block("LOCAL_LLM")
    assert "llm.base_url=http://127.0.0.1:8000/v1" in overrides and "llm.model=Qwen2.5-7B-Instruct" in overrides
    monkeypatch.delenv("LOCAL_LLM_API_KEY", raising=False)  # a server without keys: nothing exported
    monkeypatch.chdir(tmp_path)  # the config's relative output_dir and LLM caches (runs/...) land here
    # An untrained policy rarely writes a well-formed turn, and only those go to the judges.
    turn = parse_turn(format_turn([ProfileItem("Occupation", "nurse")], "Nights must be hard. Which ward?"))
    monkeypatch.setattr(environment_module, "parse_turn", lambda text: turn)
    with OpenAIServer(answer_as_the_roles) as server:
        local = [o.replace("http://127.0.0.1:8000/v1", server.base_url) for o in overrides]
        config = build.load_config(REPO_ROOT / "configs" / "qwen2.5-0.5b-1gpu.yaml", local + TINY_POLICY)
        sections = [config.user.llm, config.judges.profile.llm, config.judges.response.llm, config.eval.judge.llm]
        assert {(s.base_url, s.model, s.rpm, s.tpm, s.price_input_per_mtok, s.price_output_per_mtok)
                for s in sections} == {(server.base_url, "Qwen2.5-7B-Instruct", None, None, 0.0, 0.0)}
        run = build.build_trainer(config)  # the start-up probe of the endpoint
        probes = len(server.requests)
        _, metrics = run.iteration(run.initial_state())
        during_iteration = server.requests[probes:]
        _, eval_response_judge = build.build_eval_judges(config)
        [persona] = synthetic_personas(1, seed=0)
        request = ResponseRequest(persona, (Message("user", OPENING_MESSAGE),), turn.response)
        assert asyncio.run(eval_response_judge.judge([request])) == [1]
    assert [r["messages"][-1]["content"] for r in server.requests[:probes]] == [PROBE]  # one endpoint, one probe
    assert metrics["samples"] == 2 * 2 and metrics["invalid_samples"] == 0
    roles = ("user", "profile_judge", "response_judge")
    assert all(metrics[f"llm/{role}/calls"] > 0 and metrics[f"llm/{role}/cost_usd"] == 0 for role in roles)
    # Over HTTP: the user's replies and the judges' verdicts (identical judge requests of a turn's
    # samples share one HTTP call, in flight or from the recipe's cache).
    asked = ["judge" if "boxed" in str(r["messages"]) else "user" for r in during_iteration]
    assert asked.count("user") == metrics["llm/user/calls"] and "judge" in asked
    assert len(server.requests) == probes + len(during_iteration) + 1  # and the evaluation judge's verdict
    assert {r["model"] for r in server.requests} == {"Qwen2.5-7B-Instruct"}
    assert {h["authorization"] for h in server.request_headers} == {"Bearer EMPTY"}
    assert (tmp_path / "runs" / "llm_cache_user.jsonl").is_file()  # the recipe's caches, under the working directory


def test_fewer_overrides_stop_the_load_where_the_recipe_says():
    """Only the URL and the models (what the config's comment used to say): the evaluation judge keeps
    the config's own limits, on the one endpoint that the other roles give theirs."""
    with pytest.raises(ConfigError, match=r"roles on one endpoint \(Qwen2.5-7B-Instruct at http://127\.0\.0\.1:8000/v1\) "
                                          r"share its rate limit, but give different rpm/tpm"):
        build.load_config(REPO_ROOT / "configs" / "qwen2.5-0.5b-1gpu.yaml", [
            "llm.base_url=http://127.0.0.1:8000/v1", "llm.model=Qwen2.5-7B-Instruct",
            "eval.judge.llm.model=Qwen2.5-7B-Instruct"])


# --- several hosts: the SLURM batch file -------------------------------------------


def sbatch_option(name: str) -> int:
    [value] = re.findall(rf"^#SBATCH --{name}=(\d+)\s*$", SBATCH.read_text(), re.M)
    return int(value)


def test_sbatch_file_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def launched_by_sbatch(tmp_path: Path, nodes: int, gpus_per_node: int) -> tuple[list[str], dict]:
    """What the batch file hands to srun (its arguments, and the environment the tasks inherit),
    run by bash as SLURM would run it on the first node, with srun replaced by a recorder."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun.json"
    bin_dir.mkdir()
    recorder = bin_dir / "srun"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    recorder.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(REPO_ROOT),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": str(gpus_per_node)}
    subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, check=True)
    recorded = json.loads(record.read_text())
    return recorded["argv"], recorded["env"]


# In a process of its own: as many fake devices as the job has GPUs (this one has 8).
MESH_CHECK = """
import dataclasses, json, math, sys
import jax
from rlpa_jax.app import build
from rlpa_jax.model.qwen2 import init_params
from rlpa_jax.runtime import parallel
config_path, model_dir, *overrides = sys.argv[1:]
config = build.load_config(config_path, overrides)
mesh = build.build_mesh(config)
build.check_rows_split(mesh, config, "ppo.micro_batch_size", config.ppo.micro_batch_size, "micro-batch rows")
# The parameter memory of the configured model's real shapes (Qwen2.5-3B), per device.
model_cfg = build.model_config(dataclasses.replace(config, model=dataclasses.replace(config.model, path=model_dir)))
per_device, whole = 0, 0
for head in ("lm", "value"):
    abstract = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), head=head))
    shardings = parallel.param_shardings(model_cfg, mesh, head)
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        whole += x.size
        per_device += math.prod(s.shard_shape(x.shape))
print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape), "per_device": per_device, "whole": whole}))
"""

# configs/qwen2.5-3b-8gpu.yaml's model.path holds Qwen2.5-3B-Instruct; its config.json (the sizes that
# decide the sharding), as released.
QWEN25_3B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048,
             "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
             "max_position_embeddings": 32768}


def test_sbatch_training_command_loads_and_its_mesh_takes_every_gpu(tmp_path):
    nodes, gpus_per_node = sbatch_option("nodes"), sbatch_option("gpus-per-node")
    assert (nodes, gpus_per_node, sbatch_option("ntasks-per-node")) == (2, 8, 1)
    argv, env = launched_by_sbatch(tmp_path, nodes, gpus_per_node)
    # One process per node drives all of its GPUs (JAX would give each SLURM task one).
    assert env["JAX_LOCAL_DEVICE_IDS"] == ",".join(map(str, range(gpus_per_node)))
    script = argv.index("launch/train.py")
    args = argv[script + 1:]
    config_path = Path(args[args.index("--config") + 1])
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    assert flags == ["--config", "--resume-if-present"] and len(args) == 3 + len(overrides)
    assert config_path == Path("configs/qwen2.5-3b-8gpu.yaml")
    assert overrides == documented_block("MULTI_HOST")  # docs/RECIPES.md's by-hand and srun commands take these

    model_dir = tmp_path / "Qwen2.5-3B-Instruct"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN25_3B))
    child_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
                     XLA_FLAGS=f"--xla_force_host_platform_device_count={nodes * gpus_per_node}")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        child_env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", MESH_CHECK, str(REPO_ROOT / config_path), str(model_dir), *overrides],
                          env=child_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["devices"] == 16 and result["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}
    # Each node holds one copy of the actor and critic, split over its 8 GPUs (norms and biases
    # that do not divide stay whole: well under 1 % more).
    assert result["whole"] / 8 <= result["per_device"] < result["whole"] / 8 * 1.01


# --- GPU install without torch -------------------------------------------------------


def requirement_closure(requirements: list[str], extras: frozenset[str] = frozenset()) -> tuple[dict, set]:
    """The installed distributions `requirements` pull in (markers evaluated for this interpreter;
    `extras` of the top level only), and the names not installed here."""
    found, absent = {}, set()
    pending = [(Requirement(r), extras) for r in requirements]
    while pending:
        requirement, wanted = pending.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in wanted | {""}):
            continue
        if name in found or name in absent:
            continue
        try:
            found[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            absent.add(name)
            continue
        pending += [(Requirement(r), frozenset(requirement.extras)) for r in found[name].requires or []]
    return found, absent


def test_neither_the_package_nor_its_gpu_extra_requires_torch():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    base, base_absent = requirement_closure(project["dependencies"])
    assert "torch" not in base and not base_absent  # every base dependency is installed here, and none is torch
    assert {"jax", "transformers", "tokenizers", "safetensors"} <= set(base)
    gpu, gpu_absent = requirement_closure(project["optional-dependencies"]["gpu"])
    # The CUDA plugin is not installed on this CPU machine; what it names is checked by name.
    assert "torch" not in gpu and gpu_absent <= {"jax-cuda12-plugin", "jax-cuda12-pjrt"}
    assert gpu_absent, "the gpu extra names jax's CUDA plugin"


TORCHLESS_CHECK = """
import importlib, importlib.util, pkgutil, sys
from pathlib import Path
import rlpa_jax, transformers
assert importlib.util.find_spec("torch") is None
assert not transformers.utils.is_torch_available()
modules = [m.name for m in pkgutil.walk_packages(rlpa_jax.__path__, "rlpa_jax.")]
for name in modules:
    importlib.import_module(name)
scripts = sorted(Path(sys.argv[1]).glob("*.py"))  # their imports and definitions (main runs only as __main__)
for script in scripts:
    spec = importlib.util.spec_from_file_location(script.stem, script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(len(modules), "modules", len(scripts), "launch scripts")
"""


def test_the_training_path_runs_in_an_environment_without_torch(tmp_path):
    """A virtual environment holding exactly the base dependencies (what `pip install .` brings,
    less jax's CUDA plugin of the gpu extra): every module and launch script imports,
    and launch/train.py trains the tiny model for one iteration."""
    base, _ = requirement_closure(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = (venv / "lib").glob("python3*/site-packages")
    for dist in base.values():
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            if not (site / top).exists():
                (site / top).symlink_to(root / top)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=str(REPO_ROOT / ".jax_cache"))  # the suite's cache (conftest.py)
    done = subprocess.run([python, "-c", TORCHLESS_CHECK, str(REPO_ROOT / "launch")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    modules, _, scripts, *_ = done.stdout.split()[-5:]
    assert int(modules) > 50 and int(scripts) >= 7, done.stdout
    train = [python, str(REPO_ROOT / "launch" / "train.py"), "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
             f"output_dir={tmp_path / 'runs'}", *shlex.split(TINY_TRAIN)]
    trained = subprocess.run(train, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    [record] = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["phase"] == "ppo"]
    assert record["samples"] > 0 and record["loss_mean"] == record["loss_mean"]  # trained, and not NaN


TINY_TRAIN = ("model.tiny.hidden_size=64 model.tiny.intermediate_size=128 model.tiny.vocab_size=512 "
              "rollout.conversations=2 rollout.max_rounds=2 rollout.samples_per_prompt=2 rollout.max_new_tokens=16 "
              "rollout.prompt_buckets=[64,128,256] rollout.max_prompt_tokens=256 rollout.eval_conversations=1 "
              "ppo.train_batch_size=8 ppo.micro_batch_size=4 ppo.iterations=1 sft.enabled=false "
              "data.num_personas=16 logging.progress_bar=false logging.export_hf=false logging.tensorboard=false")
