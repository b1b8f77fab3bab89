"""YAML configs with dotted overrides, and errors that name the key and list what is accepted."""

import copy
import dataclasses
import json
import re
import runpy
import typing
from pathlib import Path

import jax
import pytest

from rlpa_jax.app import build, jobs
from rlpa_jax.config.llm_sections import with_inherited_llm_sections
from rlpa_jax.config.loading import load_config, validate
from rlpa_jax.config.options import ConfigError, domain_of
from rlpa_jax.config.tree import DPOConfig, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_default_is_the_embedded_tiny_world():
    config = load_config()
    assert config.model.path is None and config.user.kind == "scripted" and config.judges.kind == "embedded"


def test_paper_recipe_in_the_3b_config():
    c = load_config(REPO_ROOT / "configs" / "qwen2.5-3b-8gpu.yaml")
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, 8, 1)
    assert (c.ppo.actor_lr, c.ppo.critic_lr, c.ppo.kl_coef, c.ppo.lam, c.ppo.gamma) == (5e-7, 9e-6, 0.01, 0.95, 1.0)
    assert (c.ppo.clip_eps, c.ppo.value_clip_eps, c.ppo.train_batch_size, c.rollout.samples_per_prompt) == (0.2, 0.2, 128, 4)
    # The paper's schedule: a pool of 256 live conversations, one turn (256 prompts) per PPO step.
    assert (c.rollout.schedule, c.rollout.conversations, c.rollout.max_rounds) == ("turn", 256, 10)
    assert c.model.compute_dtype == "bfloat16" and (c.ppo.adam_b1, c.ppo.adam_b2) == (0.9, 0.95)


def test_dotted_overrides_with_types():
    c = load_config(None, ["ppo.actor_lr=1e-6", "rollout.max_rounds=3", "model.tiny.hidden_size=64",
                           "data.switch_turn=2", "rollout.prompt_buckets=[64,128]", "logging.tensorboard=false",
                           "ppo.output_scale_lr=0.02"])
    assert c.ppo.actor_lr == 1e-6 and c.ppo.output_scale_lr == 0.02 and c.rollout.max_rounds == 3 and c.model.tiny.hidden_size == 64
    assert c.data.switch_turn == 2 and c.rollout.prompt_buckets == [64, 128] and c.logging.tensorboard is False


@pytest.mark.parametrize("override, message", [
    ("ppo.actor_rate=1", r"unknown key 'actor_rate' at ppo; valid keys: .*actor_lr"),
    ("nonsense=1", r"unknown key 'nonsense' at top level; valid keys: .*ppo"),
    ("ppo.actor_lr=fast", r"ppo.actor_lr: expected a number, got 'fast'"),
    ("ppo.advantage=td", r"ppo.advantage='td' is not one of gae, cross_turn, grpo \(ppo.advantage from command-line override"),
    ("rollout.max_rounds=2.5", r"rollout.max_rounds: expected an integer"),
    ("ppo.actor_lr", r"expected key.path=value"),
    ("ppo.micro_batch_size=7", r"train_batch_size=32 must be a multiple of ppo.micro_batch_size=7"),
    ("rollout.eval_conversations=0", r"rollout.eval_conversations: expected an integer >= 1, got 0"),
    ("ppo.credit=items", r"ppo.credit='items' is not one of turn, block, item"),
    ("ppo.credit=item ppo.advantage=gae", r"ppo.credit=item needs ppo.advantage=grpo"),
    ("ppo.advantage=grpo rollout.samples_per_prompt=1", r"ppo.advantage=grpo needs rollout.samples_per_prompt >= 2"),
    ("rollout.generator=vllm", r"rollout.generator='vllm' is not one of jax"),
    ("user.kind=robot", r"user.kind='robot' is not one of scripted, llm"),
    ("judges.kind=human", r"judges.kind='human' is not one of embedded, llm"),
    ("ppo.output_scale_lr=0", r"ppo.output_scale_lr: expected a number > 0 or null, got 0.0"),
    # Rows split over the mesh's data x fsdp devices, as far as the config fixes them (-1: at build time).
    ("mesh.data=2 ppo.micro_batch_size=3 ppo.train_batch_size=6",
     r"ppo.micro_batch_size=3 must be a multiple of mesh.data=2 \(each micro-batch's rows are split over the "
     r"mesh's data x fsdp devices; mesh.fsdp=-1 takes the remaining devices\)"),
    ("mesh.data=2 mesh.fsdp=4 mesh.tensor=-1 ppo.micro_batch_size=12 ppo.train_batch_size=24",
     r"ppo.micro_batch_size=12 must be a multiple of mesh.data\*mesh.fsdp=8 .*mesh.fsdp from command-line override"),
    ("mesh.fsdp=4 sft.batch_size=6", r"sft.batch_size=6 must be a multiple of mesh.data\*mesh.fsdp=4 \(each SFT "
                                     r"step's examples are split .*sft.enabled from .*tiny.yaml"),
    ("judges.kind=llm llm.base_url=http://127.0.0.1:9/v1 ppo.credit=item",
     r"ppo.credit=item needs a profile judge that says which items matched, but judges.kind=llm's only counts "
     r"them; use judges.kind=embedded, or another ppo.credit"),
    ("model.tiny.vocab_size=100", r"model.tiny.vocab_size=100 is too small for the tokenizer trained for the tiny "
                                  r"model .*needs at least 259 ids"),
])
def test_bad_overrides_are_explained(override, message):
    # build.load_config: config.load_config plus the names of implementations checked against their tables.
    with pytest.raises(ConfigError, match=message):
        build.load_config(None, override.split())


