"""The typed configuration tree: one frozen dataclass per section, each option with its domain.

Loading (YAML + dotted overrides, one collect-all check) is config/loading.py; the rules that
relate several options are config/rules.py.

Every option says which values it accepts and what it means next to its definition:
`clip_eps: float = option(0.2, positive, doc="clip range of the policy's probability ratio")`; a
field that holds a section is `section(cls, doc=...)`. config/reference.py lists them all
(docs/CONFIG.md, `--help-config`). Strings must be non-empty unless an option says otherwise; booleans and Literal choices
are their own domain. `load_config` checks everything in one pass (unknown keys, types, domains and
the cross-field rules) and raises one ConfigError with one line per problem: the dotted key, the
value, what would be accepted, and where the value came from (the YAML file or the command-line
override), so a run never starts with a value that would fail, or train wrongly, much later.
Every section is a frozen dataclass: a loaded config never changes under the code that reads it,
and code that needs another one builds it with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
    section,
    unit_interval,
    within,
)

DEFAULT_CONFIG = CONFIGS_DIR / "tiny.yaml"



# ---------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class TinyModelConfig:
    """A random Qwen2 built in place, with a tokenizer trained on the spot (the embedded default)."""

    hidden_size: int = option(128, count, doc="width of the residual stream")
    intermediate_size: int = option(256, count, doc="width of each MLP's hidden layer")
    num_layers: int = option(2, count, doc="decoder layers")
    num_heads: int = option(4, count, doc="query heads (hidden_size / num_heads must be even)")
    num_kv_heads: int = option(2, count, doc="key/value heads (grouped-query attention; divides num_heads)")
    # the tokenizer trainer names its own minimum
    vocab_size: int = option(512, count, doc="vocabulary of the byte-level BPE tokenizer trained on the spot")
    rope_theta: float = option(10000.0, positive, doc="base of the rotary position embedding's frequencies")
    tie_word_embeddings: bool = option(True, doc="the output head reuses the input embedding")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = option(None, doc="local Hugging Face Qwen2 directory of the policy; null builds the tiny "
                                        "random model (model.tiny)")
    tokenizer_path: str | None = option(None, doc="tokenizer directory; null: the policy's own (`path`, or "
                                                  "init_checkpoint's)")
    init_checkpoint: str | None = option(None, doc="start the policy from a run's orbax checkpoint (e.g. "
                                                   "runs/x/sft) instead of `path`'s weights")
    tiny: TinyModelConfig = section(TinyModelConfig, doc="the tiny random Qwen2 built when model.path is null")
    compute_dtype: Literal["float32", "bfloat16"] = option(
        "float32", doc="dtype of activations and of the sampler's weights; parameters and Adam state stay float32")
    remat: Literal["none", "full", "dots"] = option(
        "none", doc="rematerialise each layer's activations in the backward pass: none, full, or all but the "
                    "matmul outputs (dots)")
    # Small models on CPU: ~15 % faster updates unrolled; compile time grows with depth. Sampling
    # reads per-layer weights anyway.
    scan_layers: bool = option(True, doc="training and scoring forwards run the layers as one lax.scan; false "
                                         "unrolls them")
    attention: Literal["auto", "xla", "cudnn"] = option(
        "auto", doc="full attention (prefill, scoring, training): auto = cuDNN's fused kernel on CUDA GPUs where "
                    "it can run it (bfloat16/float16, head_dim a multiple of 8 up to 128, 256 on Hopper), the "
                    "CPU kernel on CPU, XLA elsewhere; xla = XLA everywhere; cudnn = as auto, warning where "
                    "cuDNN cannot run it")


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes (runtime/parallel.make_mesh); -1 on one axis
    means 'all remaining devices'. The mesh spans every device present (or `devices` of them): a
    mesh whose sizes leave devices idle is refused, naming the sizes that would use them."""

    data: int = option(1, mesh_axis, doc="data-parallel ways: each way holds a whole copy of the parameters")
    fsdp: int = option(-1, mesh_axis, doc="fully sharded data-parallel ways: batch rows and parameters split "
                                          "(ZeRO-3)")
    tensor: int = option(1, mesh_axis, doc="tensor-parallel ways: heads, MLP and vocabulary dimensions split")
    devices: int | None = option(None, count, doc="how many devices the mesh spans, the first ones present (a "
                                                  "deliberately smaller mesh); null: every device")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "aloe"] = option(
        "synthetic", doc="personas: generated in place (synthetic) or the ALOE pool read from aloe_dir")
    aloe_dir: str = option("../shared/data/aloe", doc="directory of the ALOE persona files (data.source=aloe)")
    extractor: Literal["rules", "llm"] = option(
        "rules", doc="how an ALOE profile becomes profile items: rules, or the judges' LLM (cached per run)")
    num_personas: int = option(256, count, doc="training personas (the held-out evaluation draws its own)")
    switch_turn: int | None = option(
        None, count, doc="preference-conflict training: the user's profile switches at this turn "
                         "(1..rollout.max_rounds); null: never")


