"""`pip install .` (not editable) as a user does it: this checkout's package built and installed into
a fresh virtual environment outside the checkout, its console commands run from a directory outside
the checkout, on the configs the wheel ships.

Nothing is downloaded: the new venv sees this interpreter's site-packages (jax, numpy, pip,
setuptools, ...) through a .pth file, and pip installs this package alone (--no-deps
--no-build-isolation --no-index). Python does not read the .pth files of a directory a .pth file
adds, so the editable install of the checkout that `make test`'s venv holds stays invisible there:
rlpa_jax can only come from the new venv. pip builds in its source directory, so it builds a copy of
the checkout (the checkout stays clean). A probe module, started by a second .pth file in every
interpreter of the venv, reports what the commands did: each start, whether jax was loaded when a
process restarted itself, and where rlpa_jax and its configs were imported from.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rlpa_jax.config.loading import config_file, load_config
from rlpa_jax.config.options import CONFIGS_DIR, ConfigError
from rlpa_jax.runtime import host_allocator

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = PYPROJECT["project"]["scripts"]  # rlpa-train -> rlpa_jax.app.console:train, ...
# launch/<script>.py -> its installed command
LAUNCH_COMMANDS = {"train": "rlpa-train", "eval": "rlpa-eval", "sft": "rlpa-sft", "dpo": "rlpa-dpo",
                   "export_hf": "rlpa-export", "serve": "rlpa-serve", "fetch_model": "rlpa-fetch-model"}
NO_RESTART = {"rlpa-fetch-model"}  # no XLA work: it starts as launch/fetch_model.py does, once
# Not part of what `pip install .` reads: version control, venvs, run outputs, caches, builds.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".jax_cache", ".pytest_cache", ".whl", "runs", "build", "dist",
                                    "__pycache__", "*.egg-info")
PROBE = '''"""tests/test_install.py's probe, started by _install_probe.pth in every interpreter of its venv."""
import atexit, os, sys

def report(*words):
    print("probe:", *words, file=sys.stderr, flush=True)

report("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"))
# os.execv is the restart with the allocator's tunables: was jax already imported by then?
sys.addaudithook(lambda event, args: event == "os.exec" and report("restart, jax imported:", "jax" in sys.modules))

@atexit.register
def where_from():
    options = sys.modules.get("rlpa_jax.config.options")
    if options is not None:
        report("rlpa_jax from", options.__file__, "configs from", options.CONFIGS_DIR)
