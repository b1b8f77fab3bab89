"""Every option of the config tree with its default, the values it accepts and what it means, read
from the declarations themselves (config/tree.py, config/llm_sections.py): the text behind the
launch scripts' `--help-config`, docs/CONFIG.md, and a loaded config written out as YAML with where
each value came from (`--print-config`).

    python -m rlpa_jax.config.reference > docs/CONFIG.md     # regenerate the reference
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml

from rlpa_jax.config.llm_sections import LLMSection
from rlpa_jax.config.options import CONFIGS_DIR, describe, field_types, meaning_of, without_none
from rlpa_jax.config.tree import TrainConfig

REGENERATE = "python -m rlpa_jax.config.reference > docs/CONFIG.md"
CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"  # in a checkout


@dataclass(frozen=True)
class Option:
    key: str  # dotted, as an override names it: ppo.actor_lr
    type: str  # int, float | null, list[int], choice
    default: Any  # what the key holds when the YAML file leaves it out
    accepts: str  # the domain in words: "a number > 0"
    meaning: str


@dataclass(frozen=True)
class Section:
    key: str  # dotted; "" is the top level
    meaning: str
    options: tuple[Option, ...]  # its own options, not those of the sections inside it


def sections(cls=TrainConfig, instance: Any = None, key: str = "", meaning: str = "") -> Iterator[Section]:
    """Every section of the tree, outermost first, each with its own options."""
    instance = cls() if instance is None else instance
    types_by_name = field_types(cls)
    own, inner = [], []
    for option_field in dataclasses.fields(cls):
        name, annotation = option_field.name, types_by_name[option_field.name]
        dotted = f"{key}.{name}" if key else name
        value = getattr(instance, name)
        if dataclasses.is_dataclass(annotation):
            inner.append((annotation, value, dotted, meaning_of(cls, name)))
            continue
        accepts = describe(option_field, annotation).replace(f"{CONFIGS_DIR.parent}/", "")  # the same on every checkout
        own.append(Option(dotted, type_name(annotation), value, accepts, meaning_of(cls, name)))
    yield Section(key, meaning, tuple(own))
    for annotation, value, dotted, section_meaning in inner:
        yield from sections(annotation, value, dotted, section_meaning)


def options() -> Iterator[Option]:
    """Every option of the tree (a field whose type is a section is not one)."""
    for section in sections():
        yield from section.options


def undocumented() -> list[str]:
    """Keys of the options and sections that declare no meaning."""
    return [s.key for s in sections() if s.key and not s.meaning] + [o.key for o in options() if not o.meaning]


def type_name(annotation: Any) -> str:
    inner, optional = without_none(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal:
        name = "choice"
    elif origin is list:
        name = f"list[{type_name(typing.get_args(inner)[0])}]"
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" | null" if optional else "")


def yaml_value(value: Any) -> str:
    """`value` as it is written in a YAML file (flow style, one line): null, true, 1.0e-06, [1, 2]."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


# ---------------------------------------------------------------------------------------------
# The option reference: terminal text and markdown

INHERITANCE = (" ".join(LLMSection.__doc__.split()) + " Every value of an LLM section is shown here as its "
               "own default (null: inherited).")
HOW_TO_SET = ("Every option is a dotted key: set it in the YAML file given with --config (the launch scripts "
              "read configs/tiny.yaml without one) or as a key=value argument, e.g. ppo.actor_lr=1e-6. The "
              "default is what a key holds when the file leaves it out.")


def matches(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + ".")


def reference_text(prefix: str = "") -> str:
    """The options under `prefix` (a section such as `ppo`, or one key; "": all) for a terminal."""
    lines = []
    for section in sections():
        chosen = [o for o in section.options if matches(o.key, prefix)]
        if not chosen:
            continue
        lines.append(f"{section.key or 'top level'}: {section.meaning or 'the run'}")
        for option in chosen:
            lines.append(f"  {option.key} = {yaml_value(option.default)}    accepts {option.accepts}")
            lines.append(f"      {option.meaning}")
        lines.append("")
    if not lines:
        return ""
    return "\n".join([textwrap.fill(HOW_TO_SET, 100), "", *lines]).rstrip() + "\n"


def sections_summary() -> str:
    """One line per top-level section: the epilog of the launch scripts' --help."""
    rows = [(s.key, s.meaning) for s in sections() if s.key and "." not in s.key]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {meaning}" for key, meaning in rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/CONFIG.md."""
    out = ["# Configuration reference", "",
           f"Generated from the option declarations (rlpa_jax/config/tree.py, rlpa_jax/config/llm_sections.py) "
           f"by `{REGENERATE}`; edit those, not this file (tests/test_config_reference.py fails when it is out "
           f"of date).", "",
           HOW_TO_SET + " `--help-config [SECTION]` on launch/train.py, sft.py, dpo.py and eval.py prints this "
           "list; `--print-config` prints the resolved config with where each value came from (default, the "
           "YAML file and line, a command-line override) and exits. Cross-field rules (a batch that splits "
           "over the mesh, heads that split over the tensor axis...) are in rlpa_jax/config/rules.py.", "",
           f"LLM sections (`llm`, `user.llm`, `judges.llm`, `judges.profile.llm`, `judges.response.llm`, "
           f"`eval.judge.llm`): {INHERITANCE}", ""]
    for section in sections():
        if not section.options:
            out += [f"## `{section.key}`", "", section.meaning, ""]
            continue
        out += [f"## {f'`{section.key}`' if section.key else 'Top level'}", ""]
        if section.meaning:
            out += [section.meaning, ""]
        out += ["| key | default | accepts | meaning |", "|---|---|---|---|"]
        out += [f"| `{o.key}` | `{_cell(yaml_value(o.default))}` | {_cell(o.accepts)} | {_cell(o.meaning)} |"
                for o in section.options]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# A loaded config, with where each value came from


def annotated_yaml(config: TrainConfig, origin: Callable[[str], str], heading: str = "") -> str:
    """`config` as YAML (it loads back as the same tree) with a comment after every option saying
    where its value came from (`origin(dotted key)`)."""
    rows: list[tuple[str, str]] = []  # (the line, its comment or "")

    def walk(instance: Any, key: str, depth: int) -> None:
        for option_field in dataclasses.fields(instance):
            dotted = f"{key}.{option_field.name}" if key else option_field.name
            value = getattr(instance, option_field.name)
            indent = "  " * depth
            if dataclasses.is_dataclass(value):
                rows.append((f"{indent}{option_field.name}:", ""))
                walk(value, dotted, depth + 1)
            else:
                rows.append((f"{indent}{option_field.name}: {yaml_value(value)}", origin(dotted)))

    walk(config, "", 0)
    column = min(max(len(line) for line, _ in rows), 54)
    lines = [f"# {line}" for line in heading.splitlines()]
    lines += [f"{line.ljust(column)}  # {comment}" if comment else line for line, comment in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
