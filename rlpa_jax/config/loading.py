"""A config from a YAML file and dotted command-line overrides, checked in one pass.

    config = load_config("configs/tiny.yaml", ["ppo.actor_lr=1e-6", "rollout.max_rounds=4"])

Unknown keys, types, option domains and the cross-field rules are all checked before anything
runs; one ConfigError lists every problem with its dotted key, the value, what is accepted and
where the value came from (the YAML file or the command-line override).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from rlpa_jax.config.llm_sections import LLM_PARENTS, with_inherited_llm_sections
from rlpa_jax.config.options import (
    CONFIGS_DIR,
    DEFAULT_SOURCE,
    ConfigError,
    Problems,
    Sources,
    build_section,
    check_domains,
    field_types,
)
from rlpa_jax.config.rules import CrossFieldRule, check_rules
from rlpa_jax.config.tree import DEFAULT_CONFIG, TrainConfig


def validate(config: TrainConfig, where: str = "config", job: str = "train") -> TrainConfig:
    """Every option against its domain, then the cross-field rules (those of every job and `job`'s
    own: config/rules.py JOB_RULES) on the config with each role's unset LLM fields filled from its
    parents; one ConfigError lists every problem. Returns that filled-in config (a new one: `config`
    is left as it is)."""
    problems = Problems(lambda key: None)
    check_domains(config, "", problems)
    config = with_inherited_llm_sections(config)  # each role's section becomes the endpoint it uses
    check_rules(config, problems, job=job)
    problems.raise_if_any(where)
    return config


# ---------------------------------------------------------------------------------------------
# YAML + dotted overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command-line override {text!r}: expected key.path=value (e.g. ppo.actor_lr=1e-6)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads "1e-6" as a string; numbers in scientific notation are what people type.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_override(tree: dict, path: list[str], value: Any, cls=TrainConfig) -> str | None:
    """Sets `value` at `path`; returns what is wrong instead when the path names no option."""
    node, node_cls = tree, cls
    for depth, key in enumerate(path):
        fields = field_types(node_cls)
        if key not in fields:
            where = ".".join(path[:depth]) or "top level"
            return f"unknown key {key!r} at {where}; valid keys: {', '.join(sorted(fields))}"
        if depth == len(path) - 1:
            node[key] = value
            return None
        child = fields[key]
        if not dataclasses.is_dataclass(child):
            return f"{'.'.join(path[:depth + 1])} is not a section"
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return f"{'.'.join(path[:depth + 1])} is {node!r} in the file, not a section"
        node_cls = child
    return None


def config_file(path: str | Path | None) -> Path:
    """The YAML file `path` names: the file itself when it exists; else, for a bare file name or
    configs/<name>, the shipped config of that name (an installed package's working directory has no
    configs/); None: the shipped tiny.yaml."""
    if not path:
        return DEFAULT_CONFIG
    path, shipped = Path(path), CONFIGS_DIR / Path(path).name
    if not path.exists() and path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = (), job: str = "train") -> TrainConfig:
    """Read YAML (`config_file(path)`: default configs/tiny.yaml), apply dotted overrides, check
    everything at once.

    `rules` are more cross-field checks, (keys they read, check), from the layers that know what a
    name means (rlpa_jax/app/build.py checks every kind against the table of implementations).
    `job` is the program the config is for (train, sft, dpo, eval): its own rules are checked too."""
    return load_config_and_sources(path, overrides, rules, job)[0]


def load_config_and_sources(path: str | Path | None = None, overrides: list[str] | None = None,
                            rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = (),
                            job: str = "train") -> tuple[TrainConfig, Sources]:
    """load_config's config, and where each of its values came from (`origin` reads it)."""
    path = config_file(path)
    try:
        file_text = path.read_text()
        tree = yaml.safe_load(file_text) or {}
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"{path}: config file not found (shipped configs, found by name: {shipped})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    sources = Sources(str(path), tree, key_lines(yaml.compose(file_text)))
    problems = Problems(sources)
    for text in overrides or []:
        try:
            keys, value = parse_override(text)
        except ConfigError as error:
            problems.add_line(str(error))
            continue
        problem = _set_override(tree, keys, value)
        if problem:
            problems.add(".".join(keys), problem, source=f"command-line override {text!r}")
        else:
            sources.set_by_override(".".join(keys), text)
    config = build_section(TrainConfig, tree, "", problems)
    check_domains(config, "", problems)  # before inheriting: a bad value is reported where it was set
    config = with_inherited_llm_sections(config)
    check_rules(config, problems, rules, job)
    problems.raise_if_any(f"{path}{' with overrides' if overrides else ''}")
    return config, sources


def key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """The line (from 1) on which each dotted key of a composed YAML mapping is written."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        lines[key] = key_node.start_mark.line + 1
        lines.update(key_lines(value_node, key))
    return lines


def origin(sources: Sources, key: str) -> str:
    """Where the value of `key` in the loaded (inherited) config came from: `default`, the file and
    line (`configs/x.yaml:12`), a command-line override, or, for a role's LLM field left unset,
    where the section it inherits from got it (`default, inherited from llm.model`)."""
    source, inherited_from = sources.where(key), key
    section, _, name = key.rpartition(".")
    while source == DEFAULT_SOURCE and section in LLM_PARENTS:
        section = LLM_PARENTS[section]
        inherited_from = f"{section}.{name}"
        source = sources.where(inherited_from)
    return source if inherited_from == key else f"{source}, inherited from {inherited_from}"
