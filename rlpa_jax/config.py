"""The typed configuration tree: dataclasses, YAML files and dotted command-line overrides.

    config = load_config("configs/tiny.yaml", ["ppo.actor_lr=1e-6", "rollout.max_rounds=4"])

Every option says which values it accepts next to its definition: `clip_eps: float = option(0.2,
positive)`. Strings must be non-empty unless an option says otherwise; booleans and Literal choices
are their own domain. `load_config` checks everything in one pass (unknown keys, types, domains and
the cross-field rules) and raises one ConfigError with one line per problem: the dotted key, the
value, what would be accepted, and where the value came from (the YAML file or the command-line
override), so a run never starts with a value that would fail, or train wrongly, much later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
PROMPTS_DIR = REPO_ROOT / "configs" / "prompts"


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
    "the name of a prompt file in configs/prompts/ without .txt "
    f"({', '.join(sorted(p.stem for p in PROMPTS_DIR.glob('*.txt'))) or 'none there'})")

DOMAIN_KEY = "domain"


def option(default: Any = dataclasses.MISSING, domain: Domain | None = None, *, factory: Callable[[], Any] | None = None):
    """A dataclass field that carries its domain: `clip_eps: float = option(0.2, positive)`."""
    metadata = {DOMAIN_KEY: domain} if domain is not None else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# The tree


@dataclass
class TinyModelConfig:
    """A random Qwen2 built in place, with a tokenizer trained on the spot (the embedded default)."""

    hidden_size: int = option(128, count)
    intermediate_size: int = option(256, count)
    num_layers: int = option(2, count)
    num_heads: int = option(4, count)
    num_kv_heads: int = option(2, count)
    vocab_size: int = option(512, count)  # the tokenizer trainer names its own minimum
    rope_theta: float = option(10000.0, positive)
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face directory; None builds the tiny model
    tokenizer_path: str | None = None  # defaults to `path`
    init_checkpoint: str | None = None  # start the policy from a run's checkpoint (e.g. runs/x/sft)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"


@dataclass
class MeshSection:
    data: int = option(1, mesh_axis)
    fsdp: int = option(-1, mesh_axis)
    tensor: int = option(1, mesh_axis)


@dataclass
class LLMSection:
    """An OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, SGLang); the key comes from an env var."""

    base_url: str = option("http://127.0.0.1:8000/v1", http_url)
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = option(32, count)
    timeout_s: float = option(60.0, positive)
    max_retries: int = option(4, non_negative)
    cache_path: str | None = None


@dataclass
class DataConfig:
    source: Literal["synthetic", "aloe"] = "synthetic"
    aloe_dir: str = "../shared/data/aloe"
    extractor: Literal["rules", "llm"] = "rules"
    num_personas: int = option(256, count)
    # preference-conflict training: the user's profile switches here (1..rollout.max_rounds)
    switch_turn: int | None = option(None, count)


@dataclass
class UserConfig:
    kind: str = "scripted"  # a key of dialogue.users.USER_SIMULATORS
    llm: LLMSection = field(default_factory=LLMSection)


@dataclass
class JudgeConfig:
    kind: str = "embedded"  # a key of dialogue.judges.JUDGES
    llm: LLMSection = field(default_factory=LLMSection)
    # Whom the response judge role-plays during training: `inferred`, the profile the policy wrote
    # (the paper: the gold profile enters only through profile F1), or `persona`, the user's true
    # persona (what the ALOE evaluation's judge sees; training on it leaks the test criterion).
    response_reference: Literal["inferred", "persona"] = "inferred"


@dataclass
class RolloutConfig:
    conversations: int = option(8, count)  # conversations in flight per PPO iteration
    max_rounds: int = option(10, count)
    samples_per_prompt: int = option(4, count)  # n; the best-rewarded sample continues the dialogue
    temperature: float = option(1.0, non_negative)  # 0 is greedy
    top_p: float = option(1.0, nucleus)
    top_k: int = option(0, non_negative)  # 0: no top-k filter
    max_new_tokens: int = option(96, count)
    prompt_buckets: list[int] = option(factory=lambda: [128, 256, 512, 1024, 2048, 4096], domain=increasing_sizes)
    max_prompt_tokens: int = option(4096, count)  # older turns are dropped from the prompt beyond this
    pipeline_groups: int = option(2, count)  # host work for one group overlaps device sampling for another
    system_prompt: str = option("policy_system", prompt_name)  # a file under configs/prompts/ (without .txt)
    eval_conversations: int = option(32, count)  # held-out users scored before and after PPO (one sample per turn)
    # An iteration with more unscored samples (judge or user failures) than this is not trained
    # on; this many such iterations in a row stop the run (with a checkpoint and the judges' errors).
    max_invalid_fraction: float = option(0.2, unit_interval)
    max_invalid_iterations: int = option(3, count)
    generator: str = option("jax", non_empty)  # what samples the policy: a name in sampling.GENERATORS
    # The actor's layout while sampling (sampling.SamplingLayout): replicated (no weight traffic per
    # decode step), tensor (split over the tensor axis only), training (the trainer's FSDP layout).
    layout: Literal["replicated", "tensor", "training"] = "replicated"


@dataclass
class PPOConfig:
    iterations: int = option(20, non_negative)  # 0: SFT (if enabled) and the evaluation only
    actor_lr: float = option(5e-7, positive)
    critic_lr: float = option(9e-6, positive)
    # None: the policy's final norm trains like every other weight. A number: it moves as one
    # scalar inverse temperature, in log space, at this peak learning rate (training/output_scale.py).
    output_scale_lr: float | None = option(None, positive)
    adam_b1: float = option(0.9, decay_rate)
    adam_b2: float = option(0.95, decay_rate)
    weight_decay: float = option(0.0, non_negative)
    grad_clip: float = option(1.0, positive)  # global-norm clip; 0 would zero every update
    warmup_ratio: float = option(0.03, unit_interval)
    min_lr_ratio: float = option(0.1, unit_interval)  # cosine decay to 10% of the peak
    train_batch_size: int = option(128, count)  # samples per optimizer step
    micro_batch_size: int = option(16, count)  # samples per accumulated micro-batch
    epochs: int = option(1, count)
    clip_eps: float = option(0.2, positive)
    value_clip_eps: float = option(0.2, positive)
    kl_coef: float = option(0.01, non_negative)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = option(6.0, positive)
    kl_horizon: int = option(10000, count)
    gamma: float = option(1.0, unit_interval)
    lam: float = option(0.95, unit_interval)
    # A name in rl/advantages.py's ADVANTAGE_ESTIMATORS: gae (the paper), cross_turn, grpo.
    advantage: str = "gae"
    whiten_advantages: bool = True
    entropy_coef: float = option(0.0, non_negative)
    reward: Literal["both", "profile", "response"] = "both"  # reward ablations
    # A name in rl/advantages.py's CREDIT_SCHEMES. turn: the whole turn shares its reward (the
    # paper); block: the <profile> block is credited with the profile reward and the reply with the
    # response reward; item: block, with each profile line credited with its items' share of the F1.
    credit: str = "turn"


@dataclass
class SFTConfig:
    enabled: bool = False
    steps: int = option(200, count)
    learning_rate: float = option(1e-3, positive)
    batch_size: int = option(16, count)
    num_dialogues: int = option(256, count)
    warmup_steps: int = option(10, non_negative)


@dataclass
class LoggingConfig:
    checkpoint_every: int = option(5, count)  # iterations; the last one is always saved
    max_to_keep: int = option(3, count)
    tensorboard: bool = True
    export_hf: bool = True
    progress_bar: bool = True


@dataclass
class TrainConfig:
    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = option(0, non_negative)  # numpy generators refuse negative seeds
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshSection = field(default_factory=MeshSection)
    data: DataConfig = field(default_factory=DataConfig)
    user: UserConfig = field(default_factory=UserConfig)
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
# Cross-field rules: each names the keys it reads, so a rule whose inputs already failed is skipped
# (and never divides by a zero that was already reported)

CrossFieldRule = Callable[[TrainConfig], "str | None"]
CROSS_FIELD_RULES: list[tuple[tuple[str, ...], CrossFieldRule]] = []


def _rule(*keys: str):
    def register(check: CrossFieldRule) -> CrossFieldRule:
        CROSS_FIELD_RULES.append((keys, check))
        return check

    return register


@_rule("ppo.train_batch_size", "ppo.micro_batch_size")
def _whole_micro_batches(c: TrainConfig) -> str | None:
    if c.ppo.train_batch_size % c.ppo.micro_batch_size:
        return (f"ppo.train_batch_size={c.ppo.train_batch_size} must be a multiple of "
                f"ppo.micro_batch_size={c.ppo.micro_batch_size}")
    return None


@_rule("rollout.conversations", "rollout.pipeline_groups")
def _a_conversation_per_group(c: TrainConfig) -> str | None:
    if c.rollout.conversations < c.rollout.pipeline_groups:
        return (f"rollout.conversations={c.rollout.conversations} is below "
                f"rollout.pipeline_groups={c.rollout.pipeline_groups}; it must be at least that")
    return None


@_rule("data.switch_turn", "rollout.max_rounds")
def _switch_within_dialogue(c: TrainConfig) -> str | None:
    if c.data.switch_turn is not None and c.data.switch_turn > c.rollout.max_rounds:
        return (f"data.switch_turn={c.data.switch_turn} must be within "
                f"1..rollout.max_rounds={c.rollout.max_rounds}")
    return None


@_rule("mesh.data", "mesh.fsdp", "mesh.tensor")
def _one_free_mesh_axis(c: TrainConfig) -> str | None:
    sizes = {"mesh.data": c.mesh.data, "mesh.fsdp": c.mesh.fsdp, "mesh.tensor": c.mesh.tensor}
    free = [key for key, size in sizes.items() if size == -1]
    if len(free) > 1:
        return f"{' and '.join(free)} are -1; at most one mesh axis may take the remaining devices"
    return None


@_rule("model.tiny.hidden_size", "model.tiny.num_heads")
def _whole_heads(c: TrainConfig) -> str | None:
    tiny = c.model.tiny
    if tiny.hidden_size % tiny.num_heads or (tiny.hidden_size // tiny.num_heads) % 2:
        return (f"model.tiny.hidden_size={tiny.hidden_size} must be num_heads={tiny.num_heads} times an even "
                "head size (rotary embeddings rotate pairs of dimensions)")
    return None


@_rule("model.tiny.num_heads", "model.tiny.num_kv_heads")
def _whole_kv_groups(c: TrainConfig) -> str | None:
    tiny = c.model.tiny
    if tiny.num_heads % tiny.num_kv_heads:
        return (f"model.tiny.num_heads={tiny.num_heads} must be a multiple of "
                f"model.tiny.num_kv_heads={tiny.num_kv_heads}")
    return None


# ---------------------------------------------------------------------------------------------
# One pass that collects every problem


DEFAULT_SOURCE = "default"


class _Problems:
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


class _Sources:
    """Where the value of a dotted key came from: an override, the YAML file, or the default."""

    def __init__(self, file_label: str, file_tree: dict):
        self.file_label = file_label
        self.file_keys = set(_dotted_keys(file_tree))
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


def _dotted_keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = _join(prefix, str(key))
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, dotted)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _non_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return annotation, False


def _noun(annotation: Any) -> str:
    inner, optional = _non_none(annotation)
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
    return non_empty if _non_none(annotation)[0] is str else None


def describe(option_field: dataclasses.Field, annotation: Any) -> str:
    """What the option accepts, in words ("a number > 0 or null")."""
    domain = domain_of(option_field, annotation)
    if domain is None:
        return _noun(annotation)
    inner, optional = _non_none(annotation)
    return domain.description.format(_noun(inner)) + (" or null" if optional else "")


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` as `annotation`; a ConfigError says what was expected and what came."""
    inner, optional = _non_none(annotation)
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


