"""Options of a typed configuration: the values each one accepts (its domain, declared next to it),
and the one pass that builds dataclasses from plain dicts and collects every problem, each with its
dotted key, the value, what is accepted and where the value came from.

config/tree.py declares the tree with `option(default, domain, doc=...)` (and `section(cls, doc=...)` for
a field that holds a section) and loads YAML files through this; config/reference.py lists every
option with its default, domain and meaning.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal


def find_configs_dir(package_dir: Path) -> Path:
    """configs/ (the YAML configs and prompts/): the copy an installed wheel ships inside the
    package (rlpa_jax/_configs: setup.py maps the repository's configs/ there) when present, else
    the repository's own beside the package (a checkout, or an editable install of one)."""
    shipped, checkout = package_dir / "_configs", package_dir.parent / "configs"
    return checkout if not shipped.is_dir() and checkout.is_dir() else shipped


CONFIGS_DIR = find_configs_dir(Path(__file__).resolve().parents[1])
PROMPTS_DIR = CONFIGS_DIR / "prompts"


class ConfigError(ValueError):
    """A configuration problem; the message says where and what would be accepted."""


# ---------------------------------------------------------------------------------------------
# Domains: the values an option accepts, declared next to the option


@dataclass(frozen=True)
class Domain:
    """A test on an option's (already type-checked) value and the words for what it accepts.

    `description` reads after "expected"; "{}" stands for the type's noun ("a number", "an integer").
    """

    accepts: Callable[[Any], bool]
    description: str

    def admits(self, value: Any) -> bool:
        try:
            return bool(self.accepts(value))
        except (TypeError, ValueError):  # a value of the wrong type, set in code rather than loaded
            return False


def at_least(low: float) -> Domain:
    return Domain(lambda v: v >= low, f"{{}} >= {low}")


def within(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Domain:
    def accepts(v):
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return Domain(accepts, f"{{}} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


positive = Domain(lambda v: v > 0, "{} > 0")
non_negative = at_least(0)
count = at_least(1)
unit_interval = within(0, 1)  # probabilities, ratios, gamma and lambda
decay_rate = within(0, 1, open_high=True)  # Adam's b1 and b2: 1 would never forget
nucleus = within(0, 1, open_low=True)  # top_p: 0 keeps no token
mesh_axis = Domain(lambda v: v >= 1 or v == -1, "{} >= 1, or -1 (all remaining devices)")
non_empty = Domain(lambda v: len(v) > 0, "a non-empty string")
http_url = Domain(lambda v: v.startswith(("http://", "https://")) and len(v.split("://", 1)[1]) > 0,
                  "a URL starting with http:// or https://")
increasing_sizes = Domain(lambda v: len(v) > 0 and v[0] > 0 and all(a < b for a, b in zip(v, v[1:])),
                          "a non-empty list of increasing positive integers")
prompt_name = Domain(
    lambda v: bool(v) and "/" not in v and "\\" not in v and (PROMPTS_DIR / f"{v}.txt").is_file(),
    f"the name of a prompt file in {PROMPTS_DIR}/ without .txt "
    f"({', '.join(sorted(p.stem for p in PROMPTS_DIR.glob('*.txt'))) or 'none there'})")

DOMAIN_KEY = "domain"
DOC_KEY = "doc"


def option(default: Any = dataclasses.MISSING, domain: Domain | None = None, *, doc: str = "",
           factory: Callable[[], Any] | None = None):
    """A dataclass field that carries its domain and its meaning for the user:
    `clip_eps: float = option(0.2, positive, doc="PPO's clip range of the probability ratio")`.

    `doc` is one line (docs/CONFIG.md and `--help-config` show it); a subclass that only changes a
    default may leave it out and keeps the meaning its base class declares (meaning_of)."""
    metadata = {DOC_KEY: doc} if doc else {}
    if domain is not None:
        metadata[DOMAIN_KEY] = domain
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, doc: str = ""):
    """A field that holds a section (a dataclass of options), with what the section is for."""
    return field(default_factory=cls, metadata={DOC_KEY: doc} if doc else {})


def meaning_of(cls, name: str) -> str:
    """The `doc` of field `name` of `cls`, or of the nearest base class that declares one ("": none)."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and declared.metadata.get(DOC_KEY):
            return declared.metadata[DOC_KEY]
    return ""


# ---------------------------------------------------------------------------------------------
# One pass that collects every problem


DEFAULT_SOURCE = "default"


class Problems:
    """Problem lines, the keys they are about, and where each key's value came from."""

    def __init__(self, source_of: Callable[[str], str | None]):
        self.source_of = source_of
        self.lines: list[str] = []
        self.bad_keys: set[str] = set()

    def add(self, key: str, text: str, source: str | None = None) -> None:
        self.bad_keys.add(key)
        source = source or self.source_of(key)
        self.lines.append(f"{key}: {text}" + (f" ({source})" if source else ""))

    def add_rule(self, keys: tuple[str, ...], text: str) -> None:
        self.bad_keys.update(keys)
        sources = {key: self.source_of(key) for key in keys}
        if len(set(sources.values())) == 1:
            where = next(iter(sources.values()))
        else:
            where = "; ".join(f"{key} from {source}" for key, source in sources.items())
        self.lines.append(text + (f" ({where})" if where else ""))

    def add_line(self, line: str) -> None:
        self.lines.append(line)

    def raise_if_any(self, subject: str) -> None:
        if self.lines:
            count = f"{len(self.lines)} problem{'s' if len(self.lines) > 1 else ''}"
            raise ConfigError(f"{subject}: {count}:\n" + "\n".join(f"  {line}" for line in self.lines))


class Sources:
    """Where the value of a dotted key came from: an override, the YAML file, or the default."""

    def __init__(self, file_label: str, file_tree: dict, file_lines: dict[str, int] | None = None):
        self.file_label = file_label
        self.file_keys = set(_dotted_keys(file_tree))
        self.file_lines = file_lines or {}  # dotted key -> the line it is written on
        self.overrides: dict[str, str] = {}

    def set_by_override(self, key: str, text: str) -> None:
        for earlier in [k for k in self.overrides if k.startswith(key + ".")]:
            del self.overrides[earlier]
        self.overrides[key] = f"command-line override {text!r}"

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for length in range(len(parts), 0, -1):
            prefix = ".".join(parts[:length])
            if prefix in self.overrides:
                return self.overrides[prefix]
        return self.file_label if key in self.file_keys else DEFAULT_SOURCE

    def where(self, key: str) -> str:
        """As calling it, with the line for a value from the file (`configs/x.yaml:12`)."""
        source = self(key)
        line = self.file_lines.get(key)
        return f"{source}:{line}" if source == self.file_label and line else source


def _dotted_keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = _join(prefix, str(key))
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, dotted)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def without_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return annotation, False


def _noun(annotation: Any) -> str:
    inner, optional = without_none(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal:
        noun = f"one of {list(typing.get_args(inner))}"
    elif origin is list:
        noun = f"a list of {_noun(typing.get_args(inner)[0]).split(' ', 1)[1]}s"
    else:
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(inner, str(inner))
    return noun + (" or null" if optional else "")


def domain_of(option_field: dataclasses.Field, annotation: Any) -> Domain | None:
    """The option's declared domain; strings default to non-empty. None: the type is the domain."""
    declared = option_field.metadata.get(DOMAIN_KEY)
    if declared is not None:
        return declared
    return non_empty if without_none(annotation)[0] is str else None


def describe(option_field: dataclasses.Field, annotation: Any) -> str:
    """What the option accepts, in words ("a number > 0 or null")."""
    domain = domain_of(option_field, annotation)
    if domain is None:
        return _noun(annotation)
    inner, optional = without_none(annotation)
    return domain.description.format(_noun(inner)) + (" or null" if optional else "")


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` as `annotation`; a ConfigError says what was expected and what came."""
    inner, optional = without_none(annotation)
    if value is None and optional:
        return None
    expected = f"expected {_noun(annotation)}, got {value!r}"
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):
        for choice in typing.get_args(inner):
            try:
                return _coerce(value, choice)
            except ConfigError:
                pass
        raise ConfigError(expected)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ConfigError(expected)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(expected)
        try:
            return [_coerce(item, typing.get_args(inner)[0]) for item in value]
        except ConfigError:
            raise ConfigError(expected) from None
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(expected)
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(expected)
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(expected)
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(expected)
    return value


def build_section(cls, values: dict, prefix: str, problems: Problems):
    """`cls` from a plain dict; problems are collected and their options keep the defaults."""
    types_by_name = field_types(cls)
    for key in sorted(set(values) - set(types_by_name), key=str):
        problems.add(_join(prefix, str(key)), f"unknown key {key!r} at {prefix or 'top level'}; "
                                              f"valid keys: {', '.join(sorted(types_by_name))}")
    kwargs = {}
    for name, value in values.items():
        if name not in types_by_name:
            continue
        key, annotation = _join(prefix, name), types_by_name[name]
        if dataclasses.is_dataclass(annotation):
            if isinstance(value, dict):
                kwargs[name] = build_section(annotation, value, key, problems)
            else:
                problems.add(key, f"expected a section (a mapping with keys "
                                  f"{', '.join(sorted(field_types(annotation)))}), got {value!r}")
            continue
        try:
            kwargs[name] = _coerce(value, annotation)
        except ConfigError as error:
            problems.add(key, str(error))
    return cls(**kwargs)


def check_domains(instance, prefix: str, problems: Problems) -> None:
    types_by_name = field_types(type(instance))
    for option_field in dataclasses.fields(instance):
        key, annotation = _join(prefix, option_field.name), types_by_name[option_field.name]
        value = getattr(instance, option_field.name)
        if dataclasses.is_dataclass(annotation):
            check_domains(value, key, problems)
            continue
        domain = domain_of(option_field, annotation)
        if key in problems.bad_keys or value is None or domain is None or domain.admits(value):
            continue
        problems.add(key, f"expected {describe(option_field, annotation)}, got {value!r}")

