"""Greedy decode speed of our jitted Sampler against transformers' `generate` on the same weights.

Both sides decode a fixed number of tokens (no stop ids, so every row runs to the end) from the
same left-padded prompts. Each side is timed at `--new-tokens` N and at 1 new token; the
difference is the decode phase alone, so decode tokens/s = rows * (N - 1) / (t_N - t_1), with the
prefill and compile times left out (compile time is printed). Runs are interleaved (ours N, ours 1,
torch N, torch 1, again) and the best of each is used, since other processes only add time. The first `--check-tokens` tokens of
every row must match transformers' greedy choice, or the script exits with status 1.

Accelerator mode: `--preset qwen2.5-3b --dtype bfloat16 --skip-torch --batch 64` decodes with
random weights and compares decode tokens/s with the HBM bandwidth bound: every decode step reads
all weights plus the whole key/value cache (our decode attends over every cache slot).

    .venv/bin/python benchmarks/sampling.py
    .venv/bin/python benchmarks/sampling.py --preset qwen2.5-3b --dtype bfloat16 --skip-torch --batch 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in forward.py

from rlpa_jax.runtime import host_allocator  # noqa: E402

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: glibc keeps big blocks, for both frameworks alike (docs/PERF.md)

import forward as bench  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlpa_jax.generation.sampler import Sampler, SamplingParams, pad_prompts  # noqa: E402
from rlpa_jax.model.qwen2 import Params, Qwen2Config  # noqa: E402

PAD_ID = 0


def random_prompts(batch: int, prompt_len: int, ragged: bool, vocab: int, seed: int) -> list[list[int]]:
    """Token lists; ragged ones have lengths in [prompt_len / 2, prompt_len] so rows are left-padded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, batch) if ragged else [prompt_len] * batch
    # Token 0 is the pad id; real tokens start at 1.
    return [rng.integers(1, vocab, int(n)).tolist() for n in lengths]


def decode_rate(rows: int, new_tokens: int, full_s: float, one_token_s: float) -> float:
    """Tokens/s of the decode phase: the N-token run minus the 1-token (prefill-only) run."""
    if full_s <= one_token_s:
        return float("nan")  # timing noise swamped the decode phase; more --new-tokens or --repeats
    return rows * (new_tokens - 1) / (full_s - one_token_s)


def bandwidth_bound(config: Qwen2Config, params: Params, rows: int, slots: int, hbm_tbps: float) -> tuple[float, float]:
    """(bytes read per decode step, tokens/s if each step only had to read them at `hbm_tbps`)."""
    # All weights once: exact for tied embeddings (the table is the output head); an untied model
    # only gathers `rows` embedding rows, so this overstates its bytes by one vocab x hidden table.
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cache_bytes = 2 * config.num_layers * rows * slots * config.num_kv_heads * config.head_dim * np.dtype(config.dtype).itemsize
    step_bytes = weight_bytes + cache_bytes
    return step_bytes, rows / (step_bytes / (hbm_tbps * 1e12))


def our_generate(sampler: Sampler, params: Params, tokens: np.ndarray, mask: np.ndarray, new_tokens: int):
    """A call that runs our greedy sampler to completion and returns its tokens (rows, new_tokens)."""
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    key = jax.random.key(0)
    return lambda: np.asarray(jax.block_until_ready(sampler(params, tokens, mask, key, sampling)).tokens)


