"""Prefill speed of our jitted Qwen2 forward against transformers' PyTorch Qwen2 on the same weights.

Default mode (CPU): one random transformers Qwen2ForCausalLM (float32) is saved to a temporary
directory and loaded into our params with `hf.load_params`, so both frameworks run identical
weights. The script checks that the logits agree, prints compile / warm-up times (excluded from the
speed numbers), times `--repeats` full forwards of each (interleaved, so load from other processes
hits both alike), and prints tokens/s of the best run for each and the ratio ours/torch.

Accelerator mode: `--preset qwen2.5-3b --dtype bfloat16 --skip-torch` builds the real Qwen2.5-3B
shape with random weights (`init_params`) and reports prefill tokens/s and MFU, the model FLOP/s
(`qwen2.flops_per_token`) over `--peak-tflops`.

    .venv/bin/python benchmarks/forward.py
    .venv/bin/python benchmarks/forward.py --preset qwen2.5-3b --dtype bfloat16 --skip-torch --batch 16 --seq 1024

The model-building and timing helpers here are shared with benchmarks/sampling.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from rlpa_jax.runtime import host_allocator  # noqa: E402

if __name__ == "__main__":
    host_allocator.ensure()  # CPU only: glibc keeps big blocks, for both frameworks alike (docs/PERF.md)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlpa_jax.model import hf  # noqa: E402
from rlpa_jax.model.qwen2 import Params, Qwen2Config, flops_per_token, forward, init_params  # noqa: E402

# Shapes of real checkpoints (from their config.json), selectable with --preset.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-3b": dict(vocab=151936, hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2,
                       tied=True, rope_theta=1_000_000.0),
}
# A small-but-not-tiny default: big enough that matmuls, not Python overhead, dominate on a CPU.
DEFAULT_SHAPE: dict[str, Any] = dict(vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2,
                                     tied=True, rope_theta=1_000_000.0)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model shape and numerics flags shared by the forward and sampling benchmarks."""
    group = parser.add_argument_group("model (defaults: the small CPU shape, or the preset's)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="a real checkpoint's shape (random weights)")
    group.add_argument("--vocab", type=int)
    group.add_argument("--hidden", type=int)
    group.add_argument("--intermediate", type=int)
    group.add_argument("--layers", type=int)
    group.add_argument("--heads", type=int)
    group.add_argument("--kv-heads", type=int)
    group.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="tie the output head to the embedding")
    group.add_argument("--rope-theta", type=float)
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    group.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype our parameters are stored in (the project keeps float32 masters)")
    group.add_argument("--skip-torch", action="store_true", help="time our model only (random init, no transformers)")
    group.add_argument("--seed", type=int, default=0)


def model_config(args: argparse.Namespace, max_positions: int) -> Qwen2Config:
    """The preset's (or the default) shape with any flags given on the command line applied."""
    shape = dict(PRESETS[args.preset] if args.preset else DEFAULT_SHAPE)
    for name in shape:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    return Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
        tie_word_embeddings=shape["tied"], rope_theta=shape["rope_theta"],
        max_position_embeddings=max(32768, max_positions), compute_dtype=args.dtype,
    )


def check_torch_dtype(args: argparse.Namespace) -> None:
    # The reference runs in float32 on CPU; comparing it with a bfloat16 run would time different work.
    if not args.skip_torch and (args.dtype != "float32" or args.param_dtype != "float32"):
        sys.exit("benchmarks: the transformers comparison runs float32 only; add --skip-torch for bfloat16")


def matched_models(config: Qwen2Config, seed: int):
    """(transformers model in eval mode, our params) holding the same random float32 weights."""
    import torch
    import transformers

    settings = {k: v for k, v in hf.config_to_hf(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).eval()
    # Non-zero biases and norm weights (as in tests/hf_reference.py), so every tensor matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    transformers.utils.logging.disable_progress_bar()  # keep the benchmark's printout readable
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        params, _ = hf.load_params(directory, config)
    return model, params


def random_params(config: Qwen2Config, seed: int) -> Params:
    return jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))


