"""One GRPO iteration with our stack against TRL's GRPOTrainer, on the same tiny Qwen2 weights.

An iteration, on both sides: sample `--samples` completions of exactly `--new-tokens` tokens
(temperature 1, no stop token) for each of `--prompts` prompts of `--prompt-len` tokens, score them
with the same deterministic reward (the share of even token ids in the completion), take group
advantages, and make one optimizer step (Adam) over all the sampled rows in one batch.

- Ours, as rl/trainer.py runs an iteration under `ppo.advantage=grpo, ppo.kl_penalty=loss,
  ppo.kl_estimator=k3` (TRL's form): the jitted `Sampler` (prefill once, n samples decoded from
  copies of the cache), then the trainer's `ExperienceBuilder` (the frozen reference's log-probs
  and the group advantages; the actor's scoring forward is skipped, as the trainer skips it for one
  on-policy update per batch), and one `Updater` step of the clipped PPO loss plus kl_coef * k3.
- TRL (benchmark-only dependency: `pip install -e '.[bench]'`): `GRPOTrainer` with its plain
  transformers `generate` path (no vLLM), beta = `--kl-coef` (so it scores the reference
  model's log-probs too), one generation per optimizer step (`steps_per_generation=1`,
  `num_iterations=1`, no gradient accumulation). On-policy, both take the old log-probs from the
  loss forward itself (detached: ratio 1) and add beta * k3 per token to the loss.

Prompts are made of single-token words ("t17" is token 17), so TRL's tokenizer gives both sides
the same ids, and all prompts have the same length so both pad nothing. Phases are timed per
iteration: generation (TRL: `_generate`, tokenizing included), scoring (rewards, advantages,
log-prob forwards; TRL: the rest of `_generate_and_score_completions`) and update (TRL: the rest of
the training step: loss forward, backward, optimizer step). The two sides alternate (TRL step,
then ours, from a TRL callback), compile and the first step of each side are excluded, and the best
iteration of each is reported, since other processes only add time.

    .venv/bin/python benchmarks/grpo_trl.py
    .venv/bin/python benchmarks/grpo_trl.py --prompts 8 --samples 4 --prompt-len 64 --new-tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in forward.py

from rlpa_jax.runtime import host_allocator  # noqa: E402

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: glibc keeps big blocks, for both frameworks alike (docs/PERF.md)

import forward as bench  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlpa_jax.config.tree import PPOConfig  # noqa: E402
from rlpa_jax.generation.sampler import Sampler, SamplingParams  # noqa: E402
from rlpa_jax.model import hf  # noqa: E402
from rlpa_jax.model.qwen2 import Qwen2Config  # noqa: E402
from rlpa_jax.rl import advantages, ppo  # noqa: E402
from rlpa_jax.rl.experience import Experience, ExperienceBuilder, ForwardPasses, scores_old_logprobs  # noqa: E402
from rlpa_jax.rl.objectives import actor_loss_fn, response_tokens  # noqa: E402
from rlpa_jax.training.updater import Updater  # noqa: E402

PAD_ID = 0  # "<pad>"; "<eos>" is 1 and never stops a row (both sides decode every token)
PHASES = ("generation", "scoring", "update")

# The embedded default's model (configs/tiny.yaml: model.tiny).
TINY_SHAPE = dict(vocab=1000, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, tied=False,
                  rope_theta=1_000_000.0)


def even_share(completions: list[list[int]]) -> list[float]:
    """The reward: the share of even token ids in each completion (deterministic, cheap)."""
    return [float(np.mean(np.asarray(ids) % 2 == 0)) if len(ids) else 0.0 for ids in completions]


def word_tokenizer(vocab: int):
    """A transformers tokenizer whose word "t<i>" is token i, with no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, vocab)}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def random_prompts(count: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, (count, length)).astype(np.int32)