@dataclass(frozen=True)
class UserConfig:
    kind: str = option("scripted", doc="the simulated user: a name in dialogue.users.USER_SIMULATORS (scripted, llm)")
    llm: LLMSection = section(LLMSection, doc="the LLM user's endpoint (user.kind=llm); unset fields inherit llm")
    prompt: str = option("user_roleplay", prompt_name,
                         doc="the LLM user's role-play prompt: user_roleplay (ours) or paper_user (the paper's "
                             "simulator, in English)")


@dataclass(frozen=True)
class JudgeConfig:
    kind: str = option("embedded", doc="the profile and response judges: a name in dialogue.judges.JUDGES "
                                       "(embedded rules, llm)")
    llm: LLMSection = section(LLMSection, doc="what both LLM judges (and eval.judge) share; unset fields inherit llm")
    profile: LLMRoleSection = section(LLMRoleSection, doc="the profile judge's own endpoint")
    response: LLMRoleSection = section(LLMRoleSection, doc="the response judge's own endpoint")
    # The paper: the gold profile enters only through profile F1; the ALOE evaluation's judge sees
    # the true persona, so training on it leaks the test criterion.
    response_reference: Literal["inferred", "persona"] = option(
        "inferred", doc="whom the response judge role-plays in training: the profile the policy inferred (the "
                        "paper) or the user's true persona")
    profile_prompt: str = option("profile_judge", prompt_name,
                                 doc="the LLM profile judge's prompt: profile_judge (ours) or paper_profile_judge")
    response_prompt: str = option("response_judge", prompt_name,
                                  doc="the LLM response judge's prompt: response_judge (ours) or paper_response_judge")


@dataclass(frozen=True)
class EvalConfig:
    judge: LLMRoleSection = section(
        LLMRoleSection, doc="the ALOE evaluation's judge (launch/eval.py with judges.kind=llm; the paper: GPT-4o)")