def test_combinations_that_are_fine_are_accepted():
    # The rows rule reads only what the config fixes; the others leave valid neighbours alone.
    for overrides in (["mesh.data=2", "ppo.micro_batch_size=4", "ppo.train_batch_size=8", "sft.batch_size=6"],
                      ["mesh.fsdp=4", "sft.enabled=false", "sft.batch_size=6"],  # PPO alone: no SFT batch
                      ["judges.kind=llm", "llm.base_url=http://127.0.0.1:9/v1", "ppo.credit=item", "ppo.reward=response"],
                      ["model.tiny.vocab_size=100", "model.tokenizer_path=/some/tokenizer"],
                      ["ppo.advantage=grpo", "rollout.samples_per_prompt=4", "ppo.micro_batch_size=6",
                       "ppo.train_batch_size=12"]):  # GRPO completes the last group (rl/advantages.py)
        build.load_config(None, overrides)


def test_the_judge_kinds_say_whether_they_match_items():
    from rlpa_jax.dialogue import judges
    assert set(judges.PROFILE_JUDGE_TYPES) == set(judges.JUDGES)
    assert isinstance(judges.build_judges(build.load_config().judges)[0], judges.PROFILE_JUDGE_TYPES["embedded"])


# Each accepted for PPO (launch/train.py), refused for the program that reads the keys.
JOB_PROBLEMS = {
    "sft": (["mesh.fsdp=4", "sft.enabled=false", "sft.batch_size=6"],
            r"sft.batch_size=6 must be a multiple of mesh.data\*mesh.fsdp=4 \(each SFT step's examples are split"),
    "dpo": (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=-1", "dpo.batch_size=6"],
            r"dpo.batch_size=6 must be a multiple of mesh.data\*mesh.fsdp=4 \(each DPO step's preference pairs"),
    "eval": (["judges.kind=llm", "judges.profile.llm.base_url=http://127.0.0.1:9/v1",
              "judges.response.llm.base_url=http://127.0.0.1:9/v1"],
             r"eval.judge.llm.base_url: the evaluation's judge \(judges.kind=llm\) needs an LLM endpoint; "
             r"set eval.judge.llm.base_url or judges.llm.base_url or llm.base_url"),
}