class OurIteration:
    """One GRPO iteration with our stack; call() returns seconds per phase.

    The trainer's path for `ppo.advantage=grpo, ppo.kl_penalty=loss, ppo.kl_estimator=k3` with one
    update per batch: its ExperienceBuilder (without the actor's forward, as the trainer decides
    for one on-policy step: rl/experience.py scores_old_logprobs) and its actor loss."""

    def __init__(self, config: Qwen2Config, params, args: argparse.Namespace):
        self.config, self.args = config, args
        rows = args.prompts * args.samples
        self.reference = jax.tree.map(jnp.array, params)  # the frozen reference: a copy
        ppo_config = PPOConfig(train_batch_size=rows, micro_batch_size=rows, epochs=1, kl_coef=args.kl_coef,
                               kl_penalty="loss", kl_estimator="k3", advantage="grpo", whiten_advantages=False)
        self.updater = Updater(actor_loss_fn(config, clip_eps=0.2, entropy_coef=0.0, kl_estimator="k3"),
                               optax.adam(args.lr), micro_batch_size=rows, loss_mask=response_tokens)
        self.trainable = self.updater.init(params)
        self.sampler = Sampler(config, stop_ids=(), pad_id=PAD_ID)
        self.build_experience = ExperienceBuilder(
            ForwardPasses(config, chunk_rows=rows), advantages.lookup("grpo", "turn", args.samples), PAD_ID,
            args.new_tokens, (args.prompt_len,), "both", "k3", whiten_advantages=False,
            kl_penalty="loss", score_actor=scores_old_logprobs(ppo_config, rows))
        self.settings = ppo.AdvantageSettings(gamma=1.0, lam=1.0, group_size=args.samples, kl_coef=args.kl_coef)
        self.sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, num_samples=args.samples)
        self.calls = 0

    def __call__(self, prompts: np.ndarray) -> dict[str, float]:
        args, times = self.args, {}
        start = time.perf_counter()
        mask = np.ones(prompts.shape, bool)
        out = self.sampler(self.trainable.params, prompts, mask, jax.random.key(self.calls), self.sampling)
        tokens, response_mask = np.asarray(out.tokens), np.asarray(out.mask)  # host copies: waits for the sampler
        self.calls += 1
        times["generation"] = time.perf_counter() - start

        start = time.perf_counter()
        scores = np.asarray(even_share([row[m].tolist() for row, m in zip(tokens, response_mask)]), np.float32)
        experience = Experience(tokens=np.concatenate([np.repeat(prompts, args.samples, 0), tokens], axis=1),
                                attention_mask=np.concatenate([np.repeat(mask, args.samples, 0), response_mask], axis=1),
                                response_mask=response_mask, scores=scores, valid=np.ones(len(scores), bool))
        experience = self.build_experience.score(experience, self.trainable.params, self.reference, None,
                                                 self.settings)
        times["scoring"] = time.perf_counter() - start

        start = time.perf_counter()
        self.trainable, _ = self.updater(self.trainable, experience.only(*self.build_experience.update_fields))
        jax.block_until_ready(self.trainable.params)
        times["update"] = time.perf_counter() - start
        return times