def _build(cls, values: dict, prefix: str, problems: _Problems):
    """`cls` from a plain dict; problems are collected and their options keep the defaults."""
    types_by_name = _field_types(cls)
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
                kwargs[name] = _build(annotation, value, key, problems)
            else:
                problems.add(key, f"expected a section (a mapping with keys "
                                  f"{', '.join(sorted(_field_types(annotation)))}), got {value!r}")
            continue
        try:
            kwargs[name] = _coerce(value, annotation)
        except ConfigError as error:
            problems.add(key, str(error))
    return cls(**kwargs)


def _check_domains(instance, prefix: str, problems: _Problems) -> None:
    types_by_name = _field_types(type(instance))
    for option_field in dataclasses.fields(instance):
        key, annotation = _join(prefix, option_field.name), types_by_name[option_field.name]
        value = getattr(instance, option_field.name)
        if dataclasses.is_dataclass(annotation):
            _check_domains(value, key, problems)
            continue
        domain = domain_of(option_field, annotation)
        if key in problems.bad_keys or value is None or domain is None or domain.admits(value):
            continue
        problems.add(key, f"expected {describe(option_field, annotation)}, got {value!r}")


def _check_rules(config: TrainConfig, problems: _Problems,
                 extra_rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = ()) -> None:
    for keys, check in [*CROSS_FIELD_RULES, *extra_rules]:
        if problems.bad_keys.intersection(keys):
            continue
        text = check(config)
        if text:
            problems.add_rule(keys, text)


