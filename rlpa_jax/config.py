"""The typed configuration tree: dataclasses, YAML files and dotted command-line overrides.

    config = load_config("configs/tiny.yaml", ["ppo.actor_lr=1e-6", "rollout.max_rounds=4"])

Unknown keys and badly typed values fail with an error that names the file or override, the key,
and the keys (or type) that would be accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message says where and what would be accepted."""


@dataclass
class TinyModelConfig:
    """A random Qwen2 built in place, with a tokenizer trained on the spot (the embedded default)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    rope_theta: float = 10000.0
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
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class LLMSection:
    """An OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, SGLang); the key comes from an env var."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 32
    timeout_s: float = 60.0
    max_retries: int = 4
    cache_path: str | None = None


@dataclass
class DataConfig:
    source: Literal["synthetic", "aloe"] = "synthetic"
    aloe_dir: str = "../shared/data/aloe"
    extractor: Literal["rules", "llm"] = "rules"
    num_personas: int = 256
    switch_turn: int | None = None  # preference-conflict training: the user's profile switches here


@dataclass
class UserConfig:
    kind: str = "scripted"  # a key of dialogue.users.USER_SIMULATORS
    llm: LLMSection = field(default_factory=LLMSection)


@dataclass
class JudgeConfig:
    kind: str = "embedded"  # a key of dialogue.judges.JUDGES
    llm: LLMSection = field(default_factory=LLMSection)


@dataclass
class RolloutConfig:
    conversations: int = 8  # conversations in flight per PPO iteration
    max_rounds: int = 10
    samples_per_prompt: int = 4  # n; the best-rewarded sample continues the dialogue
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96
    prompt_buckets: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048, 4096])
    max_prompt_tokens: int = 4096  # older turns are dropped from the prompt beyond this
    pipeline_groups: int = 2  # host work for one group overlaps device sampling for another
    system_prompt: str = "policy_system"  # a file under configs/prompts/ (without .txt)
    eval_conversations: int = 32  # held-out users scored before and after PPO (one sample per turn)


@dataclass
class PPOConfig:
    iterations: int = 20
    actor_lr: float = 5e-7
    critic_lr: float = 9e-6
    # None: the policy's final norm trains like every other weight. A number: it moves as one
    # scalar inverse temperature, in log space, at this peak learning rate (rl/output_scale.py).
    output_scale_lr: float | None = None
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    train_batch_size: int = 128  # samples per optimizer step
    micro_batch_size: int = 16  # samples per accumulated micro-batch
    epochs: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    kl_coef: float = 0.01
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    advantage: Literal["gae", "cross_turn", "grpo"] = "gae"
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    reward: Literal["both", "profile", "response"] = "both"  # reward ablations
    # turn: the whole turn shares its reward (the paper); block: the <profile> block is credited with
    # the profile reward and the reply with the response reward (rl/experience.add_advantages);
    # item: block, with each profile line credited with its items' share of the F1 (rl/item_credit.py).
    credit: Literal["turn", "block", "item"] = "turn"


@dataclass
class SFTConfig:
    enabled: bool = False
    steps: int = 200
    learning_rate: float = 1e-3
    batch_size: int = 16
    num_dialogues: int = 256
    warmup_steps: int = 10


@dataclass
class LoggingConfig:
    checkpoint_every: int = 5
    max_to_keep: int = 3
    tensorboard: bool = True
    export_hf: bool = True
    progress_bar: bool = True


@dataclass
class TrainConfig:
    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
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
# Building dataclasses from plain dicts, with errors that name the key


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {sorted(_field_types(annotation))}, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls, values: dict, where: str = "config"):
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(types_by_name))}")
    kwargs = {name: _coerce(value, types_by_name[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# YAML + dotted overrides


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value (e.g. ppo.actor_lr=1e-6)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads "1e-6" as a string; numbers in scientific notation are what people type.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any, cls=TrainConfig, text: str = "") -> None:
    node, node_cls = tree, cls
    for depth, key in enumerate(path):
        fields = _field_types(node_cls)
        if key not in fields:
            where = ".".join(path[:depth]) or "top level"
            raise ConfigError(f"override {text!r}: unknown key {key!r} at {where}; valid keys: {', '.join(sorted(fields))}")
        if depth == len(path) - 1:
            node[key] = value
            return
        child = fields[key]
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"override {text!r}: {'.'.join(path[:depth + 1])} is not a section")
        node = node.setdefault(key, {})
        node_cls = child


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (default configs/tiny.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides or []:
        keys, value = _parse_override(text)
        apply_override(tree, keys, value, text=text)
    config = from_dict(TrainConfig, tree, where=str(path))
    validate(config, str(path))
    return config


def validate(config: TrainConfig, where: str = "config") -> None:
    """Cross-field checks that single-field types cannot express."""
    ppo, rollout = config.ppo, config.rollout
    if ppo.train_batch_size % ppo.micro_batch_size:
        raise ConfigError(f"{where}: ppo.train_batch_size={ppo.train_batch_size} must be a multiple of "
                          f"ppo.micro_batch_size={ppo.micro_batch_size}")
    if ppo.advantage == "grpo" and rollout.samples_per_prompt < 2:
        raise ConfigError(f"{where}: ppo.advantage=grpo needs rollout.samples_per_prompt >= 2")
    if ppo.credit == "item" and ppo.advantage != "grpo":
        raise ConfigError(f"{where}: ppo.credit=item needs ppo.advantage=grpo (item credits replace group advantages)")
    if ppo.credit == "item" and config.judges.kind != "embedded":
        raise ConfigError(f"{where}: ppo.credit=item needs judges.kind=embedded (the LLM judge returns how many "
                          "items match, not which)")
    if rollout.conversations < rollout.pipeline_groups:
        raise ConfigError(f"{where}: rollout.conversations={rollout.conversations} is below "
                          f"rollout.pipeline_groups={rollout.pipeline_groups}")
    if rollout.eval_conversations < 1:
        raise ConfigError(f"{where}: rollout.eval_conversations={rollout.eval_conversations} must be >= 1")
    if config.user.kind == "llm" and not config.user.llm.base_url:
        raise ConfigError(f"{where}: user.kind=llm needs user.llm.base_url")
    if config.data.switch_turn is not None and not 1 <= config.data.switch_turn <= rollout.max_rounds:
        raise ConfigError(f"{where}: data.switch_turn must be within 1..rollout.max_rounds={rollout.max_rounds}")
    for name in ("actor_lr", "critic_lr", "output_scale_lr"):
        if getattr(ppo, name) is not None and getattr(ppo, name) <= 0:
            raise ConfigError(f"{where}: ppo.{name} must be > 0")
