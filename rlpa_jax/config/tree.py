"""The typed configuration tree: one frozen dataclass per section, each option with its domain.

Loading (YAML + dotted overrides, one collect-all check) is config/loading.py; the rules that
relate several options are config/rules.py.

Every option says which values it accepts next to its definition: `clip_eps: float = option(0.2,
positive)`. Strings must be non-empty unless an option says otherwise; booleans and Literal choices
are their own domain. `load_config` checks everything in one pass (unknown keys, types, domains and
the cross-field rules) and raises one ConfigError with one line per problem: the dotted key, the
value, what would be accepted, and where the value came from (the YAML file or the command-line
override), so a run never starts with a value that would fail, or train wrongly, much later.
Every section is a frozen dataclass: a loaded config never changes under the code that reads it,
and code that needs another one builds it with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlpa_jax.config.llm_sections import (
    LLMRoleSection,
    LLMSection,
    SharedLLMSection,
)
from rlpa_jax.config.options import (
    CONFIGS_DIR,
    count,
    decay_rate,
    increasing_sizes,
    mesh_axis,
    non_empty,
    non_negative,
    nucleus,
    option,
    positive,
    prompt_name,
    unit_interval,
    within,
)

DEFAULT_CONFIG = CONFIGS_DIR / "tiny.yaml"



# ---------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes (runtime/parallel.make_mesh); -1 on one axis
    means 'all remaining devices'."""

    data: int = option(1, mesh_axis)
    fsdp: int = option(-1, mesh_axis)
    tensor: int = option(1, mesh_axis)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "aloe"] = "synthetic"
    aloe_dir: str = "../shared/data/aloe"
    extractor: Literal["rules", "llm"] = "rules"
    num_personas: int = option(256, count)
    # preference-conflict training: the user's profile switches here (1..rollout.max_rounds)
    switch_turn: int | None = option(None, count)


@dataclass(frozen=True)
class UserConfig:
    kind: str = "scripted"  # a key of dialogue.users.USER_SIMULATORS
    llm: LLMSection = field(default_factory=LLMSection)
    # The LLM user's role-play prompt (configs/prompts/<name>.txt): user_roleplay (ours) or
    # paper_user (the paper's simulator, rewritten in English).
    prompt: str = option("user_roleplay", prompt_name)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class EvalConfig:
    # The ALOE evaluation's judge (launch/eval.py, when judges.kind=llm; the paper: GPT-4o).
    judge: LLMRoleSection = field(default_factory=LLMRoleSection)


@dataclass(frozen=True)
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
    # The actor's layout while sampling (generation.layout.SamplingLayout): replicated (no weight traffic per
    # decode step), tensor (split over the tensor axis only), training (the trainer's FSDP layout).
    layout: Literal["replicated", "tensor", "training"] = "replicated"
    # Keep each conversation group's prompt cache from turn to turn and prefill only what the next
    # prompt adds (prefix_cache.py; same tokens as a full prefill); false re-prefills every prompt.
    prefix_cache: bool = True


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SFTConfig:
    enabled: bool = False
    steps: int = option(200, count)
    learning_rate: float = option(1e-3, positive)
    batch_size: int = option(16, count)
    num_dialogues: int = option(256, count)
    warmup_steps: int = option(10, non_negative)


@dataclass(frozen=True)
class DPOConfig:
    """launch/dpo.py: DPO on scripted preference pairs (offline/dpo.py)."""

    beta: float = option(0.1, positive)  # strength of the implicit KL anchor to the reference
    steps: int = option(200, count)
    learning_rate: float = option(1e-4, positive)
    batch_size: int = option(8, count)  # preference pairs per optimizer step
    num_dialogues: int = option(128, count)  # personas whose scripted dialogues give the pairs
    warmup_steps: int = option(10, non_negative)
    # Conservative DPO's label-flip probability; at 0.5 the loss is symmetric in the margin and
    # carries no preference at all.
    label_smoothing: float = option(0.0, within(0, 0.5, open_high=True))


@dataclass(frozen=True)
class LoggingConfig:
    checkpoint_every: int = option(5, count)  # iterations; the last one is always saved
    max_to_keep: int = option(3, count)
    tensorboard: bool = True
    # Weights & Biases beside TensorBoard: the same scalars at the same steps, plus the config
    # (pip install -e '.[wandb]'; WANDB_MODE=offline writes the run under <run>/wandb/ without an account).
    wandb: bool = False
    wandb_project: str = "rlpa-jax"
    wandb_entity: str | None = None  # None: the logged-in account's default entity
    wandb_run_name: str | None = None  # None: the run's `name`
    export_hf: bool = True  # the final policy as a Hugging Face folder in <run>/hf
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # its weights' dtype
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = option(0, non_negative)  # numpy generators refuse negative seeds
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    llm: SharedLLMSection = field(default_factory=SharedLLMSection)  # what every LLM role inherits
    user: UserConfig = field(default_factory=UserConfig)
    judges: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
