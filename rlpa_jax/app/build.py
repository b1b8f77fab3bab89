"""Builds what a run needs from its config: mesh, model and tokenizer, personas, the environment
(simulated users and judges), the generator, the initial policy, the experience builder, the
updaters (a critic's only when the advantage estimator needs one), the checkpointer, the metrics
log and the conversation pool, and the trainer made of them (which builds nothing itself).

The embedded default builds everything in place (a tiny random Qwen2, a tokenizer trained on the
spot, synthetic personas, the scripted user and rule-based judges); real runs read a local Hugging
Face directory and point users and judges at an OpenAI-compatible endpoint. This module sits above
rl/, offline/ and eval/ (it wires them together); the launch scripts call it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import jax
import numpy as np
import yaml

from rlpa_jax.app.run_dir import prepare_run_dir
from rlpa_jax.config import loading as config_loading
from rlpa_jax.config.llm_sections import LLMRoleSection, inherited
from rlpa_jax.config.options import ConfigError
from rlpa_jax.config.tree import TrainConfig, to_dict
from rlpa_jax.dialogue import judges, personas, users
from rlpa_jax.dialogue.chat import load_prompt
from rlpa_jax.dialogue.llm import local
from rlpa_jax.dialogue.llm.client import client_from_section
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.llm.sync import run_sync
from rlpa_jax.dialogue.llm.usage import LLMMeter
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import GENERATORS
from rlpa_jax.model import hf
from rlpa_jax.model.checkpoint_folder import hf_folder
from rlpa_jax.model.qwen2 import Params, Qwen2Config, init_params
from rlpa_jax.model.tokenizer import TINY_TOKENIZER_MIN_VOCAB, load_tokenizer, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.offline import sft
from rlpa_jax.offline.teacher import scripted_dialogues
from rlpa_jax.rl import advantages
from rlpa_jax.rl.environment import Environment
from rlpa_jax.rl.experience import ExperienceBuilder, ForwardPasses, scores_old_logprobs, trim_padding
from rlpa_jax.rl.metrics import MetricsLog, WandbOptions
from rlpa_jax.rl.objectives import actor_loss_fn, critic_loss_fn, response_tokens
from rlpa_jax.rl.schedule import ConversationPool
from rlpa_jax.rl.trainer import Trainer, TrainingParts
from rlpa_jax.runtime import multihost, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, checkpoint_directory, model_config_from_meta, restore_actor_params
from rlpa_jax.runtime.parallel import param_shardings
from rlpa_jax.training.optimizer import make_optimizer
from rlpa_jax.training.output_scale import with_output_scale_lr
from rlpa_jax.training.updater import Updater

log = logging.getLogger(__name__)


def _error_of(check) -> str | None:
    try:
        check()
    except ValueError as error:
        return str(error)
    return None


def _one_of(key: str, value: str, table) -> str | None:
    return None if value in table else f"{key}={value!r} is not one of {', '.join(table)}"


def _judge_matches_items(c: TrainConfig) -> str | None:
    item_credit = advantages.lookup(c.ppo.advantage, c.ppo.credit).needs_item_credit and c.ppo.reward != "response"
    if not item_credit or judges.matches_items(c.judges.kind):
        return None
    takers = [kind for kind in judges.JUDGES if judges.matches_items(kind)]
    return (f"ppo.credit={c.ppo.credit} needs a profile judge that says which items matched, but judges.kind="
            f"{c.judges.kind}'s only counts them; use judges.kind={' or '.join(takers)}, or another ppo.credit")


def _tokenizer_vocabulary(c: TrainConfig) -> str | None:
    if c.model.path is not None or c.model.tokenizer_path is not None:
        return None  # the tokenizer is read from a folder, not trained to model.tiny.vocab_size
    if c.model.tiny.vocab_size >= TINY_TOKENIZER_MIN_VOCAB:
        return None
    return (f"model.tiny.vocab_size={c.model.tiny.vocab_size} is too small for the tokenizer trained for the tiny "
            f"model (model.path and model.tokenizer_path are null): a byte-level BPE with the Qwen special tokens "
            f"needs at least {TINY_TOKENIZER_MIN_VOCAB} ids")


# Cross-field checks of the names the config gives to implementations, against their tables (which
# config.py, at the bottom of the import order, cannot see); config.load_config reports them with
# everything else, each with where its value came from.
CONFIG_RULES = (
    (("ppo.advantage", "ppo.credit", "rollout.samples_per_prompt"),
     lambda c: _error_of(lambda: advantages.lookup(c.ppo.advantage, c.ppo.credit, c.rollout.samples_per_prompt))),
    (("rollout.generator",), lambda c: _one_of("rollout.generator", c.rollout.generator, GENERATORS)),
    (("user.kind",), lambda c: _one_of("user.kind", c.user.kind, users.USER_SIMULATORS)),
    (("judges.kind",), lambda c: _one_of("judges.kind", c.judges.kind, judges.JUDGES)),
    # What the implementations can do (after the rules above: a name that is not theirs is skipped).
    (("ppo.credit", "ppo.advantage", "ppo.reward", "judges.kind"), _judge_matches_items),
    (("model.tiny.vocab_size", "model.path", "model.tokenizer_path"), _tokenizer_vocabulary),
)


def load_config(path=None, overrides: list[str] | None = None, job: str = "train") -> TrainConfig:
    """config.load_config with every name checked against the tables of implementations, and the
    rules of `job` (train, sft, dpo, eval: the program the config is for; config/rules.py)."""
    return config_loading.load_config(path, overrides, CONFIG_RULES, job)


def load_config_and_sources(path=None, overrides: list[str] | None = None,
                            job: str = "train") -> tuple[TrainConfig, config_loading.Sources]:
    """load_config's config and where each of its values came from (config.loading.origin reads it)."""
    return config_loading.load_config_and_sources(path, overrides, CONFIG_RULES, job)