@pytest.mark.parametrize("job", sorted(JOB_PROBLEMS))
def test_each_program_checks_the_sections_it_reads(job, capsys):
    overrides, message = JOB_PROBLEMS[job]
    build.load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        build.load_config(None, overrides, job=job)
    # The launch script loads its config for its own job: it stops at load, before building anything.
    main = runpy.run_path(str(REPO_ROOT / "launch" / f"{job}.py"), run_name=f"launch_{job}")["main"]
    arguments = ["--policy", "hf:/nowhere"] if job == "eval" else []
    with pytest.raises(SystemExit) as stop:
        main([*arguments, *overrides])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_batch_the_built_mesh_cannot_split_is_refused_before_anything_runs(tmp_path):
    # mesh.fsdp=-1 takes the remaining devices (8 in the tests): only the built mesh knows the split.
    devices = jax.device_count()
    if devices < 2:
        pytest.skip("needs several devices (tests/conftest.py makes 8)")
    rows = devices + 1
    split = (rf"must be a multiple of the mesh's data x fsdp devices, 1 x {devices} = {devices} here "
             rf"\(mesh.data=1, mesh.fsdp=-1, mesh.tensor=1 on {devices} of {devices} devices; ")
    for overrides, key in ((["sft.enabled=false", f"ppo.micro_batch_size={rows}", f"ppo.train_batch_size={rows}"],
                            "ppo.micro_batch_size"),
                           ([f"sft.batch_size={rows}"], "sft.batch_size")):  # PPO's SFT warm start
        config = build.load_config(None, [f"output_dir={tmp_path}", f"name=ppo_{key}", *overrides])
        with pytest.raises(ConfigError, match=rf"{key}={rows} {split}"):
            build.build_trainer(config)
    for job in ("sft", "dpo"):
        config = build.load_config(None, [f"output_dir={tmp_path}", f"name={job}", f"{job}.batch_size={rows}"], job=job)
        with pytest.raises(ConfigError, match=rf"{job}.batch_size={rows} {split}"):
            getattr(jobs, job)(config)
    assert not list(tmp_path.glob("*/tokenizer")) and not list(tmp_path.glob("*/*.yaml"))  # nothing was built