def from_dict(cls, values: dict, where: str = "config"):
    """`cls` (any of the dataclasses above, or another with `option` fields) from a plain dict.

    Keys in messages start with `where` ("dpo" -> "dpo.beta: expected a number, got 'x'").
    """
    problems = _Problems(lambda key: None)
    instance = _build(cls, values, where, problems)
    _check_domains(instance, where, problems)
    problems.raise_if_any(where)
    return instance


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def validate(config: TrainConfig, where: str = "config") -> None:
    """Every option against its domain, then the cross-field rules; one ConfigError lists them all."""
    problems = _Problems(lambda key: None)
    _check_domains(config, "", problems)
    _check_rules(config, problems)
    problems.raise_if_any(where)


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
        fields = _field_types(node_cls)
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


def apply_override(tree: dict, path: list[str], value: Any, cls=TrainConfig, text: str = "") -> None:
    problem = _set_override(tree, path, value, cls)
    if problem:
        raise ConfigError(f"command-line override {text!r}: {problem}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = ()) -> TrainConfig:
    """Read YAML (default configs/tiny.yaml), apply dotted overrides, check everything at once.

    `rules` are more cross-field checks, (keys they read, check), from the layers that know what a
    name means (rlpa_jax/build.py checks every kind against the table of implementations)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    sources = _Sources(str(path), tree)
    problems = _Problems(sources)
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
    config = _build(TrainConfig, tree, "", problems)
    _check_domains(config, "", problems)
    _check_rules(config, problems, rules)
    problems.raise_if_any(f"{path}{' with overrides' if overrides else ''}")
    return config