def build_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    return parallel.make_mesh(config.mesh)


def check_rows_split(mesh: jax.sharding.Mesh, config: TrainConfig, key: str, rows: int, what: str) -> None:
    """A batch of `rows` (config key `key`) splits over the mesh's data x fsdp devices. What the config
    fixes of those axes is checked at load (config/rules.py); an axis at -1 is sized only now."""
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    if rows % (data * fsdp) == 0:
        return
    sizes = f"mesh.data={config.mesh.data}, mesh.fsdp={config.mesh.fsdp}, mesh.tensor={config.mesh.tensor}"
    raise ConfigError(f"{key}={rows} must be a multiple of the mesh's data x fsdp devices, {data} x {fsdp} = "
                      f"{data * fsdp} here ({sizes} on {mesh.devices.size} of {jax.device_count()} devices; "
                      f"{what} are split over them); set {key} to a multiple of {data * fsdp}, or fix the mesh sizes")


def tokenizer_dir(config: TrainConfig) -> Path:
    """The tokenizer that belongs to the policy: explicit, the model's, the initial checkpoint's,
    or (the tiny world) one trained into the run directory."""
    if config.model.tokenizer_path:
        return Path(config.model.tokenizer_path).expanduser()
    if config.model.path is not None:
        return hf_folder(config.model.path)
    if config.model.init_checkpoint is not None:
        meta = Checkpointer(checkpoint_directory(config.model.init_checkpoint), max_to_keep=None).restore_meta()
        if meta.get("tokenizer_dir"):
            return Path(meta["tokenizer_dir"])
    return config.run_dir / "tokenizer"


def build_tokenizer(config: TrainConfig):
    directory = tokenizer_dir(config)
    if config.model.path is None:
        # Process 0 alone trains and writes it (run directories are shared); the others wait.
        if multihost.is_main_process() and not (directory / "tokenizer.json").exists():
            train_tiny_tokenizer(directory, vocab_size=config.model.tiny.vocab_size, texts=world_corpus(config))
        multihost.barrier("tiny tokenizer written")
    return load_tokenizer(directory)


def world_corpus(config: TrainConfig, num_dialogues: int = 200, value_repeats: int = 100) -> list[str]:
    """Tokenizer training text for the embedded world: its persona paragraphs, scripted dialogues
    and every persona value repeated, so the values become whole tokens (a tiny policy copies a
    one-token value from the conversation far more easily than a spelled-out one). The generic
    corpus is left out: its words would take the merges the world's values need."""
    pool = build_personas(config, "train")[:num_dialogues]
    texts = [f"{p.profile_text} {p.personality_text}" for p in pool]
    for dialogue in scripted_dialogues(pool, num_turns=config.rollout.max_rounds, seed=config.seed):
        texts += [target for _, target in dialogue] + [m.content for m in dialogue[-1][0] if m.role == "user"]
    values = " ".join(personas.synthetic_values())
    return texts + [values] * value_repeats