def torch_generate(model, tokens: np.ndarray, mask: np.ndarray, new_tokens: int):
    """The same for transformers' greedy `generate` (no eos, so every row runs `new_tokens` steps)."""
    import torch

    input_ids = torch.from_numpy(tokens.astype(np.int64))
    attention_mask = torch.from_numpy(mask.astype(np.int64))

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
        return out[:, tokens.shape[1]:].numpy()

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64, help="padded prompt length (the longest prompt)")
    parser.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True,
                        help="prompt lengths between prompt-len/2 and prompt-len (left padding)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs after the first (compile) run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each call, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--check-tokens", type=int, default=8, help="leading generated tokens that must match torch")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for the bound (3.35: H100 SXM)")
    args = parser.parse_args(argv)
    bench.check_torch_dtype(args)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: decode speed is the N-token run minus the 1-token run")

    slots = args.prompt_len + args.new_tokens
    config = bench.model_config(args, slots)
    if args.skip_torch:
        params, torch_model = bench.random_params(config, args.seed), None
    else:
        torch_model, params = bench.matched_models(config, args.seed)
    params = bench.cast_params(params, args.param_dtype)
    prompts = random_prompts(args.batch, args.prompt_len, args.ragged, config.vocab_size, args.seed)
    tokens, mask = pad_prompts(prompts, PAD_ID, length_buckets=(args.prompt_len,))
    rows = tokens.shape[0]

    print(bench.environment_line())
    print(bench.config_line(config, params))
    print(f"input: batch {rows}, prompts padded to {args.prompt_len} (real lengths {min(map(len, prompts))}-"
          f"{max(map(len, prompts))}), {args.new_tokens} new tokens, greedy, no stop ids")

    sampler = Sampler(config, stop_ids=(), pad_id=PAD_ID)
    calls = {("ours", args.new_tokens): our_generate(sampler, params, tokens, mask, args.new_tokens),
             ("ours", 1): our_generate(sampler, params, tokens, mask, 1)}
    if torch_model is not None:
        import torch

        torch.set_num_threads(args.threads)
        calls[("torch", args.new_tokens)] = torch_generate(torch_model, tokens, mask, args.new_tokens)
        calls[("torch", 1)] = torch_generate(torch_model, tokens, mask, 1)
    first_s = {name: bench.timed(call) for name, call in calls.items()}
    times = bench.interleaved_times(calls, args.warmup, args.repeats)

    rates = {}
    for side in dict.fromkeys(name for name, _ in calls):
        full, one = times[(side, args.new_tokens)], times[(side, 1)]
        # Best runs: other processes only ever add time.
        rates[side] = decode_rate(rows, args.new_tokens, min(full), min(one))
        extra = f" ({sampler.compile_count} programs compiled)" if side == "ours" else f" ({torch.get_num_threads()} threads)"
        print(f"{side:5s}: first run {first_s[(side, args.new_tokens)]:.2f} s ({args.new_tokens} tokens), "
              f"{first_s[(side, 1)]:.2f} s (1 token){extra}; {args.new_tokens} tokens: {bench.describe_times(full)}; "
              f"1 token: {bench.describe_times(one)}")
        print(f"{side:5s}: decode {rates[side]:,.0f} tokens/s; end to end (prefill included) "
              f"{rows * args.new_tokens / min(full):,.0f} generated tokens/s")

    status = 0
    if torch_model is not None:
        our_tokens, torch_tokens = calls[("ours", args.new_tokens)](), calls[("torch", args.new_tokens)]()
        check = min(args.check_tokens, args.new_tokens)
        matching_rows = int((our_tokens[:, :check] == torch_tokens[:, :check]).all(axis=1).sum())
        same_all = int((our_tokens == torch_tokens).all(axis=1).sum())
        print(f"first {check} tokens identical in {matching_rows}/{rows} rows "
              f"(all {args.new_tokens} tokens in {same_all}/{rows})")
        print(f"ratio ours/torch (decode tokens/s): {rates['ours'] / rates['torch']:.2f}x")
        if matching_rows != rows:
            print("FAIL: greedy tokens differ from transformers; the speed comparison is not of the same computation")
            status = 1
    else:
        step_bytes, bound_rate = bandwidth_bound(config, params, rows, slots, args.hbm_tbps)
        print(f"bandwidth bound: {step_bytes / 1e9:.2f} GB read per decode step (weights as stored + full KV cache "
              f"of {slots} slots) at {args.hbm_tbps:g} TB/s -> {bound_rate:,.0f} tokens/s; "
              f"achieved {rates['ours'] / bound_rate:.1%} of the bound")
    return status


if __name__ == "__main__":
    sys.exit(main())