def test_an_unknown_job_is_named():
    with pytest.raises(ValueError, match=r"job 'serve' is not one of train, sft, dpo, eval"):
        build.load_config(None, [], job="serve")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: {actor_lr: [1, 2}")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("ppo:\n  clip: 0.2\n")
    with pytest.raises(ConfigError, match=r"ppo.clip: unknown key 'clip' at ppo; valid keys: .*clip_eps.* \(.*bad.yaml\)"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------
# Every option has a domain, and every problem is reported at once with its source

# Values tried, in order, until one falls outside an option's domain.
PROBES = {int: [0, -1, -2, 10**12], float: [0.0, -1.0, 1.0, 1.5], str: [""], list: [[], [2, 1], [0, 1]]}
NOT_A_BOOL = "maybe"  # YAML would read "yes"/"no" as booleans
NOT_A_CHOICE = "not-a-choice"


def config_leaves(cls=TrainConfig, prefix=""):
    """(dotted key, field, annotation) for every option of the tree."""
    hints = typing.get_type_hints(cls)
    for option in dataclasses.fields(cls):
        annotation = hints[option.name]
        if dataclasses.is_dataclass(annotation):
            yield from config_leaves(annotation, f"{prefix}{option.name}.")
        else:
            yield f"{prefix}{option.name}", option, annotation


def out_of_domain(key, option, annotation):
    inner = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation) \
        if type(None) in typing.get_args(annotation) else annotation
    if inner is bool:
        return NOT_A_BOOL
    if typing.get_origin(inner) is typing.Literal:
        return NOT_A_CHOICE
    domain = domain_of(option, annotation)
    assert domain is not None, f"{key} declares no domain: give it option(default, <domain>) in rlpa_jax/config/tree.py"
    probes = PROBES[typing.get_origin(inner) or inner]
    rejected = [value for value in probes if not domain.admits(value)]
    assert rejected, f"{key}: its domain ({domain.description}) accepts every probe {probes}; is it a real domain?"
    return rejected[0]


LEAVES = list(config_leaves())


def test_the_walk_sees_every_section():
    keys = {key for key, _, _ in LEAVES}
    assert {"model.tiny.hidden_size", "user.llm.timeout_s", "judges.llm.base_url", "ppo.clip_eps",
            "logging.max_to_keep", "seed"} <= keys and len(keys) > 80


@pytest.mark.parametrize("key, option, annotation", LEAVES, ids=[key for key, _, _ in LEAVES])
def test_every_option_rejects_a_value_outside_its_domain(key, option, annotation):
    bad = out_of_domain(key, option, annotation)
    override = f"{key}={json.dumps(bad)}"
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    lines = [line.strip() for line in str(error.value).splitlines()]
    named = [line for line in lines if line.startswith(f"{key}:")]
    assert named, f"no line names {key}:\n{error.value}"
    assert f"got {bad!r}" in named[0] or f"got {float(bad)!r}" in named[0], named[0]
    assert f"command-line override {override!r}" in named[0]


def test_the_defaults_and_shipped_values_are_inside_their_domains():
    validate(TrainConfig())
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        validate(load_config(path))


def test_every_problem_is_reported_at_once(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("ppo:\n  clip_eps: 0\n  gamma: 1.5\n  clip: 0.2\nrollout:\n  top_p: 0\n"
                           "  prompt_buckets: [256, 128]\nlogging: {tensorboard: maybe}\n")
    overrides = ["rollout.samples_per_prompt=0", "ppo.actor_lr=fast", "mesh.tensor=0", "ppo.micro_batch_size=48"]
    with pytest.raises(ConfigError) as error:
        load_config(config_file, overrides)
    message = str(error.value)
    lines = message.splitlines()
    assert lines[0] == f"{config_file} with overrides: 10 problems:", message
    from_file, from_override = f"({config_file})", "(command-line override "
    expected = {
        "ppo.clip_eps: expected a number > 0, got 0.0": from_file,
        "ppo.gamma: expected a number in [0, 1], got 1.5": from_file,
        "ppo.clip: unknown key 'clip' at ppo": from_file,
        "rollout.top_p: expected a number in (0, 1], got 0.0": from_file,
        "rollout.prompt_buckets: expected a non-empty list of increasing positive integers, got [256, 128]": from_file,
        "logging.tensorboard: expected true or false, got 'maybe'": from_file,
        "rollout.samples_per_prompt: expected an integer >= 1, got 0": from_override + "'rollout.samples_per_prompt=0')",
        "ppo.actor_lr: expected a number, got 'fast'": from_override + "'ppo.actor_lr=fast')",
        "mesh.tensor: expected an integer >= 1, or -1 (all remaining devices), got 0": from_override + "'mesh.tensor=0')",
        "ppo.train_batch_size=128 must be a multiple of ppo.micro_batch_size=48":
            "(ppo.train_batch_size from default; ppo.micro_batch_size from command-line override 'ppo.micro_batch_size=48')",
    }
    for start, source in expected.items():
        line = next((line for line in lines[1:] if line.strip().startswith(start)), None)
        assert line is not None, f"missing {start!r} in\n{message}"
        assert line.endswith(source), f"{line!r} should end with {source!r}"


def test_an_override_is_blamed_not_the_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("ppo: {clip_eps: 0.3}\n")
    with pytest.raises(ConfigError, match=r"ppo.clip_eps: expected a number > 0, got -0.1 "
                                          r"\(command-line override 'ppo.clip_eps=-0.1'\)$"):
        load_config(config_file, ["ppo.clip_eps=-0.1"])
    config_file.write_text("ppo: {clip_eps: -0.1}\n")
    with pytest.raises(ConfigError, match=r"ppo.clip_eps: expected a number > 0, got -0.1 \(.*run.yaml\)$"):
        load_config(config_file)
    assert load_config(config_file, ["ppo.clip_eps=0.1"]).ppo.clip_eps == 0.1  # the override fixes the file


def test_a_rule_whose_inputs_already_failed_is_not_run():
    # micro_batch_size=0 is reported once, as out of range, not also as a division by zero.
    with pytest.raises(ConfigError) as error:
        load_config(None, ["ppo.micro_batch_size=0"])
    assert str(error.value).count("\n") == 1 and "ppo.micro_batch_size: expected an integer >= 1, got 0" in str(error.value)


def test_validate_collects_problems_of_a_config_built_in_code():
    default = TrainConfig()
    config = dataclasses.replace(default, ppo=dataclasses.replace(default.ppo, clip_eps=0.0),
                                 rollout=dataclasses.replace(default.rollout, top_k=-1),
                                 mesh=dataclasses.replace(default.mesh, data=-1))
    with pytest.raises(ConfigError) as error:
        validate(config, "my script")
    message = str(error.value)
    assert message.startswith("my script: 3 problems:")
    assert "ppo.clip_eps: expected a number > 0, got 0.0" in message
    assert "rollout.top_k: expected an integer >= 0, got -1" in message
    assert "mesh.data and mesh.fsdp are -1" in message


# ---------------------------------------------------------------------------------------------
# A loaded config is a value: frozen, and inheritance builds a new one


def config_sections(cls=TrainConfig):
    """Every dataclass of the tree (sections and the LLM sections inside them)."""
    yield cls
    for annotation in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(annotation):
            yield from config_sections(annotation)


def test_a_loaded_config_cannot_be_changed_in_place():
    config = load_config(None, ["llm.base_url=http://127.0.0.1:1/v1"])
    for assign in (lambda: setattr(config, "seed", 1), lambda: setattr(config.ppo, "clip_eps", 0.1),
                   lambda: setattr(config.mesh, "data", 2), lambda: setattr(config.dpo, "beta", 0.2),
                   lambda: setattr(config.judges.profile.llm, "model", "other")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            assign()
    assert config.seed == 0 and config.ppo.clip_eps == 0.2 and config.judges.profile.llm.model == "gpt-4o-mini"
    unfrozen = [cls.__name__ for cls in config_sections() if not cls.__dataclass_params__.frozen]
    assert unfrozen == []


def test_inheritance_returns_a_new_config_and_leaves_its_input_alone():
    default = TrainConfig()
    given = dataclasses.replace(
        default, llm=dataclasses.replace(default.llm, base_url="http://127.0.0.1:1/v1", rpm=60.0),
        judges=dataclasses.replace(default.judges, llm=dataclasses.replace(default.judges.llm, model="judge-model")))
    before = copy.deepcopy(given)

    filled = with_inherited_llm_sections(given)

    assert given == before and given.user.llm.base_url is None and given.judges.profile.llm.model is None
    assert filled is not given
    # user.llm <- llm; judges.profile.llm <- judges.llm <- llm (the judges' model, the shared endpoint)
    assert (filled.user.llm.base_url, filled.user.llm.model, filled.user.llm.rpm) == \
        ("http://127.0.0.1:1/v1", "gpt-4o-mini", 60.0)
    for role in (filled.judges.profile.llm, filled.judges.response.llm, filled.eval.judge.llm):
        assert (role.base_url, role.model, role.timeout_s) == ("http://127.0.0.1:1/v1", "judge-model", 60.0)
    # Everything outside the LLM sections is the input's own.
    assert filled.ppo is given.ppo and filled.rollout is given.rollout
    assert validate(given) == filled and given == before


# ---------------------------------------------------------------------------------------------
# DPO settings: the dpo section, set by ordinary dotted overrides


def test_dpo_overrides_set_the_dpo_section():
    config = load_config(None, ["dpo.beta=0.2", "dpo.steps=100"])
    assert config.dpo == dataclasses.replace(DPOConfig(), beta=0.2, steps=100)
    assert load_config().dpo == DPOConfig()  # configs/tiny.yaml keeps the defaults


def test_bad_dpo_overrides_are_reported_with_their_keys_among_the_others():
    overrides = ["dpo.beta=0", "dpo.steps=many", "dpo.temperature=1", "dpo.label_smoothing=0.5", "ppo.clip_eps=0"]
    with pytest.raises(ConfigError) as error:
        build.load_config(None, overrides)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("with overrides: 5 problems:"), error.value
    expected = [
        "dpo.beta: expected a number > 0, got 0.0 (command-line override 'dpo.beta=0')",
        "dpo.steps: expected an integer, got 'many' (command-line override 'dpo.steps=many')",
        "dpo.temperature: unknown key 'temperature' at dpo; valid keys: batch_size, beta, label_smoothing, "
        "learning_rate, num_dialogues, steps, warmup_steps (command-line override 'dpo.temperature=1')",
        "dpo.label_smoothing: expected a number in [0, 0.5), got 0.5 (command-line override 'dpo.label_smoothing=0.5')",
        "ppo.clip_eps: expected a number > 0, got 0.0 (command-line override 'ppo.clip_eps=0')",
    ]
    assert sorted(line.strip() for line in lines[1:]) == sorted(expected)
