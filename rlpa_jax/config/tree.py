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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

# The LLM endpoint sections live in llm_config.py (imported here: part of this module's API too).
from rlpa_jax.config.llm_sections import (
    LLM_PARENTS,
    LLM_ROLES,
    LLMRoleSection,
    LLMSection,
    SharedLLMSection,
    inherit_llm_sections,
    section_at,
)

# Option domains and the collect-all builder live in options.py; ConfigError is part of this
# module's API too (callers catch it from here).
from rlpa_jax.config.options import (
    REPO_ROOT,
    ConfigError,
    Problems,
    Sources,
    build_section,
    check_domains,
    count,
    decay_rate,
    field_types,
    increasing_sizes,
    mesh_axis,
    non_empty,
    non_negative,
    nucleus,
    option,
    positive,
    prompt_name,
    unit_interval,
)

DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"



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
    # false: training and scoring forwards run the layers unrolled, not as one scan (small models on
    # CPU: ~15 % faster updates; compile time grows with depth). Sampling reads per-layer weights anyway.
    scan_layers: bool = True


@dataclass
class MeshSection:
    data: int = option(1, mesh_axis)
    fsdp: int = option(-1, mesh_axis)
    tensor: int = option(1, mesh_axis)


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
    # The LLM user's role-play prompt (configs/prompts/<name>.txt): user_roleplay (ours) or
    # paper_user (the paper's simulator, rewritten in English).
    prompt: str = option("user_roleplay", prompt_name)


@dataclass
class JudgeConfig:
    kind: str = "embedded"  # a key of dialogue.judges.JUDGES
    llm: LLMSection = field(default_factory=LLMSection)  # what both judges (and eval.judge) share
    profile: LLMRoleSection = field(default_factory=LLMRoleSection)
    response: LLMRoleSection = field(default_factory=LLMRoleSection)
    # Whom the response judge role-plays during training: `inferred`, the profile the policy wrote
    # (the paper: the gold profile enters only through profile F1), or `persona`, the user's true
    # persona (what the ALOE evaluation's judge sees; training on it leaks the test criterion).
    response_reference: Literal["inferred", "persona"] = "inferred"
    # The LLM judges' prompts (configs/prompts/<name>.txt): ours, or paper_profile_judge and
    # paper_response_judge (the paper's, rewritten in English).
    profile_prompt: str = option("profile_judge", prompt_name)
    response_prompt: str = option("response_judge", prompt_name)


@dataclass
class EvalConfig:
    # The ALOE evaluation's judge (launch/eval.py, when judges.kind=llm; the paper: GPT-4o).
    judge: LLMRoleSection = field(default_factory=LLMRoleSection)


@dataclass
class RolloutConfig:
    # conversation: each iteration plays `conversations` new dialogues to the end with one policy.
    # turn (the paper): a pool of `conversations` live dialogues advances one turn per iteration,
    # so later turns are sampled by a newer policy; finished ones are replaced by new users.
    schedule: Literal["conversation", "turn"] = "conversation"
    conversations: int = option(8, count)  # conversations per PPO iteration, or the pool's size (turn)
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
    # Keep each conversation group's prompt cache from turn to turn and prefill only what the next
    # prompt adds (prefix_cache.py; same tokens as a full prefill); false re-prefills every prompt.
    prefix_cache: bool = True


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
    # reward: kl_coef * KL per token is subtracted in the advantages (the paper); loss: the actor
    # loss adds kl_coef * KL per token (DeepSeekMath's GRPO, TRL). With loss (or kl_coef 0), one
    # epoch and one minibatch per iteration, the actor's scoring forward is skipped (rl/experience.py).
    kl_penalty: Literal["reward", "loss"] = "reward"
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
    llm: SharedLLMSection = field(default_factory=SharedLLMSection)  # what every LLM role inherits
    user: UserConfig = field(default_factory=UserConfig)
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------------
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


