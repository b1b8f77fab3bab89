"""One PPO actor update on micro-batches trimmed to their own length buckets, against the same update
on the untrimmed batch (every row as wide as the iteration's longest prompt + max_new_tokens).

The batch is laid out like one iteration of the embedded default (configs/tiny.yaml): 8
conversations x 4 rounds x 4 samples = 128 rows; prompts grow by ~80 tokens a round (~70 at the
first, ~310 at the fourth, so the packed width is 384 + 128); replies are 20-90 tokens. Rows go to
micro-batches grouped by length, as the trainer's length_grouped_minibatches does. The script
checks that both updates give the same parameters, then times them interleaved (compile and
warm-up excluded) and prints real tokens/s for each and the ratio trimmed/untrimmed.

    .venv/bin/python benchmarks/ppo_update.py
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in forward.py

from rlpa_jax.runtime import host_allocator  # noqa: E402

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: glibc keeps big blocks, for both frameworks alike (docs/PERF.md)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from forward import describe_times, environment_line, interleaved_times  # noqa: E402

from rlpa_jax.model.qwen2 import Qwen2Config, init_params  # noqa: E402
from rlpa_jax.rl.experience import Experience, length_grouped_minibatches, prompt_lengths, trim_padding  # noqa: E402
from rlpa_jax.rl.objectives import actor_loss_fn, response_tokens  # noqa: E402
from rlpa_jax.training.updater import Updater  # noqa: E402

PROMPT_BUCKETS = (64, 128, 192, 256, 384, 512)  # configs/tiny.yaml
PROMPT_WIDTH, RESPONSE_WIDTH = 384, 128


def iteration_batch(rounds: int, rows_per_round: int, vocab: int, seed: int) -> Experience:
    """Packed rows as pack_samples lays them out, in length-grouped order."""
    rng = np.random.default_rng(seed)
    prompts = np.concatenate([rng.integers(50 + 80 * r, 90 + 80 * r, rows_per_round) for r in range(rounds)])
    replies = rng.integers(20, 90, len(prompts))
    rows = len(prompts)
    tokens = np.zeros((rows, PROMPT_WIDTH + RESPONSE_WIDTH), np.int32)
    attention = np.zeros(tokens.shape, bool)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        tokens[i, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = rng.integers(1, vocab, p + r)
        attention[i, PROMPT_WIDTH - p:PROMPT_WIDTH + r] = True
    response_mask = attention[:, PROMPT_WIDTH:].copy()
    batch = Experience(
        tokens=tokens, attention_mask=attention, response_mask=response_mask,
        old_logprobs=rng.normal(-3, 0.5, response_mask.shape).astype(np.float32) * response_mask,
        advantages=rng.normal(size=response_mask.shape).astype(np.float32) * response_mask,
    )
    return batch.take(np.concatenate(length_grouped_minibatches(prompt_lengths(batch), rows, rng)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_layers=args.layers, num_heads=4, num_kv_heads=2)
    params = init_params(config, jax.random.key(0))
    batch = iteration_batch(4, 32, args.vocab, seed=0)
    real_tokens = int(batch.attention_mask.sum())
    print(environment_line())
    print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}; batch {batch.rows} rows x "
          f"{batch.tokens.shape[1]} columns, {real_tokens} real tokens "
          f"({real_tokens / batch.attention_mask.size:.0%} of the packed width), micro-batches of {args.micro_batch}")

    updaters = {
        "untrimmed": Updater(actor_loss_fn(config, 0.2, 0.0), optax.sgd(1e-3), args.micro_batch, response_tokens),
        "trimmed": Updater(actor_loss_fn(config, 0.2, 0.0), optax.sgd(1e-3), args.micro_batch, response_tokens,
                           trim=functools.partial(trim_padding, prompt_buckets=PROMPT_BUCKETS)),
    }

    def update(name):
        # The step donates the state it is given: start each call from a fresh copy (tiny next to the update).
        fresh = updaters[name].init(jax.tree.map(lambda x: x.copy(), params))
        return jax.block_until_ready(updaters[name](fresh, batch)[0].params)

    results = {name: update(name) for name in updaters}
    gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(results["trimmed"]), jax.tree.leaves(results["untrimmed"])))
    print(f"max parameter difference after one update: {gap:.2e}")
    if gap > 1e-5:
        print("trimmed and untrimmed updates disagree", file=sys.stderr)
        return 1

    times = interleaved_times({name: functools.partial(update, name) for name in updaters}, warmup=1,
                              repeats=args.repeats)
    for name, values in times.items():
        print(f"{name:>10}: {describe_times(values)}, {real_tokens / min(values):,.0f} real tokens/s")
    print(f"trimmed / untrimmed speed: {min(times['untrimmed']) / min(times['trimmed']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
