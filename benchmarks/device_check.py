"""One GPU, one script: what a Qwen2.5-3B-shaped policy does on it, measured, in one JSON and one table.

On the first local device (an H100 or H200 in ~5-8 minutes, most of it compiling), with random
weights of the real Qwen2.5-3B shape (benchmarks/configs/qwen2.5-3b/config.json: 36 layers,
hidden 2048, MLP 11008, 16 query and 2 key/value heads of 128, vocabulary 151936, tied
embeddings), bfloat16 compute and float32 masters, as the trainer and sampler run them:

- weight sync: SamplingLayout's copy of the float32 masters (bfloat16, per layer), seconds;
- prefill: the sampler's prefill (per-layer weights, into an empty cache, last position's logits)
  with attention by XLA and by `model.attention=auto` (cuDNN's fused kernel where it can run),
  tokens/s and MFU;
- decode: sampler.decode alone on a prefilled cache (every new token after the first, no stop
  token) per batch size, tokens/s against the HBM bound (the bytes one decode step reads: the
  bfloat16 weights and every cache slot of every row, over the HBM bandwidth);
- actor update: one micro-batch gradient step of the PPO actor loss (training/updater.py's
  accumulate program; model.remat=full), attention by XLA and by auto, tokens/s and MFU;
- memory: for every program above, the start-up memory check's arithmetic (compiled
  memory_analysis() without XLA:CPU's upcasts, plus the arrays live beside it), the largest as the
  predicted peak, against `jax.devices()[0].memory_stats()['peak_bytes_in_use']` (None where the
  backend keeps no statistics, e.g. CPU).

MFU = model FLOPs (2 per multiply-add: the matmuls of every token, attention over the keys a
causal query sees, the output head where it runs; x3 for forward + backward, remat's recompute
not counted) / seconds / peak. Peaks by device kind: H100 SXM 989 TFLOP/s dense bf16 and 3.35
TB/s, H100 PCIe 756 and 2.0, H200 989 and 4.8 (vendor datasheets); `--peak-tflops` and
`--hbm-tbps` override, and an unknown device leaves MFU and the HBM bound None. Each timing is the
fastest of `--repeats` runs after a warm-up run (which compiles).

    PYTHONPATH=. python benchmarks/device_check.py --out $OUT              # a lent GPU, <= 8 min
    PYTHONPATH=. python benchmarks/device_check.py --shape tiny --out /tmp/dc   # CPU, ~20 s

Output (in --out): device_check.json and device_check.md. The JSON:

    {"device": {"kind", "platform", "jax_version", "peak_tflops", "hbm_tbps", "peaks_from"},
     "shape": "3b" | "tiny", "model": {"layers", "hidden", "heads", "kv_heads", "head_dim", "vocab",
     "parameters", "compute_dtype"},
     "attention": {"auto": implementation auto picks here ("cudnn" | "xla" | "cpu"), "reason"},
     "weight_sync": {"seconds", "copy_bytes"},
     "prefill": [{"attention", "implementation", "batch", "prompt_tokens", "tokens", "seconds",
                  "tokens_per_s", "mfu"}],
     "decode": [{"batch", "prompt_tokens", "new_tokens", "seconds", "tokens_per_s",
                 "hbm_bound_tokens_per_s", "fraction_of_bound"}],
     "update": [{"attention", "implementation", "rows", "sequence_tokens", "response_tokens",
                 "tokens", "seconds", "tokens_per_s", "mfu"}],
     "memory": {"programs": [{"name", "program_bytes", "resident_bytes", "predicted_bytes"}],
                "predicted_peak_bytes", "peak_bytes_in_use", "bytes_limit", "measured_over_predicted"},
     "skipped": [sections left out by --time-budget-s], "errors": {section: the exception, where
     one failed; the others still ran}, "elapsed_s"}

Values a backend cannot give (MFU without a peak, memory statistics on CPU) are null. The
markdown holds the same numbers: a throughput table with the columns
`| section | attention | batch | tokens | seconds | tokens/s | MFU | HBM bound tokens/s | of bound |`
and a memory table `| program | program (MB) | beside it (MB) | predicted (MB) |` followed by the
measured peak, and a line per skipped or failed section.

Sections run in this order: weight sync, prefill (auto), decode per batch size, prefill (xla),
actor update (auto), actor update (xla); the files are rewritten after each, so a run stopped by
a time limit leaves what it measured, and a section that raises is recorded under "errors" while
the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlpa_jax.config.tree import MeshConfig  # noqa: E402
from rlpa_jax.generation.layout import SamplingLayout  # noqa: E402
from rlpa_jax.generation.sampler import SamplingParams, decode, empty_cache  # noqa: E402
from rlpa_jax.model.attention import attention_implementation, current_platform  # noqa: E402
from rlpa_jax.model.hf import load_config  # noqa: E402
from rlpa_jax.model.qwen2 import Qwen2Config, forward, init_params, positions_from_mask  # noqa: E402
from rlpa_jax.rl.experience import Experience  # noqa: E402
from rlpa_jax.rl.objectives import actor_loss_fn, response_tokens  # noqa: E402
from rlpa_jax.runtime import parallel  # noqa: E402
from rlpa_jax.runtime.compiled_cost import program_cost  # noqa: E402
from rlpa_jax.training.updater import Trainable, Updater  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QWEN_3B = REPO / "benchmarks" / "configs" / "qwen2.5-3b"

# device_kind substring -> (dense bf16 TFLOP/s, HBM TB/s); the first match wins (PCIe before SXM).
PEAKS = (("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35), ("H200", 989.0, 4.8))

THROUGHPUT_COLUMNS = ("section", "attention", "batch", "tokens", "seconds", "tokens/s", "MFU",
                      "HBM bound tokens/s", "of bound")
MEMORY_COLUMNS = ("program", "program (MB)", "beside it (MB)", "predicted (MB)")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and the workload sizes one run measures."""

    config: Qwen2Config
    prefill_batch: int
    prompt_tokens: int
    decode_batches: tuple[int, ...]
    new_tokens: int
    update_rows: int
    update_tokens: int  # sequence width of an update row (prompt + response)
    response_tokens: int
    repeats: int