@dataclass(frozen=True)
class RolloutConfig:
    # conversation: one policy plays every turn of a dialogue. turn (the paper): later turns are
    # sampled by a newer policy.
    schedule: Literal["conversation", "turn"] = option(
        "conversation", doc="conversation: each iteration plays `conversations` new dialogues to the end; turn: a "
                            "pool of live dialogues advances one turn per iteration")
    conversations: int = option(8, count, doc="dialogues per PPO iteration, or the live pool's size (schedule=turn)")
    max_rounds: int = option(10, count, doc="turns per dialogue")
    samples_per_prompt: int = option(4, count, doc="samples per prompt (n); the best-rewarded one continues the "
                                                   "dialogue")
    temperature: float = option(1.0, non_negative, doc="sampling temperature; 0 is greedy")
    top_p: float = option(1.0, nucleus, doc="nucleus sampling: keep the most likely tokens up to this probability")
    top_k: int = option(0, non_negative, doc="keep the k most likely tokens; 0: no top-k filter")
    max_new_tokens: int = option(96, count, doc="tokens the policy may write per turn")
    prompt_buckets: list[int] = option(factory=lambda: [128, 256, 512, 1024, 2048, 4096], domain=increasing_sizes,
                                       doc="prompt lengths are padded up to one of these, so a run compiles a "
                                           "handful of programs")
    max_prompt_tokens: int = option(4096, count, doc="older turns are dropped from the prompt beyond this")
    pipeline_groups: int = option(2, count, doc="conversation groups: host work for one overlaps device sampling "
                                                "for another")
    system_prompt: str = option("policy_system", prompt_name, doc="the policy's system prompt")
    eval_conversations: int = option(32, count, doc="held-out dialogues scored before and after PPO (one sample "
                                                    "per turn)")
    # ... and this many such iterations in a row stop the run (max_invalid_iterations).
    max_invalid_fraction: float = option(0.2, unit_interval,
                                         doc="an iteration with a larger share of unscored samples (judge or user "
                                             "failures) is not trained on")
    max_invalid_iterations: int = option(3, count, doc="this many untrained iterations in a row stop the run (with "
                                                       "a checkpoint and the judges' errors)")
    generator: str = option("jax", non_empty, doc="what samples the policy: a name in generation.sampler.GENERATORS")
    # generation.layout.SamplingLayout
    layout: Literal["replicated", "tensor", "training"] = option(
        "replicated", doc="the actor's layout while sampling: replicated (no weight traffic per decode step), "
                          "tensor (split over the tensor axis) or training (FSDP)")
    # prefix_cache.py; the same tokens as a full prefill
    prefix_cache: bool = option(True, doc="keep each group's prompt cache from turn to turn and prefill only what "
                                          "the next prompt adds; false re-prefills every prompt")


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = option(20, non_negative, doc="PPO iterations; 0: SFT (if enabled) and the evaluation only")
    actor_lr: float = option(5e-7, positive, doc="the policy's peak learning rate")
    critic_lr: float = option(9e-6, positive, doc="the value model's peak learning rate")
    # training/output_scale.py
    output_scale_lr: float | None = option(
        None, positive, doc="the final norm moves as one scalar inverse temperature (in log space) at this peak "
                            "rate; null: it trains like every other weight")
    adam_b1: float = option(0.9, decay_rate, doc="Adam's first-moment decay")
    adam_b2: float = option(0.95, decay_rate, doc="Adam's second-moment decay")
    weight_decay: float = option(0.0, non_negative, doc="AdamW's decoupled weight decay")
    # 0 would zero every update
    grad_clip: float = option(1.0, positive, doc="global gradient-norm clip")
    warmup_ratio: float = option(0.03, unit_interval, doc="share of the optimizer steps spent warming up linearly")
    min_lr_ratio: float = option(0.1, unit_interval, doc="the cosine decay ends at this share of the peak rate")
    train_batch_size: int = option(128, count, doc="samples per optimizer step")
    micro_batch_size: int = option(16, count, doc="samples per accumulated micro-batch (a multiple of mesh.data x "
                                                  "mesh.fsdp)")
    epochs: int = option(1, count, doc="passes over each iteration's experience")
    clip_eps: float = option(0.2, positive, doc="clip range of the policy's probability ratio")
    value_clip_eps: float = option(0.2, positive, doc="clip range of the value model's update")
    kl_coef: float = option(0.01, non_negative, doc="weight of the KL penalty to the reference policy")
    kl_estimator: Literal["k1", "k3"] = option("k1", doc="per-token KL estimate: k1 (-log r) or k3 (r - 1 - log r, "
                                                         "never negative)")
    # With loss (or kl_coef 0), one epoch and one minibatch per iteration, the actor's scoring
    # forward is skipped (rl/experience.py).
    kl_penalty: Literal["reward", "loss"] = option(
        "reward", doc="reward: the KL is subtracted in the advantages (the paper); loss: the actor loss adds it "
                      "(DeepSeekMath's GRPO, TRL)")
    adaptive_kl: bool = option(False, doc="adapt kl_coef toward kl_target (Ziegler et al.)")
    kl_target: float = option(6.0, positive, doc="the KL that adaptive_kl steers toward")
    kl_horizon: int = option(10000, count, doc="adaptive_kl's horizon in samples: how slowly the coefficient moves")
    gamma: float = option(1.0, unit_interval, doc="discount per token")
    lam: float = option(0.95, unit_interval, doc="GAE's lambda")
    advantage: str = option("gae", doc="a name in rl/advantages.py's ADVANTAGE_ESTIMATORS: gae (the paper), "
                                       "cross_turn, grpo")
    whiten_advantages: bool = option(True, doc="normalise the advantages to mean 0, variance 1 over each iteration's experience")
    entropy_coef: float = option(0.0, non_negative, doc="weight of the entropy bonus in the actor loss")
    reward: Literal["both", "profile", "response"] = option(
        "both", doc="which rewards a turn earns: both (the paper) or one alone (ablations)")
    # turn: the whole turn shares its reward (the paper); block: the <profile> block earns the
    # profile reward and the reply the response reward; item: block, each profile line credited
    # with its items' share of the F1.
    credit: str = option("turn", doc="a name in rl/advantages.py's CREDIT_SCHEMES: turn (the paper), block, item")


