"""Every command in README.md's ```bash blocks is checked, or listed with the test that covers it.

- `python launch/<x>.py ...` and `rlpa-<x> ...`: train, sft, dpo and eval are called in process with
  `--print-config` added (the arguments parse, the config and overrides load and pass the job's
  rules; nothing is built); export_hf, serve and fetch_model have their arguments parsed by the
  program's own parser and stop there (they take no config).
- A command that names GPUs (a config sized for N GPUs, times JAX_NUM_PROCESSES hosts) also has
  its config loaded and its mesh built in a process with that many fake CPU devices, its batches
  checked to split over the mesh as a run checks them.
- `python -m rlpa_jax.dialogue.personas.check data/aloe` runs on the shared ALOE copy.
- Anything else (make, pip, git, sbatch, ...) must be in NOT_RUN_HERE with the test that covers
  it; a README command that is neither checked nor listed fails the test.

The README's Python blocks must parse and every rlpa_jax name they use must exist.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Launch scripts and installed commands -> the rlpa_jax.app.commands module whose main they run
# (tests/test_install.py checks that each launch script and console command runs that module).
PROGRAMS = {"train": "train", "eval": "eval", "sft": "sft", "dpo": "dpo", "export_hf": "export_hf",
            "export": "export_hf", "serve": "serve", "fetch_model": "fetch_model", "fetch-model": "fetch_model"}
CONFIG_JOBS = {"train": "train", "sft": "sft", "dpo": "dpo", "eval": "eval"}  # programs that take --print-config
# The GPUs per host each GPU config is sized for (its name says it; its mesh is built on that many).
GPUS_PER_HOST = {"qwen2.5-3b-8gpu.yaml": 8, "qwen2.5-0.5b-1gpu.yaml": 1}
ALOE_CHECK = ("-m", "rlpa_jax.dialogue.personas.check")

# Commands not run here, each with what covers it.
NOT_RUN_HERE = {
    "make demo": "the Makefile's `launch/train.py --fresh`, whose arguments are checked above (launch/train.py --fresh); "
                 "tests/test_install.py trains a shrunk tiny config through the installed rlpa-train",
    "make test": "CI runs it: the whole suite",
    "make venv": "CI: make test and make demo build .venv through it",
    "make real-model": "make test runs launch/fetch_model.py, the same command; tests/test_real_model.py",
    "python3.11 -m venv .venv": "tests/test_recipes.py::test_the_training_path_runs_in_an_environment_without_torch "
                                "(a venv of the base dependencies trains)",
    '.venv/bin/python -m pip install -e ".[gpu]"':
        "tests/test_recipes.py::test_neither_the_package_nor_its_gpu_extra_requires_torch (GPU only)",
    '.venv/bin/python -c "import jax; print(jax.devices())"': "GPU only: the line shows which devices JAX sees",
    "pip install -c constraints.txt .": "tests/test_install.py installs the package into a fresh venv",
    "git clone --depth 1 https://github.com/ShujinWu-0814/ALOE.git /tmp/ALOE":
        "network; the shared copy (../shared/data/aloe) is that folder, checked by tests/test_aloe_check.py",
    "mkdir -p data/aloe && cp /tmp/ALOE/datasets/profile*.jsonl /tmp/ALOE/datasets/personality*.jsonl data/aloe/":
        "tests/test_aloe_check.py (the four files it copies)",
    "sbatch launch/slurm/train.sbatch":
        "tests/test_recipes.py::test_sbatch_training_command_loads_and_its_mesh_takes_every_gpu (16 fake devices)",
    '.venv/bin/pip install -c constraints.txt -e ".[wandb]"':
        "pyproject.toml's wandb extra; tests/test_wandb_logging.py logs to wandb offline",
}

# Each Python block (by its first line) and the test that runs what it shows.
PYTHON_BLOCKS = {
    "import jax": "tests/test_hf_io.py (HF folders load onto a mesh), tests/test_real_model.py",
    "import transformers": "tests/test_policy_export.py (the export's chat template, generate, parse_turn)",
}


@dataclass
class Command:
    text: str  # as the README writes it (continuation lines joined, spaces collapsed)
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)


def is_assignment(word: str) -> bool:
    return re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word) is not None


def readme_commands(text: str) -> list[Command]:
    """Every command of the ```bash blocks: continuation lines joined, comments dropped, `export`
    lines and leading NAME=value words taken as the environment of the commands after them."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        exported: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "export":
                assert all(is_assignment(w) for w in words[1:]), line
                exported |= dict(w.split("=", 1) for w in words[1:])
                continue
            env = dict(exported)
            while words and is_assignment(words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            commands.append(Command(" ".join(line.split()), words, env))
    return commands


def program_of(command: Command) -> tuple[str, list[str]] | None:
    """(the commands module, its arguments) for `python launch/<x>.py ...` or `rlpa-<x> ...`."""
    words = command.words
    if words[0] in (".venv/bin/python", "python") and len(words) > 1 and words[1].startswith("launch/"):
        script = REPO / words[1]
        assert script.is_file(), f"README names {words[1]}, which does not exist"
        return PROGRAMS[script.stem], words[2:]
    if words[0].startswith("rlpa-"):
        return PROGRAMS[words[0].removeprefix("rlpa-")], words[1:]
    return None


def gpus_named(command: Command, args: list[str]) -> int | None:
    """How many GPUs a command names: its config's GPUs per host times its hosts; None: none."""
    config = Path(args[args.index("--config") + 1]).name if "--config" in args else None
    if config not in GPUS_PER_HOST:
        return None
    per_host = GPUS_PER_HOST[config]
    if "CUDA_VISIBLE_DEVICES" in command.env:  # the GPUs it hands the run must be the config's
        assert len(command.env["CUDA_VISIBLE_DEVICES"].split(",")) == per_host, command.text
    return per_host * int(command.env.get("JAX_NUM_PROCESSES", "1"))


def overrides_of(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-") and not re.match(r"https?://", a)]


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands_and_each_is_checked_or_listed():
    texts = [c.text for c in COMMANDS]
    assert len(texts) > 20 and "make demo" in texts and "make test" in texts
    unaccounted = [t for c, t in zip(COMMANDS, texts)
                   if program_of(c) is None and c.words[1:3] != list(ALOE_CHECK) and t not in NOT_RUN_HERE]
    assert not unaccounted, f"README commands neither checked here nor listed in NOT_RUN_HERE: {unaccounted}"
    stale = set(NOT_RUN_HERE) - set(texts)
    assert not stale, f"NOT_RUN_HERE lists commands the README no longer has: {stale}"


class ArgumentsParsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@pytest.mark.parametrize("command", [c for c in COMMANDS if program_of(c)], ids=lambda c: c.text[:90])
def test_each_launch_command_parses_and_its_config_loads(command, monkeypatch, capsys):
    module_name, args = program_of(command)
    module = importlib.import_module(f"rlpa_jax.app.commands.{module_name}")
    monkeypatch.chdir(REPO)  # configs/... as the README runs them, from the checkout's root
    if module_name in CONFIG_JOBS:
        with pytest.raises(SystemExit) as done:
            module.main([*args, "--print-config"])
        out = capsys.readouterr()
        assert done.value.code == 0, out.err
        assert "--print-config" in out.out or "--help-config" in args
        return
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, argv=None, namespace=None):
        raise ArgumentsParsed(parse(parser, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(ArgumentsParsed) as parsed:
        module.main(args)
    given = {a.lstrip("-").replace("-", "_") for a in args if a.startswith("--")}
    assert given <= set(vars(parsed.value.namespace)), (given, parsed.value.namespace)


def test_the_aloe_check_command_accepts_the_shared_copy(aloe_dir, capsys):
    from rlpa_jax.dialogue.personas.check import main

    [command] = [c for c in COMMANDS if c.words[1:3] == list(ALOE_CHECK)]
    assert command.words[3:] == ["data/aloe"]  # what the README's copy step makes; here the shared copy
    assert main([str(aloe_dir)]) == 0
    assert "ok: both splits load" in capsys.readouterr().out


# In a process of its own with as many fake devices as the commands name: each config loads with
# its overrides, its mesh is built on every device, and the batches split over it as a run checks.
MESH_CHECK = """
import json, sys
import jax
from rlpa_jax.app import build
from rlpa_jax.config.options import ConfigError
results = []
for item in json.loads(sys.argv[1]):
    try:
        config = build.load_config(item["config"], item["overrides"], item["job"])
        mesh = build.build_mesh(config)
        if item["job"] == "train":
            build.check_rows_split(mesh, config, "ppo.micro_batch_size", config.ppo.micro_batch_size, "rows")
            if config.sft.enabled:
                build.check_rows_split(mesh, config, "sft.batch_size", config.sft.batch_size, "examples")
        results.append({"mesh": dict(mesh.shape), "devices": int(mesh.devices.size)})
    except (ConfigError, ValueError) as error:
        results.append({"error": str(error)})
print(json.dumps({"device_count": jax.device_count(), "results": results}))
"""


def mesh_checks(devices: int, items: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run([sys.executable, "-c", MESH_CHECK, json.dumps(items)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["device_count"] == devices
    return report["results"]


def test_gpu_and_multi_host_commands_build_their_mesh_on_as_many_fake_devices_as_they_name():
    by_devices: dict[int, list[tuple[str, dict]]] = {}
    for command in COMMANDS:
        found = program_of(command)
        if found is None or found[0] not in CONFIG_JOBS:
            continue
        module_name, args = found
        devices = gpus_named(command, args)
        if devices is None:
            continue
        item = {"config": args[args.index("--config") + 1], "overrides": overrides_of(args),
                "job": CONFIG_JOBS[module_name]}
        by_devices.setdefault(devices, []).append((command.text, item))
    # The README's GPU commands: the 3B config on one host of 8 and on 2 hosts of 8, the 0.5B on one GPU.
    assert set(by_devices) == {1, 8, 16}, sorted(by_devices)
    # And what the README says of the 3B config on 16 devices without the mesh override.
    refused = {"config": "configs/qwen2.5-3b-8gpu.yaml", "overrides": [], "job": "train"}
    for devices, checks in sorted(by_devices.items()):
        items = [item for _, item in checks] + ([refused] if devices == 16 else [])
        results = mesh_checks(devices, items)
        for (text, _), result in zip(checks, results):
            assert "error" not in result, f"{text}: {result['error']}"
            assert result["devices"] == devices, (text, result)
        if devices == 16:
            assert results[-1]["error"].startswith("mesh data=1 fsdp=8 tensor=1 spans 8 of the 16 devices")
            assert "mesh.data=2" in results[-1]["error"]
            assert {json.dumps(r["mesh"]) for r in results[:-1]} == {json.dumps({"data": 2, "fsdp": 8, "tensor": 1})}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_python_blocks_parse_and_the_rlpa_jax_names_they_use_exist():
    blocks = python_blocks(README.read_text())
    assert [b.splitlines()[0] for b in blocks] == list(PYTHON_BLOCKS)
    for block in blocks:
        tree = ast.parse(block)
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("rlpa_jax"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    target = getattr(module, alias.name, None)
                    if target is None:  # a submodule: `from rlpa_jax.model import hf`
                        target = importlib.import_module(f"{node.module}.{alias.name}")
                    modules[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                owner = modules[node.value.id]
                if isinstance(owner, type(ast)):  # a module: the function the README calls exists
                    assert hasattr(owner, node.attr), f"README calls {node.value.id}.{node.attr}, which does not exist"