def shape_of(name: str) -> Shape:
    if name == "3b":
        config = load_config(QWEN_3B, compute_dtype="bfloat16", remat="full")
        return Shape(config, prefill_batch=8, prompt_tokens=2048, decode_batches=(1, 16, 64), new_tokens=128,
                     update_rows=4, update_tokens=2048, response_tokens=512, repeats=3)
    if name == "tiny":
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, tie_word_embeddings=True, compute_dtype="bfloat16", remat="full")
        return Shape(config, prefill_batch=2, prompt_tokens=32, decode_batches=(2,), new_tokens=8,
                     update_rows=2, update_tokens=48, response_tokens=16, repeats=2)
    raise ValueError(f"--shape {name!r}: expected 3b or tiny")


def peaks_for(kind: str, peak_tflops: float | None, hbm_tbps: float | None) -> tuple[float | None, float | None, str]:
    """(TFLOP/s, TB/s, where they came from) for a device kind, the flags winning over the table."""
    table = next(((flops, hbm) for name, flops, hbm in PEAKS if name.lower() in kind.lower()), (None, None))
    source = "flags" if peak_tflops or hbm_tbps else ("table" if table[0] else "unknown device")
    return peak_tflops or table[0], hbm_tbps or table[1], source


def model_flops(config: Qwen2Config, tokens: int, mean_context: float, head_tokens: int) -> float:
    """Forward FLOPs: every token through every layer's matmuls and attention over `mean_context`
    keys, and the output head on `head_tokens` positions (2 FLOPs per multiply-add)."""
    e, m, d = config.hidden_size, config.intermediate_size, config.head_dim
    projections = 2 * e * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 2 * 3 * e * m
    attention = 2 * 2 * config.num_heads * d * mean_context
    return tokens * config.num_layers * (projections + mlp + attention) + head_tokens * 2 * e * config.vocab_size


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def live_bytes_beside(arguments) -> int:
    """Bytes of the device arrays alive now that are not among `arguments` (what stays resident
    beside a program while it runs)."""
    argument_ids = {id(x) for x in jax.tree.leaves(arguments)}
    return sum(x.nbytes for x in jax.live_arrays() if id(x) not in argument_ids and not x.is_deleted())