class TrlTimer:
    """Wraps a GRPOTrainer's methods to split each training step into the three phases, and runs
    `after_step` (our iteration) once TRL's step is timed, so the two sides alternate."""

    def __init__(self, trainer, after_step: Callable[[], None]):
        self.steps: list[dict[str, float]] = []
        self.after_step = after_step
        self._current: dict[str, float] = {}
        for name in ("_generate", "_generate_and_score_completions"):
            setattr(trainer, name, self._timed(getattr(trainer, name), name))

    def _timed(self, method, name):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class StepTimes(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._current = {}
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                total = time.perf_counter() - timer._start
                generation = timer._current.get("_generate", 0.0)
                prepare = timer._current.get("_generate_and_score_completions", 0.0)
                timer.steps.append({"generation": generation, "scoring": prepare - generation,
                                    "update": total - prepare})
                timer.after_step()

        return StepTimes()


def trl_trainer(model_dir: str, tokenizer, prompts: np.ndarray, args: argparse.Namespace, output_dir: str):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    texts = [" ".join(f"t{i}" for i in row) for row in prompts]
    rows = args.prompts * args.samples

    def reward(prompts, completions, completion_ids, **kwargs):
        return even_share(completion_ids)

    config = GRPOConfig(
        output_dir=output_dir, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, seed=args.seed, max_steps=args.repeats + 1,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.samples, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
        beta=args.kl_coef, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0 if not args.trl_clip_grad else 1.0,
        # No stop token: every completion is exactly new_tokens long, as on our side.
        generation_kwargs={"min_new_tokens": args.new_tokens, "eos_token_id": None},
        dataloader_num_workers=0, gradient_checkpointing=False,  # ours keeps activations too (remat "none")
    )
    dataset = datasets.Dataset.from_dict({"prompt": texts})
    return GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                       processing_class=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations of each side (after one warm-up)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.01, help="ours: KL penalty; TRL: beta")
    parser.add_argument("--trl-clip-grad", action="store_true", help="let TRL clip the gradient norm at 1 (ours does not)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                        help="ours: the training forwards as one layer scan (model.scan_layers; the tiny config, "
                             "whose model this is, runs them unrolled)")
    for name, default in TINY_SHAPE.items():
        if name != "tied":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    shape = argparse.Namespace(preset=None, **{k: getattr(args, k, v) for k, v in TINY_SHAPE.items()}, dtype="float32")
    config = bench.model_config(shape, args.prompt_len + args.new_tokens).replace(scan_layers=args.scan_layers)
    torch_model, _ = bench.matched_models(config, args.seed)
    rows = args.prompts * args.samples
    print(bench.environment_line(), f"| torch {torch.__version__}, {args.threads} threads")
    print(f"model: vocab {config.vocab_size}, hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
          f"layers {config.num_layers} ({'scanned' if config.scan_layers else 'unrolled'} in training), heads "
          f"{config.num_heads}/{config.num_kv_heads} kv, float32")
    print(f"iteration: {args.prompts} prompts x {args.samples} samples = {rows} rows, prompts of {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens each (temperature 1, no stop), one Adam step over all {rows} rows")

    with tempfile.TemporaryDirectory() as directory:
        model_dir = str(Path(directory) / "model")
        torch_model.save_pretrained(model_dir)
        tokenizer = word_tokenizer(config.vocab_size)
        tokenizer.save_pretrained(model_dir)
        params, _ = hf.load_params(model_dir, config)

        ours = OurIteration(config, params, args)
        our_prompts = [random_prompts(args.prompts, args.prompt_len, config.vocab_size, args.seed + i)
                       for i in range(args.repeats + 2)]
        start = time.perf_counter()
        ours(our_prompts[0])  # compiles
        print(f"ours: first iteration (compiles) {time.perf_counter() - start:.1f} s, "
              f"{ours.sampler.compile_count} sampler program(s)")
        our_times: list[dict[str, float]] = []

        trl_prompts = random_prompts(args.prompts * (args.repeats + 1), args.prompt_len, config.vocab_size, args.seed)
        trainer = trl_trainer(model_dir, tokenizer, trl_prompts, args, str(Path(directory) / "trl"))
        timer = TrlTimer(trainer, lambda: our_times.append(ours(our_prompts[len(our_times) + 1])))
        trainer.add_callback(timer.callback())
        trainer.train()

    best = {}
    for side, steps in (("ours", our_times[1:]), ("trl", timer.steps[1:])):  # the first of each: warm-up
        totals = [sum(step.values()) for step in steps]
        best[side] = steps[int(np.argmin(totals))]
        phases = ", ".join(f"{p} {min(s[p] for s in steps) * 1e3:,.0f} ms" for p in PHASES)
        print(f"{side:>4}: iteration best {min(totals) * 1e3:,.0f} ms, median {np.median(totals) * 1e3:,.0f} ms of "
              f"{len(totals)}; best per phase: {phases}")
    for phase in PHASES:
        trl_best = min(s[phase] for s in timer.steps[1:])
        our_best = min(s[phase] for s in our_times[1:])
        print(f"{phase:>10}: ours {our_best * 1e3:,.0f} ms, trl {trl_best * 1e3:,.0f} ms, trl/ours {trl_best / our_best:.2f}x")
    trl_total = min(sum(s.values()) for s in timer.steps[1:])
    our_total = min(sum(s.values()) for s in our_times[1:])
    print(f"iteration: ours {our_total * 1e3:,.0f} ms, trl {trl_total * 1e3:,.0f} ms; "
          f"ratio trl/ours (our speed-up) {trl_total / our_total:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