def cast_params(params: Params, dtype: str) -> Params:
    # Skip same-dtype casts: at 3B parameters a needless copy is 12 GB of accelerator memory.
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)


def timed(call: Callable[[], Any]) -> float:
    """Seconds for one call; `call` must block until its result is ready."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_times(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each named call, run round-robin so load from other processes hits all alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
    return times


def describe_times(times: list[float]) -> str:
    return f"best {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms of {len(times)}"


def environment_line() -> str:
    device = jax.devices()[0]
    return (f"{datetime.date.today()} | {platform.machine()} {os.cpu_count()} cores | jax {jax.__version__} "
            f"on {device.platform}:{device.device_kind} | python {platform.python_version()}")


def config_line(config: Qwen2Config, params: Params) -> str:
    count = sum(x.size for x in jax.tree.leaves(params))
    return (f"model: vocab {config.vocab_size}, hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
            f"layers {config.num_layers}, heads {config.num_heads}/{config.num_kv_heads} kv, "
            f"tied {config.tie_word_embeddings}, compute {config.compute_dtype}, "
            f"params {count / 1e6:.1f}M stored as {jax.tree.leaves(params)[0].dtype}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after the compile run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--peak-tflops", type=float, default=800.0,
                        help="accelerator peak for MFU (800: an H100 SXM bf16 dense estimate)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted |logits difference|")
    args = parser.parse_args(argv)
    check_torch_dtype(args)

    config = model_config(args, args.seq)
    if args.skip_torch:
        params, torch_model = random_params(config, args.seed), None
    else:
        torch_model, params = matched_models(config, args.seed)
    params = cast_params(params, args.param_dtype)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq), dtype=np.int32)
    tokens_per_call = args.batch * args.seq

    print(environment_line())
    print(config_line(config, params))
    print(f"input: batch {args.batch} x seq {args.seq} = {tokens_per_call} tokens per forward, no padding")

    ours = jax.jit(lambda p, t: forward(p, config, t)[0])
    device_tokens = jnp.asarray(tokens)
    calls = {"ours": lambda: ours(params, device_tokens).block_until_ready()}
    if torch_model is not None:
        import torch

        torch.set_num_threads(args.threads)
        torch_tokens = torch.from_numpy(tokens.astype(np.int64))

        def torch_forward():
            with torch.inference_mode():
                return torch_model(torch_tokens).logits

        calls["torch"] = torch_forward
    first_s = {name: timed(call) for name, call in calls.items()}
    times = interleaved_times(calls, args.warmup, args.repeats)
    # Other processes only ever add time, so the best run is the least disturbed estimate.
    rates = {name: tokens_per_call / min(run_times) for name, run_times in times.items()}
    print(f"ours : first call (compile + run) {first_s['ours']:.2f} s; {describe_times(times['ours'])}; "
          f"{rates['ours']:,.0f} tokens/s")

    status = 0
    if torch_model is not None:
        print(f"torch: first call {first_s['torch']:.2f} s ({torch.get_num_threads()} threads); "
              f"{describe_times(times['torch'])}; {rates['torch']:,.0f} tokens/s")
        difference = float(np.max(np.abs(np.asarray(ours(params, device_tokens)) - torch_forward().numpy())))
        print(f"logits max |ours - torch| = {difference:.2e} (tolerance {args.tolerance:g})")
        print(f"ratio ours/torch (best-run tokens/s): {rates['ours'] / rates['torch']:.2f}x")
        if not difference <= args.tolerance:
            print("FAIL: logits disagree; the speed comparison is not of the same computation")
            status = 1
    else:
        flops = flops_per_token(config, args.seq) * tokens_per_call
        achieved_tflops = flops / min(times["ours"]) / 1e12
        print(f"model FLOPs per forward {flops / 1e12:.2f} T (attention over the full {args.seq}-token context); "
              f"achieved {achieved_tflops:.1f} TFLOP/s; MFU {achieved_tflops / args.peak_tflops:.1%} "
              f"of {args.peak_tflops:g} TFLOP/s")
    return status


if __name__ == "__main__":
    sys.exit(main())