@_rule("ppo.advantage", "rollout.schedule")
def _next_turn_in_the_batch(c: TrainConfig) -> str | None:
    if c.ppo.advantage == "cross_turn" and c.rollout.schedule == "turn":
        return ("ppo.advantage=cross_turn bootstraps each turn from the conversation's next turn in the same "
                "iteration, but rollout.schedule=turn samples one turn per conversation per iteration; "
                "use gae or grpo, or rollout.schedule=conversation")
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


def _endpoint_rule(section: str, needed: Callable[[TrainConfig], str | None]) -> None:
    """A role that talks to an LLM (`needed` says why, or None) must have an endpoint."""
    parents = [section]
    while parents[-1] in LLM_PARENTS:
        parents.append(LLM_PARENTS[parents[-1]])

    @_rule(f"{section}.base_url")  # (a parent's bad URL is inherited, so it is reported once, as itself)
    def has_endpoint(c: TrainConfig) -> str | None:
        reason = needed(c)
        if reason is None or section_at(c, section).base_url is not None:
            return None
        return (f"{section}.base_url: {reason} needs an LLM endpoint; set "
                f"{' or '.join(f'{key}.base_url' for key in parents)} (a role inherits unset fields)")


_endpoint_rule("user.llm", lambda c: "user.kind=llm" if c.user.kind == "llm" else None)
_endpoint_rule("judges.profile.llm", lambda c: "judges.kind=llm" if c.judges.kind == "llm" else None)
_endpoint_rule("judges.response.llm", lambda c: "judges.kind=llm" if c.judges.kind == "llm" else None)
_endpoint_rule("judges.llm", lambda c: "data.extractor=llm" if c.data.extractor == "llm" else None)


@_rule(*(f"{key}.rpm" for key in LLM_ROLES.values()))
def _one_limit_per_endpoint(c: TrainConfig) -> str | None:
    """Roles on one endpoint share its rate limiter, so they must agree on its limits."""
    limits: dict[tuple, dict[tuple, list[str]]] = {}
    for key in LLM_ROLES.values():
        section = section_at(c, key)
        if section.base_url is not None:
            endpoint = (section.base_url.rstrip("/"), section.model)
            limits.setdefault(endpoint, {}).setdefault((section.rpm, section.tpm), []).append(key)
    for (url, model), found in limits.items():
        if len(found) > 1:
            listing = "; ".join(f"{', '.join(keys)}: rpm={rpm}, tpm={tpm}" for (rpm, tpm), keys in found.items())
            return (f"roles on one endpoint ({model} at {url}) share its rate limit, but give different "
                    f"rpm/tpm ({listing}); set them once (e.g. in llm or judges.llm)")
    return None


def _check_rules(config: TrainConfig, problems: Problems,
                 extra_rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = ()) -> None:
    for keys, check in [*CROSS_FIELD_RULES, *extra_rules]:
        if problems.bad_keys.intersection(keys):
            continue
        text = check(config)
        if text:
            problems.add_rule(keys, text)

def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def validate(config: TrainConfig, where: str = "config") -> None:
    """Every option against its domain, then (after filling each role's unset LLM fields from its
    parents, in place) the cross-field rules; one ConfigError lists them all."""
    problems = Problems(lambda key: None)
    check_domains(config, "", problems)
    inherit_llm_sections(config)  # in place: each role's section becomes the endpoint it uses
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


def apply_override(tree: dict, path: list[str], value: Any, cls=TrainConfig, text: str = "") -> None:
    problem = _set_override(tree, path, value, cls)
    if problem:
        raise ConfigError(f"command-line override {text!r}: {problem}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = ()) -> TrainConfig:
    """Read YAML (default configs/tiny.yaml), apply dotted overrides, check everything at once.

    `rules` are more cross-field checks, (keys they read, check), from the layers that know what a
    name means (rlpa_jax/app/build.py checks every kind against the table of implementations)."""
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
    sources = Sources(str(path), tree)
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
    inherit_llm_sections(config)
    _check_rules(config, problems, rules)
    problems.raise_if_any(f"{path}{' with overrides' if overrides else ''}")
    return config