def model_config(config: TrainConfig) -> Qwen2Config:
    numerics = dict(compute_dtype=config.model.compute_dtype, remat=config.model.remat,
                    scan_layers=config.model.scan_layers, attention=config.model.attention)
    if config.model.path is not None:
        return hf.load_config(hf_folder(config.model.path), **numerics)
    tiny = config.model.tiny
    return Qwen2Config(vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                       num_layers=tiny.num_layers, num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
                       rope_theta=tiny.rope_theta, tie_word_embeddings=tiny.tie_word_embeddings, **numerics)


def build_policy(config: TrainConfig, model_cfg: Qwen2Config, mesh) -> Params:
    """Policy parameters placed on the mesh: loaded from disk, or random for the tiny model."""
    shardings = param_shardings(model_cfg, mesh)
    if config.model.init_checkpoint is not None:
        directory = checkpoint_directory(config.model.init_checkpoint)
        params, meta, _ = restore_actor_params(directory, shardings=shardings)
        saved = model_config_from_meta(meta, str(directory))
        if saved.replace(compute_dtype=model_cfg.compute_dtype, remat=model_cfg.remat,
                         scan_layers=model_cfg.scan_layers, attention=model_cfg.attention) != model_cfg:
            raise ValueError(f"model.init_checkpoint={directory}: its model {saved} differs from the configured {model_cfg}")
        return params
    if config.model.path is not None:
        params, _ = hf.load_params(hf_folder(config.model.path), model_cfg, shardings=shardings)
        return params
    return jax.jit(lambda key: init_params(model_cfg, key), out_shardings=shardings)(jax.random.key(config.seed))


def build_personas(config: TrainConfig, split: str = "train") -> list[personas.Persona]:
    """The split's persona pool (the evaluation split is disjoint from training)."""
    data = config.data
    if data.source == "synthetic":
        # Evaluation personas come from a disjoint seed stream.
        return personas.synthetic_personas(data.num_personas, seed=config.seed + (0 if split == "train" else 10_000))
    profiles, personalities = personas.load_aloe_pool(data.aloe_dir, split=split)
    pairs = (personas.pair_for_training(profiles, personalities, data.num_personas, seed=config.seed)
             if split == "train" else personas.pair_for_evaluation(profiles, personalities))
    if data.extractor == "rules":
        return personas.personas_from_pairs(pairs)
    extractor = personas.LLMProfileExtractor(client_from_section(config.judges.llm, "judges.llm"),
                                             config.run_dir / "persona_slots.jsonl")
    items = run_sync(extractor.extract_many(pairs))
    return personas.personas_from_items(pairs, items)


def build_environment(config: TrainConfig, tokenizer) -> Environment:
    profile_judge, response_judge = judges.build_judges(config.judges)
    item_credit = advantages.lookup(config.ppo.advantage, config.ppo.credit).needs_item_credit
    return Environment(tokenizer, load_prompt(config.rollout.system_prompt), users.build_user(config.user),
                       profile_judge, response_judge, config.ppo.reward, config.rollout.max_prompt_tokens,
                       item_credit=item_credit, response_reference=config.judges.response_reference)


def build_engine(config: TrainConfig, model_cfg: Qwen2Config, tokenizer, mesh) -> GenerationEngine:
    """The generation engine the rollouts sample the actor with (rollout.generator, .layout,
    .prefix_cache, .prompt_buckets), on the run's mesh."""
    r = config.rollout
    return GenerationEngine(model_cfg, stop_token_ids(tokenizer), tokenizer.pad_token_id, mesh=mesh, layout=r.layout,
                            prompt_buckets=r.prompt_buckets, generator=r.generator, prefix_cache=r.prefix_cache)


def initial_actor(config: TrainConfig, model_cfg: Qwen2Config, mesh, tokenizer,
                  train_personas) -> tuple[Params, list[dict]]:
    """The policy a PPO run starts from, placed on the mesh, after the SFT warm start when enabled
    (the same entry point as launch/sft.py); with the warm start's per-step records."""
    actor = build_policy(config, model_cfg, mesh)
    if not config.sft.enabled:
        return actor, []
    actor, history, _ = sft.warm_start(actor, model_cfg, tokenizer, train_personas, config, mesh,
                                       param_shardings(model_cfg, mesh))
    return actor, history


