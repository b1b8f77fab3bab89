"""The option reference (rlpa_jax/config/reference.py): every option declares its meaning,
docs/CONFIG.md is what the declarations generate, and the launch scripts' --help-config and
--print-config (the resolved config with where each value came from) without building anything."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlpa_jax.app import build
from rlpa_jax.config import reference
from rlpa_jax.config.loading import load_config, load_config_and_sources, origin
from rlpa_jax.config.tree import DEFAULT_CONFIG, TrainConfig, to_dict

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "qwen2.5-3b-8gpu.yaml"
# A child imports jax and the package: minutes at most on a loaded machine; only a hang guard.
CHILD_HANG_GUARD_S = 300


def dotted_leaves(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        keys += dotted_leaves(value, dotted) if isinstance(value, dict) else [dotted]
    return keys


def test_every_option_and_section_declares_its_meaning():
    missing = reference.undocumented()
    assert not missing, (f"options without a meaning: {', '.join(missing)}; declare one next to each "
                         f"(option(..., doc=...) or section(cls, doc=...) in rlpa_jax/config/), then run "
                         f"`{reference.REGENERATE}`")


def test_the_reference_lists_every_key_of_the_tree_with_its_default():
    defaults = TrainConfig()
    listed = {option.key: option for option in reference.options()}
    keys = dotted_leaves(to_dict(defaults))
    assert len(listed) == len(list(reference.options())) == len(keys) and set(listed) == set(keys)  # each once
    for key, option in listed.items():
        value = defaults
        for name in key.split("."):
            value = getattr(value, name)
        assert option.default == value, key
    # What the tables say, for a few kinds of option (SharedLLMSection changes defaults, keeps meanings).
    assert (listed["llm.model"].default, listed["user.llm.model"].default) == ("gpt-4o-mini", None)
    assert listed["llm.model"].meaning == listed["user.llm.model"].meaning != ""
    assert listed["ppo.clip_eps"].accepts == "a number > 0" and listed["ppo.clip_eps"].type == "float"
    assert listed["ppo.output_scale_lr"].type == "float | null"
    assert listed["model.remat"].accepts == "one of ['none', 'full', 'dots']"
    assert listed["rollout.prompt_buckets"].type == "list[int]"
    # No checkout's absolute path in the reference (docs/CONFIG.md is the same on every machine).
    assert listed["rollout.system_prompt"].accepts.startswith("the name of a prompt file in configs/prompts/ ")


def test_docs_config_md_is_what_the_declarations_generate():
    generated = reference.reference_markdown()
    written = reference.CONFIG_DOC.read_text() if reference.CONFIG_DOC.is_file() else ""
    assert written == generated, (f"docs/CONFIG.md is out of date with the option declarations; regenerate it "
                                  f"from the repository root: {reference.REGENERATE}")
    assert reference.REGENERATE in written.splitlines()[2]  # the file says how it is made


def test_the_terminal_reference_filters_by_section_or_key():
    everything = reference.reference_text()
    assert all(f"  {option.key} = " in everything for option in reference.options())
    ppo = reference.reference_text("ppo")
    keys = re.findall(r"^  (\S+) = ", ppo, flags=re.M)
    assert keys == [o.key for o in reference.options() if o.key.startswith("ppo.")]
    assert "  ppo.clip_eps = 0.2    accepts a number > 0\n      clip range of the policy's probability ratio" in ppo
    assert re.findall(r"^  (\S+) = ", reference.reference_text("rollout.top_p"), flags=re.M) == ["rollout.top_p"]
    judges = re.findall(r"^  (\S+) = ", reference.reference_text("judges.profile"), flags=re.M)
    assert judges[0] == "judges.profile.llm.backend" and all(k.startswith("judges.profile.llm.") for k in judges)
    assert reference.reference_text("ppo.nonexistent") == reference.reference_text("pp") == ""


# ---------------------------------------------------------------------------------------------
# The resolved config, with where each value came from


def annotated(path, overrides):
    config, sources = load_config_and_sources(path, overrides)
    return config, sources, reference.annotated_yaml(config, lambda key: origin(sources, key), "heading")


@pytest.mark.parametrize("path, overrides", [
    (None, ["ppo.actor_lr=1e-6", "user.kind=llm", "llm.base_url=http://127.0.0.1:9/v1", "name='a run: #1'"]),
    (PAPER, ["judges.llm.model='gpt-4o #2'", "llm.api_key_env='null'"]),  # strings YAML must quote
])
def test_the_printed_config_loads_back_as_the_same_config(tmp_path, path, overrides):
    config, _, text = annotated(path, overrides)
    assert yaml.safe_load(text) == to_dict(config)
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(printed) == config  # the resolved config, inherited LLM fields included, as a file


def test_each_value_says_where_it_came_from():
    overrides = ["ppo.actor_lr=1e-6", "llm.base_url=http://127.0.0.1:9/v1", "judges.llm.model=judge-model"]
    config, sources, text = annotated(None, overrides)
    comments = dict(re.findall(r"^ *(\w+: .*?) +# (.*)$", text, flags=re.M))
    assert comments["actor_lr: 1.0e-06"] == "command-line override 'ppo.actor_lr=1e-6'"
    assert comments["remat: none"] == "default"
    # A value from the file names the file and the line that holds its key.
    source = origin(sources, "rollout.max_rounds")
    file, line = source.rsplit(":", 1)
    assert Path(file) == DEFAULT_CONFIG and comments["max_rounds: 4"] == source
    assert DEFAULT_CONFIG.read_text().splitlines()[int(line) - 1].strip() == "max_rounds: 4"
    # A role's unset LLM field says which section it inherits from, and where that one got it.
    assert origin(sources, "user.llm.base_url") == (
        "command-line override 'llm.base_url=http://127.0.0.1:9/v1', inherited from llm.base_url")
    assert origin(sources, "judges.profile.llm.model") == (
        "command-line override 'judges.llm.model=judge-model', inherited from judges.llm.model")
    assert origin(sources, "eval.judge.llm.timeout_s") == "default, inherited from llm.timeout_s"
    assert config.judges.profile.llm.model == "judge-model" and config.eval.judge.llm.timeout_s == 60.0


# ---------------------------------------------------------------------------------------------
# The launch scripts


def launch_main(script: str):
    return runpy.run_path(str(REPO / "launch" / script), run_name=f"launch_{script[:-3]}")["main"]


@pytest.mark.parametrize("script, job, arguments", [
    ("train.py", "train", ["--fresh"]),
    ("sft.py", "sft", ["sft.steps=7"]),
    ("dpo.py", "dpo", ["--init", "runs/x/sft"]),
    ("eval.py", "eval", ["--setting", "vanilla"]),  # no --policy: printing the config needs none
])
def test_print_config_prints_the_resolved_config_and_builds_nothing(tmp_path, capsys, script, job, arguments):
    main = launch_main(script)
    with pytest.raises(SystemExit) as stop:
        main(["--print-config", f"output_dir={tmp_path / 'runs'}", "rollout.max_rounds=3", *arguments])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    expected = build.load_config(None, [f"output_dir={tmp_path / 'runs'}", "rollout.max_rounds=3",
                                        *[a for a in arguments if "=" in a],
                                        *(["model.init_checkpoint=runs/x/sft"] if script == "dpo.py" else [])], job)
    assert yaml.safe_load(out) == to_dict(expected)
    assert out.startswith(f"# {script} --print-config: {DEFAULT_CONFIG} with ") and f"checked for {job};" in out
    assert re.search(r"^  max_rounds: 3 +# command-line override 'rollout.max_rounds=3'$", out, flags=re.M)
    if script == "dpo.py":  # --init is the override it stands for
        assert re.search(r"init_checkpoint: runs/x/sft +# command-line override 'model.init_checkpoint=", out)
    assert not (tmp_path / "runs").exists()  # no run directory, no compile cache: nothing was built


def test_print_config_of_a_bad_config_lists_its_problems_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        launch_main("train.py")(["--print-config", "ppo.clip_eps=-1", "rollout.top_p=0"])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n  ") == 2  # one line per problem
    with pytest.raises(SystemExit) as stop:
        launch_main("train.py")(["--print-config", "ppo.clip_eps=-1"])
    assert stop.value.code == 2 and "ppo.clip_eps: expected a number > 0, got -1.0" in capsys.readouterr().err


def test_help_config_lists_a_sections_options_and_help_lists_the_sections(capsys):
    main = launch_main("sft.py")
    with pytest.raises(SystemExit) as stop:
        main(["--help-config", "sft"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == reference.reference_text("sft")
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--print-config" in out and "--help-config [SECTION]" in out
    assert all(re.search(rf"^  {name} +{re.escape(meaning)}$", out, flags=re.M)
               for name, meaning in (("ppo", "PPO: optimizer, losses, KL penalty, advantages"),
                                     ("mesh", "how the devices are laid out (runtime/parallel.py)")))
    with pytest.raises(SystemExit) as stop:
        main(["--help-config", "ppo.nonexistent"])
    assert stop.value.code == 2 and "no option or section of that name; sections: model, model.tiny, mesh" in (
        capsys.readouterr().err)


def test_eval_still_requires_a_policy_to_run(capsys):
    with pytest.raises(SystemExit) as stop:
        launch_main("eval.py")(["--setting", "vanilla"])
    assert stop.value.code == 2 and "the following arguments are required: --policy" in capsys.readouterr().err


def test_print_config_from_the_command_line_on_the_paper_config():
    """As a user runs it: a process of its own, the file's own lines named."""
    result = subprocess.run([sys.executable, "launch/eval.py", "--print-config", "--config", str(PAPER)],
                            cwd=REPO, capture_output=True, text=True, timeout=CHILD_HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == to_dict(build.load_config(PAPER, [], "eval"))
    fsdp_line = next(i for i, line in enumerate(PAPER.read_text().splitlines(), 1) if line.startswith("mesh:"))
    assert re.search(rf"^  fsdp: 8 +# {re.escape(str(PAPER))}:{fsdp_line}$", result.stdout, flags=re.M)
