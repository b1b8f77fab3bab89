"""The RLPA training run: rollout -> experience -> update -> log -> checkpoint, iteration after iteration.

One PPO iteration (`rollout.schedule=conversation`): B new conversations run `max_rounds` turns
with n samples per turn (best-of-n continues); with `turn` (the paper), a pool of B live
conversations advances one turn each (rl/schedule.py). Every sample becomes a row of one
Experience (rl/experience.py: the actor's, reference's and, when the estimator needs one, the
critic's forwards, KL and advantages), and the actor and, when there is one, the critic are
updated. When that update is one on-policy optimizer step and the KL is in the loss
(`ppo.kl_penalty=loss`) or off, the actor's forward is skipped (rl/experience.py
`scores_old_logprobs`). Checkpoints hold the TrainState (rl/train_state.py: actor, critic when
there is one, reference, optimizer states, the iteration and KL coefficient) and the conversation
pool, so `--resume` continues the same run. The first Ctrl-C finishes the current iteration, saves
and exits; a NaN stops the run with a message and leaves the last good checkpoint in place.

With several processes (README "Several hosts") each plays its share of the conversations
(rl/rollout.py) and then holds the iteration's whole experience: the forwards and updates are
global programs over the mesh, every decision (skipped update, adaptive KL, Ctrl-C) is the same on
every process, and the run equals one process holding every device. With `turn`, every process
also holds the whole conversation pool: after each turn the processes exchange the conversations
they played (rl/schedule.py), so the pool, its statistics and its checkpoint item are the same
everywhere.

The trainer is handed its parts (`TrainingParts`: the environment, the generation engine,
the personas, the initial policy, the updaters, the experience builder, the checkpointer, the metrics log, the
conversation pool) already built; rlpa_jax/app/build.py builds them from a config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from rlpa_jax.config.tree import TrainConfig
from rlpa_jax.dialogue.llm.usage import LLMMeter, progress_postfix
from rlpa_jax.dialogue.personas import Persona
from rlpa_jax.dialogue.policy_format import add_policy_format
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model.hf import CheckpointError
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.rl import memory_check, ppo, train_state
from rlpa_jax.rl.environment import Environment, start_conversations
from rlpa_jax.rl.experience import Experience, ExperienceBuilder
from rlpa_jax.rl.iteration_metrics import experience_metrics, profile_by_turn
from rlpa_jax.rl.iteration_programs import SamplerSetup, iteration_programs
from rlpa_jax.rl.metrics import MetricsLog, plot_training
from rlpa_jax.rl.rollout import Rollout, RolloutResult
from rlpa_jax.rl.schedule import ConversationPool, derived_seed, fresh_conversations
from rlpa_jax.rl.train_state import TrainState
from rlpa_jax.rl.update import ppo_update
from rlpa_jax.runtime import hf_export, multihost, parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, policy_meta
from rlpa_jax.training.output_scale import output_scale_ratio
from rlpa_jax.training.updater import Updater

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
    pool: ConversationPool | None  # the `turn` schedule's live conversations (None: `conversation`)
    build_experience: ExperienceBuilder  # samples -> Experience: scoring forwards, KL, advantages
    actor_updater: Updater
    critic_updater: Updater | None  # None: the advantage estimator needs no critic (the run holds none)
    checkpointer: Checkpointer
    metrics: MetricsLog
    llm_meter: LLMMeter  # per-role calls, latency, tokens, cost of the environment's LLM clients
    # The starting policy's weights as a local LLM role already holds them (app/build.py's
    # shared_reference): the frozen reference uses them instead of a copy. None: it copies.
    reference_weights: Params | None = None


class Trainer:
    def __init__(self, config: TrainConfig, parts: TrainingParts, resume: bool = False):
        self.config, self.parts = config, parts
        self.resume = resume  # train()'s default: app/run_dir.py decided it from the run directory
        self.run_dir = config.run_dir
        self.mesh, self.model_config = parts.mesh, parts.model_config
        self.pool, self.build_experience = parts.pool, parts.build_experience
        self.actor_updater, self.critic_updater = parts.actor_updater, parts.critic_updater
        self.checkpointer, self.metrics, self.llm_meter = parts.checkpointer, parts.metrics, parts.llm_meter

        r = config.rollout
        # Shared by the training and evaluation rollouts (one set of compiled programs); each
        # rollout's prefix caches live for that rollout only.
        self.engine = parts.engine
        self.sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.samples_per_prompt)
        self.rollout = self._rollout(self.sampling)

        self.on_iteration_end: list[Callable[[int, dict], None]] = []
        self._stop_requested = False
        self._invalid_iterations = 0  # iterations in a row with too many unscored samples

    # ------------------------------------------------------------------------------- state

    def _rollout(self, sampling: SamplingParams) -> Rollout:
        r = self.config.rollout
        return Rollout(self.parts.environment, self.engine, sampling, r.max_rounds, r.pipeline_groups)

    def initial_state(self) -> TrainState:
        actor, warm_start_history = self.parts.initial_actor()
        for step, record in enumerate(warm_start_history):
            self.metrics.write("sft", step, record)
        return train_state.initial_state(actor, self.model_config, self.actor_updater, self.critic_updater,
                                         self.config.ppo.kl_coef, reference=self.parts.reference_weights)

    def save(self, state: TrainState, pool: dict | None = None) -> None:
        """A checkpoint at `state.iteration`, with the conversation pool as it stands (or as `pool`).
        A step already on disk is this run's own save of the same state (a run never starts in a
        directory holding another's: app/run_dir.py) and is kept as it is: a stop right after a
        save, or in the first iteration after a start or resume, saves nothing new."""
        if state.iteration in self.checkpointer.all_steps():
            return
        meta = {"iteration": state.iteration, "kl_coef": state.kl_coef, "seed": self.config.seed} | policy_meta(
            self.model_config, self.parts.tokenizer_dir, self.config.rollout.system_prompt)
        documents = {POOL_DOCUMENT: self.pool.to_json() if pool is None else pool} if self.pool else None
        self.checkpointer.save(state.iteration, state.checkpoint_tree(), meta, documents=documents)

    def restore(self) -> TrainState:
        """The newest readable checkpoint (and its conversation pool): a damaged newer one is
        reported, moved aside (`<step>.corrupt`) and the previous one used; none readable is a
        CheckpointError, and a read failure that shows no damage (I/O, permission, memory) a
        CheckpointReadError (launch/train.py prints either in one line). A run without a critic
        leaves a checkpoint's critic on disk."""
        documents = (POOL_DOCUMENT,) if self.pool else ()
        target = self.abstract_state()
        step, tree, meta, found = self.checkpointer.resume(target.checkpoint_tree(), documents,
                                                           partial=target.critic is None)
        if self.pool and found.get(POOL_DOCUMENT) is None:
            log.warning("checkpoint step %d holds no conversation pool (saved with rollout.schedule=conversation?): "
                        "the pool starts with new users", step)
        elif self.pool:
            self.pool.load_json(found[POOL_DOCUMENT], f"{self.checkpointer.directory}/{step}")
        log.info("resumed from iteration %d", meta["iteration"])
        state = TrainState.from_checkpoint(tree, int(meta["iteration"]), float(meta["kl_coef"]))
        if self.parts.reference_weights is not None:  # the same weights: keep one copy of them
            state = dataclasses.replace(state, reference=self.parts.reference_weights)
        return state

    def abstract_state(self) -> TrainState:
        """The state as shapes, dtypes and shardings (no memory): to restore into, or to compile for."""
        return train_state.abstract_state(self.model_config, self.actor_updater, self.critic_updater,
                                          self.config.ppo.kl_coef)

    def checkpoint_bytes(self) -> int:
        """What one checkpoint of this run's state takes on disk (every array, whole)."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state()))

    def memory_programs(self) -> list[memory_check.Program]:
        """The iteration's largest programs, lowered for this run's shapes (rl/iteration_programs.py)."""
        sampler = SamplerSetup(self.engine, self.sampling,
                               keeps_prompt_caches=self.engine.keeps_prefixes and self.pool is None)
        return iteration_programs(self.config.rollout, self.config.ppo, self.mesh, self.model_config,
                                  self.abstract_state(), sampler, self.build_experience, self.actor_updater,
                                  self.critic_updater)

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

    def iteration(self, state: TrainState) -> tuple[TrainState, dict]:
        """One iteration from `state` (state.iteration of them done): the state after it, and its metrics."""
        cfg, p = self.config, self.config.ppo
        iteration, kl_coef = state.iteration, state.kl_coef
        key = jax.random.fold_in(jax.random.key(cfg.seed), iteration)
        t0 = time.perf_counter()
        self.engine.sync(state.actor.params)
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
            return dataclasses.replace(state, iteration=iteration + 1), metrics | {"skipped_update": 1.0}
        self._invalid_iterations = 0

        t0 = time.perf_counter()
        settings = ppo.AdvantageSettings(p.gamma, p.lam, cfg.rollout.samples_per_prompt, kl_coef)
        critic = state.critic.params if state.critic is not None else None
        with parallel.activate(self.mesh):
            # Every sample, the unscored ones masked: a prompt's n samples stay one group of rows.
            experience = self.build_experience(result.samples, state.actor.params, state.reference, critic, settings)
        metrics |= experience_metrics(experience)
        metrics["kl_coef"] = kl_coef
        metrics["scoring_forward_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        state, update_metrics = self.update(state, experience)
        metrics |= update_metrics
        # Without old log-probs the KL is measured where the loss forward saw it (at the same
        # parameters, so the same number); adaptive KL reads it.
        metrics.setdefault("kl", update_metrics.get("loss_kl", 0.0))
        metrics["update_s"] = time.perf_counter() - t1
        metrics["update_tokens_per_s"] = float(experience.attention_mask.sum()) * p.epochs / metrics["update_s"]
        metrics["output_scale"] = output_scale_ratio(state.actor.params, state.reference)
        metrics["sampler_compiles"] = self.engine.compile_count
        if p.adaptive_kl:
            kl_coef = float(ppo.adaptive_kl_coef(kl_coef, metrics["kl"], p.kl_target, p.kl_horizon, len(valid)))
        return dataclasses.replace(state, iteration=iteration + 1, kl_coef=kl_coef), metrics

    def update(self, state: TrainState, experience: Experience) -> tuple[TrainState, dict]:
        state, metrics = ppo_update(state, experience, self.build_experience.update_fields, self.actor_updater,
                                    self.critic_updater, self.config.ppo, self.config.seed)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"iteration {state.iteration}: non-finite {', '.join(bad)}; stopping. "
                                   f"The last good checkpoint in {self.checkpointer.directory} is kept.")
        return state, metrics

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

    def train(self, resume: bool | None = None) -> dict:
        """Train from the run's newest checkpoint (`resume`; default: as the trainer was built) or
        from the initial policy; the summary of the held-out evaluations before and after."""
        cfg = self.config
        resume = self.resume if resume is None else resume
        saved = self.checkpointer.latest_step()
        if resume and saved is None:
            raise CheckpointError(f"resume: nothing to resume in {self.run_dir} (no checkpoint in "
                                  f"{self.checkpointer.directory})")
        if not resume and saved is not None:
            raise CheckpointError(f"{self.run_dir} holds checkpoints of an earlier run (newest step {saved}): "
                                  "resume it, or start the new run in another directory")
        self.check_device_memory()
        if resume:
            state = self.restore()
            self.metrics.truncate_after("ppo", state.iteration - 1)
        else:
            state = self.initial_state()
            self.save(state)
        start = state.iteration
        eval_personas = self.parts.eval_personas
        before = self.metrics.records("eval_start")
        before = before[-1] if before else self.evaluate(state.actor.params, eval_personas, "start")

        previous = signal.signal(signal.SIGINT, self._request_stop)
        bar = tqdm(range(start, cfg.ppo.iterations), initial=start, total=cfg.ppo.iterations, desc="PPO",
                   disable=not cfg.logging.progress_bar or not multihost.is_main_process(), dynamic_ncols=True)
        last = {}
        try:
            for iteration in bar:
                pool_before = self.pool.to_json() if self.pool else None
                try:
                    state, last = self.iteration(state)
                except Exception as stop:
                    self.save_before_stopping(state, pool_before, stop)  # --resume retries this iteration
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
                    self.save(state)
                if self._stop_requested:
                    print(f"\nstopped after iteration {done}; checkpoint saved in {self.checkpointer.directory} "
                          f"(continue with --resume)")
                    return last
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()

        after = self.evaluate(state.actor.params, eval_personas, "end")
        summary = {"start": before, "end": after}
        if self.llm_meter.clients:
            summary["llm"] = self.llm_meter.totals()
        plot_training(self.metrics, self.run_dir / "rewards.png", baseline=before, final=after)  # every process
        if cfg.logging.export_hf:
            exported = hf_export.export_hf(state.actor.params, self.model_config, self.run_dir / "hf",
                                           tokenizer_dir=self.parts.tokenizer_dir, dtype=cfg.logging.export_dtype)
            add_policy_format(exported, self.parts.environment.system_prompt, cfg.rollout.system_prompt)
        self.metrics.close()
        return summary

    def save_before_stopping(self, state: TrainState, pool: dict | None, stop: Exception) -> None:
        """Save the state an iteration started from, on the way out of a run stopped by `stop`.
        Nothing is saved where the state is gone (an update that failed had consumed it: the last
        checkpoint is the last good state) or where the processes of a multi-process run may not
        all have stopped (a save is collective; only unscored rollouts are agreed by all). A save
        that fails is logged and never replaces the stop's own error, which the caller re-raises."""
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)):
            return
        if multihost.process_count() > 1 and not isinstance(stop, UnscoredRollouts):
            return
        try:
            self.save(state, pool)
        except Exception as error:
            log.error("stopping (%s: %s); the state before iteration %d could not be saved: %s: %s",
                      type(stop).__name__, stop, state.iteration, type(error).__name__, error)

    def _request_stop(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: leave now, the last checkpoint stays
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: finishing this iteration, then saving (press again to quit without saving)")