def shared_reference(config: TrainConfig, model_cfg: Qwen2Config, shardings: Params) -> Params | None:
    """The weights a local LLM role already holds of the policy's own checkpoint, for the PPO
    reference to use instead of a second copy: only when they are the starting policy (it comes
    from model.path as it is: no init_checkpoint, no SFT warm start) and sit as the reference
    would (shapes, dtypes, placement `shardings`: a one-device mesh, as the role engines have)."""
    if config.model.path is None or config.model.init_checkpoint is not None or config.sft.enabled:
        return None
    role = local.loaded_model(config.model.path)
    if role is None or role.chat.engine.params is None:
        return None
    params = role.chat.engine.params
    wanted = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    if jax.tree.structure(params) != jax.tree.structure(wanted) or not all(
            x.shape == w.shape and x.dtype == w.dtype and x.sharding.is_equivalent_to(sharding, x.ndim)
            for x, w, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(wanted), jax.tree.leaves(shardings))):
        log.info("the PPO reference keeps its own copy: the local roles' %s is placed otherwise than the mesh's "
                 "parameters", role.path)
        return None
    log.info("the PPO reference shares the local LLM roles' weights of %s (one copy of the model fewer)", role.path)
    return params


def probe_endpoints(environment: Environment) -> None:
    """One cheap request to every LLM endpoint the simulated user and the judges talk to (once per
    URL, model and key), so a wrong URL, model or key stops the run at start-up with the role and
    the (redacted) URL."""
    probed: set[tuple[str, str, str]] = set()
    for role, client in environment.llm_clients().items():
        endpoint = (client.config.base_url, client.config.model, client.config.api_key_env)
        if endpoint in probed:
            continue
        probed.add(endpoint)
        try:
            run_sync(client.probe())
        except LLMCallError as error:
            raise ValueError(f"the {role.replace('_', ' ')}'s LLM endpoint does not answer: {error}") from None


def build_eval_judges(config: TrainConfig) -> judges.JudgePair:
    """The ALOE evaluation's judges: judges.kind's, both on eval.judge.llm (the paper: GPT-4o)."""
    judge_llm = inherited(config.eval.judge.llm, config.judges.llm)
    if config.judges.kind == "llm" and judge_llm.backend != "local" and judge_llm.base_url is None:
        raise ConfigError("eval.judge.llm.base_url: the evaluation's judge (judges.kind=llm) needs an LLM endpoint; "
                          "set eval.judge.llm.base_url or judges.llm.base_url or llm.base_url")
    section = dataclasses.replace(config.judges, profile=LLMRoleSection(config.eval.judge.llm),
                                  response=LLMRoleSection(config.eval.judge.llm))
    return judges.build_judges(section)


def samples_per_iteration(config: TrainConfig) -> int:
    """Rows of an iteration's experience: one turn of every pool conversation (`turn`), or every
    turn of the new conversations (`conversation`), n samples each."""
    r = config.rollout
    turns_per_iteration = 1 if r.schedule == "turn" else r.max_rounds
    return r.conversations * turns_per_iteration * r.samples_per_prompt


def optimizer_steps(config: TrainConfig) -> int:
    """The run's optimizer steps (the learning-rate schedules' length): every epoch's minibatches
    of every iteration."""
    p = config.ppo
    return p.iterations * p.epochs * math.ceil(samples_per_iteration(config) / p.train_batch_size)


def put_rows(mesh, array):
    """Rows every process holds whole (the gathered experience) onto the mesh, split over (data, fsdp)."""
    return multihost.put_identical(array, parallel.batch_sharding(mesh, np.ndim(array)))