def fastest(run, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs of `run()` (its result blocked on)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return min(times)


class DeviceCheck:
    """Runs the sections in order, keeping the results and the memory bookkeeping."""

    def __init__(self, shape: Shape, peak_tflops: float | None, hbm_tbps: float | None):
        self.shape, self.config = shape, shape.config
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.hbm_bytes_per_s = hbm_tbps * 1e12 if hbm_tbps else None
        self.mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
        self.memory: list[dict] = []
        self._prefills: dict[tuple[str, int], tuple] = {}  # (attention, batch) -> compiled prefill and inputs

    def compiled(self, name: str, function, *arguments):
        """jit(function) compiled for `arguments`, and its entry in the memory bookkeeping."""
        executable = jax.jit(function).lower(*arguments).compile()
        self.record(program_cost(name, executable), live_bytes_beside(arguments))
        return executable

    def record(self, cost, resident_bytes: int) -> None:
        """A program's entry in the memory check: its compiled size (without XLA:CPU's upcasts) plus
        what stays resident beside it, as rl/memory_check.py adds them."""
        self.memory.append({"name": cost.name, "program_bytes": cost.accelerator_memory_bytes,
                            "resident_bytes": resident_bytes,
                            "predicted_bytes": cost.accelerator_memory_bytes + resident_bytes})

    def mfu(self, flops: float, seconds: float) -> float | None:
        return None if self.peak_flops is None else flops / seconds / self.peak_flops

    def masters(self):
        shardings = parallel.param_shardings(self.config, self.mesh)
        return jax.jit(lambda key: init_params(self.config, key), out_shardings=shardings)(jax.random.key(0))

    def weight_sync(self, masters):
        layout = SamplingLayout(self.config, self.mesh)
        copy = jax.block_until_ready(layout(masters))  # compiles the sync's programs
        for program in layout.lower_sync(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                      sharding=x.sharding), masters)):
            cost = program_cost(f"weight sync ({program.name})", program.lowered.compile())
            # Beside a sync program: the masters it does not read, and the copy but its own part.
            resident = (tree_bytes(masters) - tree_bytes(program.arguments)
                        + tree_bytes(copy) - tree_bytes(program.outputs))
            self.record(cost, resident)
        del copy
        seconds = fastest(lambda: layout(masters), self.shape.repeats)
        result = layout(masters)
        return {"seconds": seconds, "copy_bytes": tree_bytes(result)}, result

    def prompts(self, batch: int):
        s = self.shape
        rng = np.random.default_rng(batch)
        tokens = rng.integers(1, self.config.vocab_size, (batch, s.prompt_tokens)).astype(np.int32)
        return jnp.asarray(tokens), jnp.ones((batch, s.prompt_tokens), bool)

    def prefill_program(self, copy, attention: str, batch: int):
        """The sampler's prefill (generate's first half) for `batch` prompts, compiled (once), and its inputs."""
        if (attention, batch) not in self._prefills:
            self._prefills[attention, batch] = self._compile_prefill(copy, attention, batch)
        return self._prefills[attention, batch]

    def drop_prefills(self) -> None:
        """Forget the compiled prefills (and the inputs they keep alive)."""
        self._prefills.clear()

    def _compile_prefill(self, copy, attention: str, batch: int):
        s, config = self.shape, self.config.replace(attention=attention)
        slots = s.prompt_tokens + s.new_tokens

        def run(params, tokens, mask):
            key_mask = jnp.zeros((tokens.shape[0], slots), bool).at[:, :s.prompt_tokens].set(mask)
            cache = empty_cache(params, config, tokens.shape[0], slots)
            logits, cache = forward(params, config, tokens, key_mask, positions_from_mask(mask), cache=cache,
                                    cache_index=0, last_only=True)
            return logits[:, -1], cache, key_mask

        tokens, mask = self.prompts(batch)
        return self.compiled(f"prefill ({attention}, batch {batch})", run, copy, tokens, mask), tokens, mask

    def prefill(self, copy, attention: str):
        s = self.shape
        executable, tokens, mask = self.prefill_program(copy, attention, s.prefill_batch)
        jax.block_until_ready(executable(copy, tokens, mask))
        seconds = fastest(lambda: executable(copy, tokens, mask), s.repeats)
        count = s.prefill_batch * s.prompt_tokens
        flops = model_flops(self.config, count, (s.prompt_tokens + 1) / 2, s.prefill_batch)
        return {"attention": attention, "implementation": self.implementation(attention), "batch": s.prefill_batch,
                "prompt_tokens": s.prompt_tokens, "tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
                "mfu": self.mfu(flops, seconds)}

    def decode(self, copy, batch: int, prefill_attention: str = "auto"):
        """sampler.decode alone (every new token after the first, no stop token) on a cache prefilled
        with `prefill_attention`."""
        s, config = self.shape, self.config
        prefill, tokens, mask = self.prefill_program(copy, prefill_attention, batch)
        last_logits, cache, key_mask = prefill(copy, tokens, mask)
        sampling = SamplingParams(max_new_tokens=s.new_tokens, temperature=1.0)
        next_position = jnp.full((batch,), s.prompt_tokens, jnp.int32)
        key = jax.random.key(1)

        def run(params, cache, key_mask, last_logits, next_position, key):
            return decode(params, config, cache, key_mask, last_logits, next_position, key, sampling, (), 0)

        arguments = (copy, cache, key_mask, last_logits, next_position, key)
        executable = self.compiled(f"decode (batch {batch})", run, *arguments)
        jax.block_until_ready(executable(*arguments))
        seconds = fastest(lambda: executable(*arguments), s.repeats)
        steps = s.new_tokens - 1  # the first new token comes from the prefill's logits
        count = batch * steps
        # What one step reads from HBM: the bfloat16 weights, and every slot of every row's cache
        # (single_query_attention reads the whole cache, masked).
        cache_bytes = (batch * (s.prompt_tokens + s.new_tokens) * config.num_layers * 2 * config.num_kv_heads
                       * config.head_dim * jnp.dtype(config.dtype).itemsize)
        bound = None
        if self.hbm_bytes_per_s:
            bound = batch / ((tree_bytes(copy) + cache_bytes) / self.hbm_bytes_per_s)
        return {"batch": batch, "prompt_tokens": s.prompt_tokens, "new_tokens": steps, "seconds": seconds,
                "tokens_per_s": count / seconds, "hbm_bound_tokens_per_s": bound,
                "fraction_of_bound": None if bound is None else count / seconds / bound}

    def update(self, masters, attention: str):
        s, config = self.shape, self.config.replace(attention=attention)
        updater = Updater(actor_loss_fn(config, 0.2, 0.0), optax.sgd(1e-3), s.update_rows, response_tokens,
                          mesh=self.mesh, param_shardings=parallel.param_shardings(config, self.mesh))
        rng = np.random.default_rng(2)
        tokens = rng.integers(1, config.vocab_size, (s.update_rows, s.update_tokens)).astype(np.int32)
        response = np.ones((s.update_rows, s.response_tokens), bool)
        micro = Experience(tokens=tokens, attention_mask=np.ones(tokens.shape, bool), response_mask=response,
                           old_logprobs=rng.normal(-3, 0.5, response.shape).astype(np.float32),
                           advantages=rng.normal(size=response.shape).astype(np.float32))
        micro = jax.tree.map(lambda v: jax.device_put(v, parallel.batch_sharding(self.mesh, np.ndim(v))), micro)
        trainable = Trainable(masters, optax.sgd(1e-3).init(masters))
        lowered, _ = updater.lower(trainable, micro)
        executable = lowered.compile()
        grads = jax.tree.map(jnp.zeros_like, masters)
        terms = updater._zero_terms
        units = np.float32(s.update_rows * s.response_tokens)
        self.record(program_cost(f"actor micro-batch step ({attention})", executable),
                    live_bytes_beside((masters, grads, micro)))

        def step():
            nonlocal grads
            grads, _ = executable(masters, grads, terms, micro, units)  # the running sum is donated
            return grads

        jax.block_until_ready(step())
        seconds = fastest(step, s.repeats)
        del grads
        count = s.update_rows * s.update_tokens
        flops = 3 * model_flops(self.config, count, (s.update_tokens + 1) / 2, s.update_rows * s.response_tokens)
        return {"attention": attention, "implementation": self.implementation(attention), "rows": s.update_rows,
                "sequence_tokens": s.update_tokens, "response_tokens": s.response_tokens, "tokens": count,
                "seconds": seconds, "tokens_per_s": count / seconds, "mfu": self.mfu(flops, seconds)}

    def implementation(self, attention: str) -> str:
        platform, capability = current_platform()
        return attention_implementation(attention, platform, jnp.dtype(self.config.dtype).name,
                                        self.config.head_dim, capability).implementation