'''
# A tiny world: 2 conversations of 2 rounds, 2 PPO iterations, no SFT warm start.
TINY_RUN = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.conversations=2", "rollout.max_rounds=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
    "rollout.prompt_buckets=[64,128,256]", "rollout.max_prompt_tokens=256", "ppo.train_batch_size=8",
    "ppo.micro_batch_size=4", "ppo.iterations=2", "sft.enabled=false", "logging.progress_bar=false",
    "logging.tensorboard=false", "data.num_personas=16", "mesh.devices=1", "rollout.eval_conversations=4",
]


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    workdir: Path  # an empty directory outside the checkout, where the commands run

    def run(self, command: str, *arguments: str) -> subprocess.CompletedProcess:
        """An installed command as a user starts it, with the environment a CPU user has: no
        PYTHONPATH, no allocator tunables (so a command restarts itself once to set them)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "GLIBC_TUNABLES", host_allocator.OPT_OUT, "VIRTUAL_ENV")}
        env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
        # timeout: a hang guard only (a cold compile on a loaded 2-core machine)
        return subprocess.run([str(self.venv / "bin" / command), *arguments], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=1200)


def probe_lines(stderr: str) -> list[str]:
    return [line.removeprefix("probe: ") for line in stderr.splitlines() if line.startswith("probe: ")]


def site_packages_of(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=120).stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    source = Path(shutil.copytree(REPO, root / "source", ignore=NOT_SOURCE))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site_packages = site_packages_of(python)
    ours = sysconfig.get_paths()  # where this interpreter's jax, numpy, pip and setuptools are
    (site_packages / "host-packages.pth").write_text("\n".join(dict.fromkeys((ours["purelib"], ours["platlib"]))))
    # --ignore-installed: pip sees the host's rlpa-jax (the editable one) too, and must leave it alone.
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--ignore-installed", "--disable-pip-version-check", str(source)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (site_packages / "_install_probe.py").write_text(PROBE)
    (site_packages / "_install_probe.pth").write_text("import _install_probe\n")
    workdir = root / "work"
    workdir.mkdir()
    return Installed(venv, site_packages, workdir)


def test_the_wheel_holds_every_module_the_configs_and_the_commands(installed):
    package = installed.site_packages / "rlpa_jax"
    modules = {p.relative_to(REPO / "rlpa_jax") for p in (REPO / "rlpa_jax").rglob("*.py")}
    assert modules == {p.relative_to(package) for p in package.rglob("*.py")}
    shipped = package / "_configs"
    configs = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*") if p.is_file())
    assert any(p.suffix == ".yaml" for p in configs) and any(p.parent.name == "prompts" for p in configs)
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file()) == configs
    assert all((shipped / p).read_bytes() == (REPO / "configs" / p).read_bytes() for p in configs)
    assert not (installed.site_packages / "configs").exists()  # nothing spills into site-packages itself
    assert sorted(COMMANDS) == sorted(LAUNCH_COMMANDS.values())
    assert all((installed.venv / "bin" / command).is_file() for command in COMMANDS)


# Each --help is a process that imports jax and transformers (~9 s on the CI machine): one command
# that restarts, one that does not, and eval (its own argument parser); every command's entry point
# is checked above (installed) and below (the same main as its launch script).
HELP_CHECKED = {"train": "rlpa-train", "eval": "rlpa-eval", "fetch_model": "rlpa-fetch-model"}


def test_commands_restart_with_the_tunables_before_importing_jax_then_answer_help(installed):
    for script, command in HELP_CHECKED.items():
        done = installed.run(command, "--help")
        assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
        assert done.stdout.startswith(f"usage: {command} ")
        # The description is the command module's docstring, whose usage shows the checkout's script.
        assert f"python launch/{script}.py" in done.stdout
        probe = probe_lines(done.stderr)
        starts = [line.split() for line in probe if line.startswith("start ")]
        if command in NO_RESTART:
            assert [words[2] for words in starts] == ["None"]
            continue
        # One process restarted once: the same pid, then with glibc's tunables, jax not yet imported.
        assert [words[1] for words in starts] == [starts[0][1]] * 2, probe
        assert [words[2] for words in starts] == ["None", host_allocator.TUNABLES]
        assert "restart, jax imported: False" in probe


def test_a_tiny_run_of_the_installed_package_from_outside_the_checkout(installed):
    runs = installed.workdir.parent / "runs"
    done = installed.run("rlpa-train", f"output_dir={runs}", "name=installed", *TINY_RUN)
    assert done.returncode == 0, done.stderr[-5000:]
    # The default config came from the wheel (the working directory has no configs/), and so did
    # every module: rlpa_jax and its configs are the venv's.
    (where,) = [line for line in probe_lines(done.stderr) if line.startswith("rlpa_jax from")]
    _, _, module, _, _, configs = where.split()
    package = (installed.site_packages / "rlpa_jax").resolve()
    assert Path(module).resolve() == package / "config" / "options.py" and Path(configs) == package / "_configs"
    assert not (installed.workdir / "configs").exists()
    run_dir = runs / "installed"
    assert f"run directory: {run_dir}" in done.stdout
    records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"phase": "ppo"' in line]
    assert [re.search(r'"step": (\d+)', line).group(1) for line in records] == ["0", "1"]
    assert (run_dir / "checkpoints" / "2").is_dir()


def test_the_launch_scripts_run_the_package_commands():
    for script in LAUNCH_COMMANDS:
        main = runpy.run_path(str(REPO / "launch" / f"{script}.py"), run_name=f"launch_{script}")["main"]
        assert main.__module__ == f"rlpa_jax.app.commands.{script}"


def test_a_config_missing_where_named_is_found_among_the_shipped_ones_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert config_file(None) == CONFIGS_DIR / "tiny.yaml"
    assert config_file("tiny.yaml") == config_file("configs/tiny.yaml") == CONFIGS_DIR / "tiny.yaml"
    assert config_file("elsewhere/tiny.yaml") == Path("elsewhere/tiny.yaml")  # a directory the user named
    assert load_config("configs/qwen2.5-3b-8gpu.yaml").model.path == "/models/Qwen2.5-3B-Instruct"
    (tmp_path / "tiny.yaml").write_text("name: mine\n")  # the user's own file comes first
    assert config_file("tiny.yaml") == Path("tiny.yaml") and load_config("tiny.yaml").name == "mine"
    with pytest.raises(ConfigError, match=r"no-such\.yaml: config file not found \(shipped configs, found by name: "
                                          r".*qwen2\.5-3b-8gpu\.yaml.*tiny\.yaml"):
        load_config("no-such.yaml")


def test_the_tested_versions_pin_every_dependency_inside_its_range():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for text in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(text)
        name = requirement.name.lower()
        assert name in pins, f"constraints.txt has no tested version of {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {text!r}"
