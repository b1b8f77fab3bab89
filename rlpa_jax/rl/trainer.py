"""The RLPA training run: rollout -> experience -> update -> log -> checkpoint, iteration after iteration.

One PPO iteration (`rollout.schedule=conversation`): B new conversations run `max_rounds` turns
with n samples per turn (best-of-n continues); with `turn` (the paper), a pool of B live
conversations advances one turn each (rl/schedule.py). Every sample becomes a row of one
Experience (rl/experience.py: the actor's, reference's and, when the estimator needs one, the
critic's forwards, KL and advantages), and the actor and, when there is one, the critic are
updated. When that update is one on-policy optimizer step and the KL is in the loss
(`ppo.kl_penalty=loss`) or off, the actor's forward is skipped (`scores_old_logprobs`). Checkpoints hold actor, critic, reference, optimizer states, the data position and the
conversation pool, so `--resume` continues the same run. The first Ctrl-C finishes the current
iteration, saves and exits; a NaN stops the run with a message and leaves the last good
checkpoint in place.

With several processes (README "Several hosts") each plays its share of the conversations
(rl/rollout.py) and then holds the iteration's whole experience: the forwards and updates are
global programs over the mesh, every decision (skipped update, adaptive KL, Ctrl-C) is the same on
every process, and the run equals one process holding every device. With `turn`, every process
also holds the whole conversation pool: after each turn the processes exchange the conversations
they played (rl/schedule.py), so the pool, its statistics and its checkpoint item are the same
everywhere.

The trainer is handed its parts (`TrainingParts`: the environment, the generation engine, the personas,
the initial policy) already built; rlpa_jax/app/build.py builds them from a config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import yaml
from jax.sharding import Mesh
from tqdm.auto import tqdm

from rlpa_jax.config.tree import PPOConfig, TrainConfig, to_dict
from rlpa_jax.dialogue.llm.usage import LLMMeter, progress_postfix
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.qwen2 import Params, Qwen2Config, critic_params_from_policy, init_params
from rlpa_jax.rl import advantages, memory_check, ppo
from rlpa_jax.rl.environment import Environment, start_conversations
from rlpa_jax.rl.experience import (
    Experience,
    ExperienceBuilder,
    ForwardPasses,
    length_grouped_minibatches,
    prompt_lengths,
    trim_padding,
)
from rlpa_jax.rl.iteration_metrics import experience_metrics, profile_by_turn
from rlpa_jax.rl.iteration_programs import iteration_programs
from rlpa_jax.rl.metrics import MetricsLog, plot_training
from rlpa_jax.rl.objectives import actor_loss_fn, critic_loss_fn, response_tokens
from rlpa_jax.rl.rollout import Rollout, RolloutResult
from rlpa_jax.rl.schedule import ConversationPool, derived_seed, fresh_conversations
from rlpa_jax.runtime import hf_export, multihost, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, policy_meta
from rlpa_jax.training.optimizer import make_optimizer
from rlpa_jax.training.output_scale import output_scale_ratio, with_output_scale_lr
from rlpa_jax.training.updater import Trainable, Updater

log = logging.getLogger(__name__)

POOL_DOCUMENT = "conversation_pool"  # the checkpoint item holding the `turn` schedule's pool (JSON)


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


class UnscoredRollouts(TrainingDiverged):
    """Judges or users failed on too many samples, iteration after iteration; the run saved its
    state (unchanged by those iterations) so that --resume continues once the endpoint works."""


@dataclasses.dataclass(frozen=True)
class TrainingParts:
    """What a training run is made of, built from its config by rlpa_jax/app/build.py."""

    mesh: Mesh
    model_config: Qwen2Config
    tokenizer_dir: Path  # saved in checkpoint metadata, so a checkpoint names its tokenizer
    environment: Environment  # prompts, simulated users, judges
    engine: GenerationEngine  # samples the actor (rollouts and the held-out evaluation)
    train_personas: Sequence[Persona]
    eval_personas: Sequence[Persona]  # held-out users scored before and after PPO
    # The policy placed on the mesh, and the per-step records of its warm start (empty without one).
    initial_actor: Callable[[], tuple[Params, list[dict]]]


def scores_old_logprobs(p: PPOConfig, rows_per_iteration: int) -> bool:
    """Whether an iteration needs the actor's scoring forward (the "old" log-probs).

    It does not when every row is updated exactly once, at the parameters that sampled and would
    have scored it (one epoch, all rows in one minibatch: one optimizer step, whose micro-batches
    all see the same parameters), and nothing but the PPO ratio reads the old log-probs: the KL is
    in the loss, or it is off (kl_coef 0 in the rewards; adaptive KL cannot move a 0). The loss's
    own log-probs, detached, are then the old ones, and the KL metric comes from the update.
    """
    one_step = p.epochs == 1 and rows_per_iteration <= p.train_batch_size
    return not (one_step and (p.kl_penalty == "loss" or p.kl_coef == 0))


class Trainer:
    def __init__(self, config: TrainConfig, parts: TrainingParts):
        self.config, self.parts = config, parts
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if multihost.is_main_process():  # one writer of what a run writes once (checkpoints: every process)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        self.mesh, self.model_config = parts.mesh, parts.model_config
        self.advantages = advantages.lookup(config.ppo.advantage, config.ppo.credit, config.rollout.samples_per_prompt)

        r, p = config.rollout, config.ppo
        self.row_multiple = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if p.micro_batch_size % self.row_multiple:
            raise ValueError(f"ppo.micro_batch_size={p.micro_batch_size} must be a multiple of mesh data*fsdp="
                             f"{self.row_multiple} (rows are split over those devices)")
        # Shared by the training and evaluation rollouts (one set of compiled programs); each
        # rollout's prefix caches live for that rollout only.
        self.engine = parts.engine
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.samples_per_prompt)
        self.rollout = self._rollout(self.sampling)

        self.pool = (ConversationPool(r.conversations, parts.train_personas, parts.environment.user_sim, config.seed,
                                      r.max_rounds, config.data.switch_turn) if r.schedule == "turn" else None)
        turns_per_iteration = 1 if self.pool else r.max_rounds
        samples_per_iteration = r.conversations * turns_per_iteration * r.samples_per_prompt
        self.total_steps = p.iterations * p.epochs * math.ceil(samples_per_iteration / p.train_batch_size)
        opt = dict(b1=p.adam_b1, b2=p.adam_b2, weight_decay=p.weight_decay, grad_clip=p.grad_clip,
                   warmup_ratio=p.warmup_ratio, min_lr_ratio=p.min_lr_ratio)
        # Every forward and update runs on rows cut to their own length buckets.
        trim = functools.partial(trim_padding, prompt_buckets=r.prompt_buckets)
        forwards = ForwardPasses(self.model_config, chunk_rows=p.micro_batch_size, put_batch=self._put_batch, trim=trim)
        packed_rows = -(-samples_per_iteration // p.micro_batch_size) * p.micro_batch_size
        score_actor = scores_old_logprobs(p, packed_rows)
        if not score_actor:
            log.info("the actor's scoring forward is skipped: each iteration's %d rows make one optimizer step "
                     "(ppo.epochs=1, train_batch_size=%d) and the KL is %s, so the old log-probs are the update's "
                     "own (ratio 1)", packed_rows, p.train_batch_size,
                     "in the loss" if p.kl_penalty == "loss" else "off (kl_coef=0)")
        self.build_experience = ExperienceBuilder(
            forwards, self.advantages, parts.environment.tokenizer.pad_token_id,
            r.max_new_tokens, r.prompt_buckets, p.reward, p.kl_estimator, p.whiten_advantages,
            p.kl_penalty, score_actor)
        self.actor_updater = Updater(actor_loss_fn(self.model_config, p.clip_eps, p.entropy_coef, p.kl_estimator),
                                     with_output_scale_lr(make_optimizer(p.actor_lr, self.total_steps, **opt),
                                                          p.actor_lr, p.output_scale_lr), p.micro_batch_size,
                                     response_tokens, mesh=self.mesh,
                                     param_shardings=parallel.param_shardings(self.model_config, self.mesh), trim=trim)
        self.critic_updater = Updater(critic_loss_fn(self.model_config, p.value_clip_eps),
                                      make_optimizer(p.critic_lr, self.total_steps, **opt), p.micro_batch_size,
                                      response_tokens, mesh=self.mesh,
                                      param_shardings=parallel.param_shardings(self.model_config, self.mesh, "value"),
                                      trim=trim)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", config.logging.max_to_keep)
        self.metrics = MetricsLog(self.run_dir, config.logging.tensorboard)
        self.llm_meter = LLMMeter(parts.environment.llm_clients())  # per-role calls, latency, tokens, cost
        self.on_iteration_end: list[Callable[[int, dict], None]] = []
        self._stop_requested = False
        self._invalid_iterations = 0  # iterations in a row with too many unscored samples

    # ------------------------------------------------------------------------------- state

    def _rollout(self, sampling: SamplingParams) -> Rollout:
        r = self.config.rollout
        return Rollout(self.parts.environment, self.engine, sampling, r.max_rounds, r.pipeline_groups)

    def _put_batch(self, array):
        """Rows every process holds whole (the gathered experience) onto the mesh."""
        return multihost.put_identical(array, parallel.batch_sharding(self.mesh, np.ndim(array)))

    def initial_state(self) -> dict:
        actor, warm_start_history = self.parts.initial_actor()
        for step, record in enumerate(warm_start_history):
            self.metrics.write("sft", step, record)
        critic = parallel.shard(critic_params_from_policy(actor, self.model_config), self.critic_updater.param_shardings)
        reference = jax.tree.map(lambda x: x.copy(), actor)  # frozen: the KL anchor
        return {"actor": self.actor_updater.init(actor), "critic": self.critic_updater.init(critic), "reference": reference}

    def save(self, state: dict, iteration: int, kl_coef: float, pool: dict | None = None) -> None:
        """A checkpoint at `iteration`, with the conversation pool as it stands (or as `pool`)."""
        meta = {"iteration": iteration, "kl_coef": kl_coef, "seed": self.config.seed} | policy_meta(
            self.model_config, self.parts.tokenizer_dir, self.config.rollout.system_prompt)
        documents = {POOL_DOCUMENT: self.pool.to_json() if pool is None else pool} if self.pool else None
        self.checkpointer.save(iteration, state, meta, documents=documents)

    def restore(self) -> tuple[dict, int, float]:
        """The newest readable checkpoint (and its conversation pool): a damaged newer one is
        reported, moved aside (`<step>.corrupt`) and the previous one used; none readable is a
        CheckpointError."""
        documents = (POOL_DOCUMENT,) if self.pool else ()
        step, state, meta, found = self.checkpointer.resume(self.abstract_state(), documents)
        if self.pool and found.get(POOL_DOCUMENT) is None:
            log.warning("checkpoint step %d holds no conversation pool (saved with rollout.schedule=conversation?): "
                        "the pool starts with new users", step)
        elif self.pool:
            self.pool.load_json(found[POOL_DOCUMENT], f"{self.checkpointer.directory}/{step}")
        log.info("resumed from iteration %d", meta["iteration"])
        return state, int(meta["iteration"]), float(meta["kl_coef"])

    def initial_state_shapes(self) -> dict:
        """The state's structure without running SFT or loading weights (for restoring into)."""
        actor = init_params(self.model_config, jax.random.key(0))
        critic = critic_params_from_policy(actor, self.model_config)
        return {"actor": Trainable(actor, self.actor_updater.optimizer.init(actor)),
                "critic": Trainable(critic, self.critic_updater.optimizer.init(critic)), "reference": actor}

    def abstract_state(self) -> dict:
        """The state as shapes, dtypes and shardings (no memory): to restore into, or to compile for."""
        template = jax.eval_shape(self.initial_state_shapes)
        actor_sh, critic_sh = self.actor_updater.param_shardings, self.critic_updater.param_shardings
        shardings = {
            "actor": Trainable(actor_sh, self.actor_updater.opt_state_shardings(template["actor"].params)),
            "critic": Trainable(critic_sh, self.critic_updater.opt_state_shardings(template["critic"].params)),
            "reference": actor_sh,
        }
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), template, shardings)

    def checkpoint_bytes(self) -> int:
        """What one checkpoint of this run's state takes on disk (every array, whole)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state()))

    def memory_programs(self) -> list[memory_check.Program]:
        """The iteration's largest programs, lowered for this run's shapes (rl/iteration_programs.py)."""
        return iteration_programs(self)

    def check_device_memory(self, device_bytes: float | None = None) -> None:
        """Stops a run whose programs would not fit a device (skipped where its memory is unknown)."""
        device_bytes = device_bytes or memory_check.device_memory_bytes()
        if device_bytes is None:
            log.info("memory check skipped: this backend does not report device memory")
            return
        with parallel.activate(self.mesh):
            memory_check.check(self.memory_programs(), device_bytes)

    # ------------------------------------------------------------------------------- one iteration

    def conversations(self, iteration: int):
        """The `conversation` schedule's new users for `iteration`."""
        cfg = self.config
        return fresh_conversations(self.parts.train_personas, self.parts.environment.user_sim,
                                   cfg.rollout.conversations, cfg.seed, iteration, cfg.data.switch_turn)

    def play(self, iteration: int, key: jax.Array) -> RolloutResult:
        """This iteration's rollout: whole new conversations, or one turn of every pool conversation
        (finished ones replaced first) with the pool's turn and turnover in the stats."""
        if self.pool is None:
            return self.rollout.run(self.conversations(iteration), key)
        started = self.pool.refill()
        turns = self.pool.turns()
        result = self.rollout.play_turn(self.pool.conversations, turns, key)
        if result.local_ids is not None:  # several processes: each played its share of the pool
            self.pool.take_peer_turns(result.local_ids)
            result.conversations = self.pool.conversations
        result.stats |= {"pool_turn": float(np.mean(turns)) + 1, "conversations_started": float(started),
                         "conversations_finished": float(self.pool.finished())}
        return result

    def iteration(self, state: dict, iteration: int, kl_coef: float) -> tuple[dict, dict, float]:
        cfg, p = self.config, self.config.ppo
        key = jax.random.fold_in(jax.random.key(cfg.seed), iteration)
        t0 = time.perf_counter()
        self.engine.sync(state["actor"].params)
        weight_sync_s = time.perf_counter() - t0
        self.llm_meter.mark()
        try:
            result = self.play(iteration, key)
        finally:
            self.engine.release()  # the sampling copy lives for the rollout only
        metrics = {k: v for k, v in result.stats.items()} | {"weight_sync_s": weight_sync_s} | self.llm_meter.interval()
        valid = [s for s in result.samples if s.score.valid]
        invalid_fraction = 1.0 - len(valid) / max(len(result.samples), 1)
        if invalid_fraction > cfg.rollout.max_invalid_fraction:
            # Training on the few samples the judges did score would be training on a biased subset.
            self._invalid_iterations += 1
            problems = "; ".join(self.parts.environment.judge_problems()) or "no judge error recorded"
            log.warning("iteration %d: %.0f%% of samples unscored (rollout.max_invalid_fraction=%g): no update. %s",
                        iteration, 100 * invalid_fraction, cfg.rollout.max_invalid_fraction, problems)
            if self._invalid_iterations >= cfg.rollout.max_invalid_iterations:
                raise UnscoredRollouts(
                    f"iteration {iteration}: {self._invalid_iterations} iterations in a row had more than "
                    f"{cfg.rollout.max_invalid_fraction:.0%} unscored samples ({invalid_fraction:.0%} now): {problems}")
            return state, metrics | {"skipped_update": 1.0}, kl_coef
        self._invalid_iterations = 0

        t0 = time.perf_counter()
        settings = ppo.AdvantageSettings(p.gamma, p.lam, cfg.rollout.samples_per_prompt, kl_coef)
        critic = state["critic"].params if self.advantages.needs_critic else None
        with parallel.activate(self.mesh):
            # Every sample, the unscored ones masked: a prompt's n samples stay one group of rows.
            experience = self.build_experience(result.samples, state["actor"].params, state["reference"], critic,
                                               settings)
        metrics |= experience_metrics(experience)
        metrics["kl_coef"] = kl_coef
        metrics["scoring_forward_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        state, update_metrics = self.update(state, experience, iteration)
        metrics |= update_metrics
        # Without old log-probs the KL is measured where the loss forward saw it (at the same
        # parameters, so the same number); adaptive KL reads it.
        metrics.setdefault("kl", update_metrics.get("loss_kl", 0.0))
        metrics["update_s"] = time.perf_counter() - t1
        metrics["update_tokens_per_s"] = float(experience.attention_mask.sum()) * p.epochs / metrics["update_s"]
        metrics["output_scale"] = output_scale_ratio(state["actor"].params, state["reference"])
        metrics["sampler_compiles"] = self.engine.compile_count
        if p.adaptive_kl:
            kl_coef = float(ppo.adaptive_kl_coef(kl_coef, metrics["kl"], p.kl_target, p.kl_horizon, len(valid)))
        return state, metrics, kl_coef

    def update(self, state: dict, experience: Experience, iteration: int) -> tuple[dict, dict]:
        p = self.config.ppo
        size = p.train_batch_size
        rng = np.random.default_rng([self.config.seed, iteration, 1])
        lengths = prompt_lengths(experience)
        if experience.old_logprobs is None and (p.epochs > 1 or experience.rows > size):
            raise RuntimeError(f"iteration {iteration}: {experience.rows} rows x {p.epochs} epochs are more than one "
                               f"optimizer step of {size}, but the actor's scoring forward was skipped")
        update_rows = experience.only(*self.build_experience.update_fields)
        actor, critic = state["actor"], state["critic"]
        sums: dict[str, list[float]] = {}
        for _ in range(p.epochs):
            for rows in length_grouped_minibatches(lengths, size, rng):
                # Every minibatch has exactly train_batch_size rows (zero-mask padding); the updaters
                # cut each micro-batch to its own length buckets (one program per bucket pair in use).
                minibatch = update_rows.take(rows).padded_rows(size)
                actor, actor_metrics = self.actor_updater(actor, minibatch)
                if self.advantages.needs_critic:
                    critic, critic_metrics = self.critic_updater(critic, minibatch)
                    actor_metrics |= {f"critic_{k}": v for k, v in critic_metrics.items()}
                for k, v in multihost.fetch(actor_metrics).items():  # replicated scalars
                    sums.setdefault(k, []).append(float(v))
        metrics = {k: float(np.mean(v)) for k, v in sums.items()}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"iteration {iteration}: non-finite {', '.join(bad)}; stopping. "
                                   f"The last good checkpoint in {self.checkpointer.directory} is kept.")
        return state | {"actor": actor, "critic": critic}, metrics

    # ------------------------------------------------------------------------------- the run

    def evaluate(self, params, personas, label: str) -> dict:
        """Mean rewards of one sample per turn on held-out personas (same judges and user)."""
        sampling = dataclasses.replace(self.sampling, num_samples=1)
        rollout = self._rollout(sampling)
        seeds = [derived_seed(self.config.seed, -1, k) for k in range(len(personas))]
        conversations = start_conversations(personas, self.parts.environment.user_sim, seeds)
        self.engine.sync(params)
        try:
            result = rollout.run(conversations, jax.random.key(self.config.seed + 7))
        finally:
            self.engine.release()
        keys = ("reward", "profile_f1", "response_reward", "well_formed", "revealed_items")
        metrics = {k: result.stats[k] for k in keys} | profile_by_turn(result.samples, result.conversations,
                                                                        result.local_ids)
        self.metrics.write(f"eval_{label}", 0, metrics)
        return metrics

    def train(self, resume: bool = False) -> dict:
        cfg = self.config
        self.check_device_memory()
        if resume and self.checkpointer.latest_step() is not None:
            state, start, kl_coef = self.restore()
            self.metrics.truncate_after("ppo", start - 1)
        else:
            if resume:
                log.warning("--resume: no checkpoint in %s; starting a new run", self.checkpointer.directory)
            state, start, kl_coef = self.initial_state(), 0, cfg.ppo.kl_coef
            self.save(state, 0, kl_coef)
        eval_personas = self.parts.eval_personas
        before = self.metrics.records("eval_start")
        before = before[-1] if before else self.evaluate(state["actor"].params, eval_personas, "start")

        previous = signal.signal(signal.SIGINT, self._request_stop)
        bar = tqdm(range(start, cfg.ppo.iterations), initial=start, total=cfg.ppo.iterations, desc="PPO",
                   disable=not cfg.logging.progress_bar or not multihost.is_main_process(), dynamic_ncols=True)
        last = {}
        try:
            for iteration in bar:
                pool_before = self.pool.to_json() if self.pool else None
                try:
                    state, last, kl_coef = self.iteration(state, iteration, kl_coef)
                except UnscoredRollouts:
                    self.save(state, iteration, kl_coef, pool_before)  # --resume retries this iteration
                    raise
                self.metrics.write("ppo", iteration, last)
                llm = {"llm": progress_postfix(last, self.llm_meter.clients)} if self.llm_meter.clients else {}
                bar.set_postfix(reward=f"{last['reward']:.3f}", f1=f"{last['profile_f1']:.3f}",
                                kl=f"{last.get('kl', 0.0):.4f}", tok_s=f"{last.get('sampling_tokens_per_s', 0):.0f}",
                                **llm)
                done = iteration + 1
                for callback in self.on_iteration_end:
                    callback(iteration, last)
                # A Ctrl-C on any host stops every process after the same iteration.
                self._stop_requested = multihost.agree_on_any(self._stop_requested)
                if done % cfg.logging.checkpoint_every == 0 or done == cfg.ppo.iterations or self._stop_requested:
                    self.save(state, done, kl_coef)
                if self._stop_requested:
                    print(f"\nstopped after iteration {done}; checkpoint saved in {self.checkpointer.directory} "
                          f"(continue with --resume)")
                    return last
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()

        after = self.evaluate(state["actor"].params, eval_personas, "end")
        summary = {"start": before, "end": after}
        if self.llm_meter.clients:
            summary["llm"] = self.llm_meter.totals()
        plot_training(self.metrics, self.run_dir / "rewards.png", baseline=before, final=after)  # every process
        if cfg.logging.export_hf:
            hf_export.export_hf(state["actor"].params, self.model_config, self.run_dir / "hf",
                         tokenizer_dir=self.parts.tokenizer_dir)
        self.metrics.close()
        return summary

    def _request_stop(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: leave now, the last checkpoint stays
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: finishing this iteration, then saving (press again to quit without saving)")

