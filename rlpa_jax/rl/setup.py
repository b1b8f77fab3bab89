"""Builds what a run needs from its config: model and tokenizer, mesh, personas, users, judges.

The embedded default builds everything in place (a tiny random Qwen2, a tokenizer trained on the
spot, synthetic personas, the scripted user and rule-based judges); real runs read a local Hugging
Face directory and point users and judges at an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np

from rlpa_jax import parallel
from rlpa_jax.checkpoint import Checkpointer, checkpoint_directory, model_config_from_meta, restore_actor_params
from rlpa_jax.config import LLMSection, TrainConfig
from rlpa_jax.dialogue import judges, personas, users
from rlpa_jax.dialogue.llm import LLMClient, client_from_section, run_sync
from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import Params, Qwen2Config, init_params
from rlpa_jax.rl.step import param_shardings
from rlpa_jax.tokenizer import load_tokenizer, train_tiny_tokenizer

log = logging.getLogger(__name__)


def build_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    m = config.mesh
    return parallel.make_mesh(parallel.MeshConfig(m.data, m.fsdp, m.tensor))


def tokenizer_dir(config: TrainConfig) -> Path:
    """The tokenizer that belongs to the policy: explicit, the model's, the initial checkpoint's,
    or (the tiny world) one trained into the run directory."""
    if config.model.tokenizer_path:
        return Path(config.model.tokenizer_path)
    if config.model.path is not None:
        return Path(config.model.path)
    if config.model.init_checkpoint is not None:
        meta = Checkpointer(checkpoint_directory(config.model.init_checkpoint), max_to_keep=None).restore_meta()
        if meta.get("tokenizer_dir"):
            return Path(meta["tokenizer_dir"])
    return config.run_dir / "tokenizer"


def build_tokenizer(config: TrainConfig):
    directory = tokenizer_dir(config)
    if config.model.path is None and not (directory / "tokenizer.json").exists():
        train_tiny_tokenizer(directory, vocab_size=config.model.tiny.vocab_size, texts=world_corpus(config))
    return load_tokenizer(directory)


def world_corpus(config: TrainConfig, num_dialogues: int = 200, value_repeats: int = 100) -> list[str]:
    """Tokenizer training text for the embedded world: its persona paragraphs, scripted dialogues
    and every persona value repeated, so the values become whole tokens (a tiny policy copies a
    one-token value from the conversation far more easily than a spelled-out one). The generic
    corpus is left out: its words would take the merges the world's values need."""
    from rlpa_jax.offline.teacher import scripted_dialogues

    pool = build_personas(config, "train")[:num_dialogues]
    texts = [f"{p.profile_text} {p.personality_text}" for p in pool]
    for dialogue in scripted_dialogues(pool, num_turns=config.rollout.max_rounds, seed=config.seed):
        texts += [target for _, target in dialogue] + [m.content for m in dialogue[-1][0] if m.role == "user"]
    values = " ".join(personas.synthetic_values())
    return texts + [values] * value_repeats


def model_config(config: TrainConfig) -> Qwen2Config:
    numerics = dict(compute_dtype=config.model.compute_dtype, remat=config.model.remat)
    if config.model.path is not None:
        return hf.load_config(config.model.path, **numerics)
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
        if saved.replace(compute_dtype=model_cfg.compute_dtype, remat=model_cfg.remat) != model_cfg:
            raise ValueError(f"model.init_checkpoint={directory}: its model {saved} differs from the configured {model_cfg}")
        return params
    if config.model.path is not None:
        params, _ = hf.load_params(config.model.path, model_cfg, shardings=shardings)
        return params
    return jax.jit(lambda key: init_params(model_cfg, key), out_shardings=shardings)(jax.random.key(config.seed))


def build_personas(config: TrainConfig, split: str = "train") -> list[personas.Persona]:
    data = config.data
    if data.source == "synthetic":
        # Evaluation personas come from a disjoint seed stream.
        return personas.synthetic_personas(data.num_personas, seed=config.seed + (0 if split == "train" else 10_000))
    profiles, personalities = personas.load_aloe_pool(data.aloe_dir, split=split)
    pairs = (personas.pair_for_training(profiles, personalities, data.num_personas, seed=config.seed)
             if split == "train" else personas.pair_for_evaluation(profiles, personalities))
    if data.extractor == "rules":
        return personas.personas_from_pairs(pairs)
    extractor = personas.LLMProfileExtractor(llm_client(config.judges.llm), config.run_dir / "persona_slots.jsonl")
    items = run_sync(extractor.extract_many(pairs))
    return personas.personas_from_items(pairs, items)


def llm_client(section: LLMSection) -> LLMClient:
    return client_from_section(section)


def build_user(config: TrainConfig) -> users.UserSimulator:
    return users.build_user(config.user)


def build_judges(config: TrainConfig) -> tuple[judges.ProfileJudge, judges.ResponseJudge]:
    return judges.build_judges(config.judges)


def iteration_personas(pool: list[personas.Persona], count: int, seed: int, iteration: int) -> list[int]:
    """Persona indices for one PPO iteration: a pure function of (seed, iteration), so a resumed
    run draws exactly the users the uninterrupted run would have drawn."""
    rng = np.random.default_rng([seed, iteration])
    return rng.choice(len(pool), size=count, replace=len(pool) < count).tolist()