def build_experience_builder(config: TrainConfig, model_cfg: Qwen2Config, mesh, pad_id: int) -> ExperienceBuilder:
    """Samples -> Experience with the configured estimator; the actor's scoring forward is skipped
    where the old log-probs feed nothing but one on-policy step (experience.scores_old_logprobs)."""
    r, p = config.rollout, config.ppo
    estimator = advantages.lookup(p.advantage, p.credit, r.samples_per_prompt)
    forwards = ForwardPasses(model_cfg, chunk_rows=p.micro_batch_size, put_batch=functools.partial(put_rows, mesh),
                             trim=functools.partial(trim_padding, prompt_buckets=r.prompt_buckets))
    packed_rows = -(-samples_per_iteration(config) // p.micro_batch_size) * p.micro_batch_size
    score_actor = scores_old_logprobs(p, packed_rows)
    if not score_actor:
        log.info("the actor's scoring forward is skipped: each iteration's %d rows make one optimizer step "
                 "(ppo.epochs=1, train_batch_size=%d) and the KL is %s, so the old log-probs are the update's "
                 "own (ratio 1)", packed_rows, p.train_batch_size,
                 "in the loss" if p.kl_penalty == "loss" else "off (kl_coef=0)")
    return ExperienceBuilder(forwards, estimator, pad_id, r.max_new_tokens, r.prompt_buckets, p.reward,
                             p.kl_estimator, p.whiten_advantages, p.kl_penalty, score_actor)


def build_updaters(config: TrainConfig, model_cfg: Qwen2Config, mesh) -> tuple[Updater, Updater | None]:
    """The actor's Updater, and the critic's when the advantage estimator needs a critic (else None:
    the run then holds no critic at all). Every update runs on rows cut to their own length buckets."""
    r, p = config.rollout, config.ppo
    steps = optimizer_steps(config)
    opt = dict(b1=p.adam_b1, b2=p.adam_b2, weight_decay=p.weight_decay, grad_clip=p.grad_clip,
               warmup_ratio=p.warmup_ratio, min_lr_ratio=p.min_lr_ratio)
    trim = functools.partial(trim_padding, prompt_buckets=r.prompt_buckets)
    actor = Updater(actor_loss_fn(model_cfg, p.clip_eps, p.entropy_coef, p.kl_estimator),
                    with_output_scale_lr(make_optimizer(p.actor_lr, steps, **opt), p.actor_lr, p.output_scale_lr),
                    p.micro_batch_size, response_tokens, mesh=mesh, param_shardings=param_shardings(model_cfg, mesh),
                    trim=trim)
    if not advantages.lookup(p.advantage, p.credit).needs_critic:
        return actor, None
    critic = Updater(critic_loss_fn(model_cfg, p.value_clip_eps), make_optimizer(p.critic_lr, steps, **opt),
                     p.micro_batch_size, response_tokens, mesh=mesh,
                     param_shardings=param_shardings(model_cfg, mesh, "value"), trim=trim)
    return actor, critic


def write_run_config(config: TrainConfig) -> None:
    """The run directory, with the config it runs (process 0 writes what a run writes once)."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    if multihost.is_main_process():
        (config.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def wandb_options(config: TrainConfig) -> WandbOptions | None:
    """Where the run's Weights & Biases run goes (None: logging.wandb is off)."""
    chosen = config.logging
    if not chosen.wandb:
        return None
    return WandbOptions(project=chosen.wandb_project, name=chosen.wandb_run_name or config.name,
                        entity=chosen.wandb_entity, config=to_dict(config))


def build_training_parts(config: TrainConfig) -> TrainingParts:
    """Every part of a training run, built from `config` (nothing heavy runs: the initial policy,
    its SFT warm start included, is made when the trainer asks for it)."""
    mesh = build_mesh(config)
    check_rows_split(mesh, config, "ppo.micro_batch_size", config.ppo.micro_batch_size, "each micro-batch's rows")
    if config.sft.enabled:
        check_rows_split(mesh, config, "sft.batch_size", config.sft.batch_size, "each SFT step's examples")
    model_cfg = model_config(config)
    tokenizer = build_tokenizer(config)
    train_personas = build_personas(config, "train")
    eval_personas = build_personas(config, "eval")[:config.rollout.eval_conversations]
    environment = build_environment(config, tokenizer)
    probe_endpoints(environment)
    write_run_config(config)
    r = config.rollout
    pool = (ConversationPool(r.conversations, train_personas, environment.user_sim, config.seed, r.max_rounds,
                             config.data.switch_turn) if r.schedule == "turn" else None)
    actor_updater, critic_updater = build_updaters(config, model_cfg, mesh)
    return TrainingParts(
        mesh=mesh, model_config=model_cfg, tokenizer_dir=tokenizer_dir(config).absolute(),
        environment=environment, engine=build_engine(config, model_cfg, tokenizer, mesh),
        train_personas=train_personas, eval_personas=eval_personas,
        initial_actor=lambda: initial_actor(config, model_cfg, mesh, tokenizer, train_personas),
        pool=pool, build_experience=build_experience_builder(config, model_cfg, mesh, tokenizer.pad_token_id),
        actor_updater=actor_updater, critic_updater=critic_updater,
        checkpointer=Checkpointer(config.run_dir / "checkpoints", config.logging.max_to_keep),
        metrics=MetricsLog(config.run_dir, config.logging.tensorboard, wandb_options(config)),
        llm_meter=LLMMeter(environment.llm_clients()),
        reference_weights=shared_reference(config, model_cfg, actor_updater.param_shardings))


def build_trainer(config: TrainConfig, start: str = "new") -> Trainer:
    """A Trainer with every part built from `config` (nothing heavy runs until train()), after the
    run directory is checked for a run started as `start` (app/run_dir.py: new, resume,
    resume_if_present, fresh), before anything is written into it."""
    resume = prepare_run_dir(config.run_dir, start)
    return Trainer(config, build_training_parts(config), resume=resume)