@dataclass(frozen=True)
class SFTConfig:
    enabled: bool = option(False, doc="warm-start the policy on scripted teacher dialogues before PPO")
    steps: int = option(200, count, doc="SFT optimizer steps")
    learning_rate: float = option(1e-3, positive, doc="SFT's peak learning rate")
    batch_size: int = option(16, count, doc="examples per SFT step (a multiple of mesh.data x mesh.fsdp)")
    num_dialogues: int = option(256, count, doc="personas whose scripted dialogues give the examples")
    warmup_steps: int = option(10, non_negative, doc="SFT's linear warmup steps")


@dataclass(frozen=True)
class DPOConfig:
    """launch/dpo.py: DPO on scripted preference pairs (offline/dpo.py)."""

    beta: float = option(0.1, positive, doc="strength of the implicit KL anchor to the reference")
    steps: int = option(200, count, doc="DPO optimizer steps")
    learning_rate: float = option(1e-4, positive, doc="DPO's peak learning rate")
    batch_size: int = option(8, count, doc="preference pairs per optimizer step")
    num_dialogues: int = option(128, count, doc="personas whose scripted dialogues give the pairs")
    warmup_steps: int = option(10, non_negative, doc="DPO's linear warmup steps")
    # At 0.5 the loss is symmetric in the margin and carries no preference at all.
    label_smoothing: float = option(0.0, within(0, 0.5, open_high=True),
                                    doc="conservative DPO's label-flip probability")


@dataclass(frozen=True)
class LoggingConfig:
    checkpoint_every: int = option(5, count, doc="iterations between checkpoints; the last one is always saved")
    max_to_keep: int = option(3, count, doc="checkpoints kept")
    tensorboard: bool = option(True, doc="write TensorBoard event files beside metrics.jsonl")
    # Weights & Biases beside TensorBoard (pip install '.[wandb]'; WANDB_MODE=offline writes the run
    # under <run>/wandb/ without an account).
    wandb: bool = option(False, doc="log the same scalars as TensorBoard, at the same steps, and the config to "
                                    "Weights & Biases")
    wandb_project: str = option("rlpa-jax", doc="the Weights & Biases project")
    wandb_entity: str | None = option(None, doc="the Weights & Biases entity (null: the account's default)")
    wandb_run_name: str | None = option(None, doc="the Weights & Biases run name (null: the run's `name`)")
    export_hf: bool = option(True, doc="export the final policy as a Hugging Face directory (<run_dir>/hf)")
    export_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", doc="the exported weights' dtype")
    progress_bar: bool = option(True, doc="show progress bars")


@dataclass(frozen=True)
class TrainConfig:
    name: str = option("tiny", doc="the run's name: its directory is output_dir/name")
    output_dir: str = option("runs", doc="where run directories (and the compile cache) go")
    seed: int = option(0, non_negative, doc="seed of every random draw")  # numpy generators refuse negative seeds
    model: ModelConfig = section(ModelConfig, doc="the policy model")
    mesh: MeshConfig = section(MeshConfig, doc="how the devices are laid out (runtime/parallel.py)")
    data: DataConfig = section(DataConfig, doc="the personas the simulated users play")
    llm: SharedLLMSection = section(SharedLLMSection, doc="the LLM endpoint every role inherits")
    user: UserConfig = section(UserConfig, doc="the simulated user")
    judges: JudgeConfig = section(JudgeConfig, doc="the profile and response judges that give the rewards")
    eval: EvalConfig = section(EvalConfig, doc="the ALOE evaluation (launch/eval.py)")
    rollout: RolloutConfig = section(RolloutConfig, doc="dialogues and sampling")
    ppo: PPOConfig = section(PPOConfig, doc="PPO: optimizer, losses, KL penalty, advantages")
    sft: SFTConfig = section(SFTConfig, doc="the supervised warm start (launch/train.py with sft.enabled, "
                                            "launch/sft.py)")
    dpo: DPOConfig = section(DPOConfig, doc="DPO on scripted preference pairs (launch/dpo.py)")
    logging: LoggingConfig = section(LoggingConfig, doc="checkpoints, metrics and exports")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