def memory_stats() -> dict:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None
        stats = None
    return stats or {}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(result: dict) -> str:
    device, model = result["device"], result["model"]
    lines = [f"# Device check: {device['kind']} ({device['platform']}, jax {device['jax_version']})", "",
             f"Shape {result['shape']}: {model['layers']} layers, hidden {model['hidden']}, "
             f"{model['parameters'] / 1e6:,.1f}M parameters, {model['compute_dtype']}; peaks {fmt(device['peak_tflops'])} TFLOP/s, "
             f"{fmt(device['hbm_tbps'])} TB/s ({device['peaks_from']}); attention auto = "
             f"{result['attention']['auto']} ({result['attention']['reason']}).", "",
             "| " + " | ".join(THROUGHPUT_COLUMNS) + " |", "|" + "---|" * len(THROUGHPUT_COLUMNS)]
    sync = result.get("weight_sync")
    if sync:
        lines.append(f"| weight sync | - | - | - | {fmt(sync['seconds'])} | - | - | - | - |")
    for row in result.get("prefill", []):
        lines.append(f"| prefill | {row['attention']} ({row['implementation']}) | {row['batch']} | {row['tokens']} | "
                     f"{fmt(row['seconds'])} | {fmt(row['tokens_per_s'])} | {fmt(row['mfu'])} | - | - |")
    for row in result.get("decode", []):
        lines.append(f"| decode | auto | {row['batch']} | {row['batch'] * row['new_tokens']} | {fmt(row['seconds'])} | "
                     f"{fmt(row['tokens_per_s'])} | - | {fmt(row['hbm_bound_tokens_per_s'])} | "
                     f"{fmt(row['fraction_of_bound'])} |")
    for row in result.get("update", []):
        lines.append(f"| actor update | {row['attention']} ({row['implementation']}) | {row['rows']} | "
                     f"{row['tokens']} | {fmt(row['seconds'])} | {fmt(row['tokens_per_s'])} | {fmt(row['mfu'])} | - | - |")
    memory = result.get("memory")
    if memory:
        lines += ["", "| " + " | ".join(MEMORY_COLUMNS) + " |", "|" + "---|" * len(MEMORY_COLUMNS)]
        for row in memory["programs"]:
            lines.append(f"| {row['name']} | {row['program_bytes'] / 1e6:,.1f} | {row['resident_bytes'] / 1e6:,.1f} | "
                         f"{row['predicted_bytes'] / 1e6:,.1f} |")
        measured = memory["peak_bytes_in_use"]
        lines += ["", f"Predicted peak {memory['predicted_peak_bytes'] / 1e6:,.1f} MB; measured peak_bytes_in_use "
                      f"{'-' if measured is None else f'{measured / 1e6:,.1f} MB'} (measured / predicted "
                      f"{fmt(memory['measured_over_predicted'])})."]
    if result.get("skipped"):
        lines += ["", f"Skipped (time budget): {', '.join(result['skipped'])}."]
    for name, error in result.get("errors", {}).items():
        lines += ["", f"Failed: {name}: {error.splitlines()[0] if error else ''}"]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "device_check.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for device_check.json and device_check.md")
    parser.add_argument("--shape", choices=("3b", "tiny"), default="3b")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth of the device, TB/s")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (fastest kept)")
    parser.add_argument("--time-budget-s", type=float, default=360.0,
                        help="sections not started by then are skipped (and listed)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    shape = shape_of(args.shape)
    if args.repeats:
        shape = dataclasses.replace(shape, repeats=args.repeats)
    device = jax.devices()[0]
    peak_tflops, hbm_tbps, peaks_from = peaks_for(device.device_kind, args.peak_tflops, args.hbm_tbps)
    check = DeviceCheck(shape, peak_tflops, hbm_tbps)
    config = shape.config
    platform, capability = current_platform()
    auto = attention_implementation("auto", platform, jnp.dtype(config.dtype).name, config.head_dim, capability)
    result = {
        "device": {"kind": device.device_kind, "platform": platform, "jax_version": jax.__version__,
                   "peak_tflops": peak_tflops, "hbm_tbps": hbm_tbps, "peaks_from": peaks_from},
        "shape": args.shape,
        "model": {"layers": config.num_layers, "hidden": config.hidden_size, "heads": config.num_heads,
                  "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab": config.vocab_size,
                  "parameters": config.num_params(), "compute_dtype": config.compute_dtype},
        "attention": {"auto": auto.implementation, "reason": auto.reason},
        "weight_sync": None, "prefill": [], "decode": [], "update": [], "memory": None, "skipped": [],
        "errors": {}, "elapsed_s": None,
    }

    def finish_memory() -> None:
        stats = memory_stats()
        predicted = max((row["predicted_bytes"] for row in check.memory), default=0)
        measured = stats.get("peak_bytes_in_use")
        result["memory"] = {"programs": check.memory, "predicted_peak_bytes": predicted,
                            "peak_bytes_in_use": measured, "bytes_limit": stats.get("bytes_limit"),
                            "measured_over_predicted": measured / predicted if measured and predicted else None}
        result["elapsed_s"] = time.perf_counter() - start
        write(result, out)

    def section(name: str, run) -> None:
        """Runs one measurement unless the time budget is spent; a failure is recorded, not fatal
        (one lent GPU run should bring back everything that worked)."""
        if time.perf_counter() - start >= args.time_budget_s:
            result["skipped"].append(name)
            return
        try:
            run()
        except Exception as error:  # noqa: BLE001 - reported in the JSON, the other sections go on
            result["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
        finish_memory()

    masters = check.masters()
    state = {}

    def sync():
        result["weight_sync"], state["copy"] = check.weight_sync(masters)

    section("weight sync", sync)
    # The cuDNN-or-XLA choice (auto) first, the XLA comparison after the decode batches.
    section("prefill (auto)", lambda: result["prefill"].append(check.prefill(state["copy"], "auto")))
    # The decode's own kernel is the same either way; its prefill falls back to XLA if auto's failed.
    prefill_attention = "xla" if "prefill (auto)" in result["errors"] else "auto"
    for batch in shape.decode_batches:
        section(f"decode (batch {batch})",
                lambda batch=batch: result["decode"].append(check.decode(state["copy"], batch, prefill_attention)))
    section("prefill (xla)", lambda: result["prefill"].append(check.prefill(state["copy"], "xla")))
    state.clear()  # the rollout drops its copy before the update
    check.drop_prefills()
    section("actor update (auto)", lambda: result["update"].append(check.update(masters, "auto")))
    section("actor update (xla)", lambda: result["update"].append(check.update(masters, "xla")))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
