"""What one PPO iteration of the paper's workload would cost on 8 GPUs, read from compiled programs.

Nothing runs and no weight is allocated: every device program of an iteration (the sampler under
each parameter layout, the scoring forward, the actor's and critic's micro-batch gradient step,
the optimizer step) is compiled for a real Qwen2.5 shape on 8 fake CPU devices, with
`jax.ShapeDtypeStruct` arguments that carry the trainer's shardings. rlpa_jax.runtime.compiled_cost reads
each compiled program: per-device memory, matmul FLOPs and the collectives in the optimized HLO
(per decode step for the sampler's loop). A roofline turns those into seconds on 8x H100 / H200:

    time = max(FLOPs / peak, HBM bytes / HBM bandwidth, collectives x latency + wire bytes / link bandwidth)

per device. A decode step reads the device's parameters, what the step all-gathers and the
device's KV cache from HBM; prefill, scoring and update micro-batches are taken as compute bound
(no HBM term). Wire bytes are the collective's bytes x (n-1)/n for all-gather, reduce-scatter and
all-to-all and x 2(n-1)/n for all-reduce (ring algorithms, n = 8). The rollout is every sampler
call decoding all max_new_tokens; the iteration adds the three scoring forwards per row and the
actor's and critic's updates, one after another (no overlap). Real programs reach a fraction of
each peak, so the seconds are lower bounds; the ratios between layouts are the point.

    .venv/bin/python benchmarks/scale.py --models 3b        # 8 fake CPU devices; ~1 min for 3B

`--context trainer` compiles the sampler and scoring forward the way rl/trainer.py calls them
today (outside parallel.activate, so the model's logical activation constraints do nothing);
the default `activated` compiles them inside it, as the tests and the Updater run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlpa_jax.config.loading import load_config  # noqa: E402
from rlpa_jax.config.tree import TrainConfig  # noqa: E402
from rlpa_jax.generation.layout import LAYOUTS, SamplingLayout  # noqa: E402
from rlpa_jax.generation.sampler import Sampler, SamplingParams, bucket  # noqa: E402
from rlpa_jax.model.hf import load_config as load_model_config  # noqa: E402
from rlpa_jax.model.qwen2 import Qwen2Config, init_params  # noqa: E402
from rlpa_jax.rl.experience import Experience, ForwardPasses  # noqa: E402
from rlpa_jax.rl.objectives import actor_loss_fn, critic_loss_fn, response_tokens  # noqa: E402
from rlpa_jax.runtime import (
    compiled_cost,
    parallel,  # noqa: E402
)
from rlpa_jax.runtime.compiled_cost import ProgramCost  # noqa: E402
from rlpa_jax.training.optimizer import make_optimizer  # noqa: E402
from rlpa_jax.training.output_scale import with_output_scale_lr  # noqa: E402
from rlpa_jax.training.updater import Trainable, Updater  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {name: REPO / "benchmarks" / "configs" / f"qwen2.5-{name}" for name in ("0.5b", "3b", "7b")}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per GPU
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # NVLink, one direction, per GPU
    memory_bytes: float
    collective_latency_s: float = 10e-6  # a small NCCL collective over 8 NVLink GPUs, order of magnitude


# SXM parts, vendor datasheet numbers: 989 TFLOP/s dense bf16; HBM3 3.35 TB/s (H100 80 GB), HBM3e
# 4.8 TB/s (H200 141 GB); NVLink 4 900 GB/s per GPU both directions together, 450 GB/s each way.
HARDWARE = (
    Hardware("8x H100", 989e12, 3.35e12, 450e9, 80e9),
    Hardware("8x H200", 989e12, 4.8e12, 450e9, 141e9),
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One PPO iteration of a run config, in the shapes that reach the device."""

    prompts_per_call: int  # conversations / pipeline groups, padded to the mesh's row multiple
    samples_per_prompt: int
    prompt_bucket: int  # the representative prompt length the sampler is compiled for
    max_new_tokens: int
    sampler_calls: int  # turns per iteration (max_rounds, or 1 with schedule=turn) x pipeline groups
    micro_batch_rows: int
    sequence_length: int  # the longest prompt bucket + max_new_tokens (scoring and updates)
    micro_batches: int  # rows of an iteration / micro_batch_rows (each epoch)
    optimizer_steps: int
    scoring_forwards: int  # passes over the rows: actor and reference log-probs, critic values

    @property
    def rows_per_call(self) -> int:
        return self.prompts_per_call * self.samples_per_prompt


def workload_of(config: TrainConfig, prompt_bucket: int) -> Workload:
    r, p = config.rollout, config.ppo
    row_multiple = config.mesh.data * config.mesh.fsdp
    per_group = -(-r.conversations // r.pipeline_groups)
    turns = 1 if r.schedule == "turn" else r.max_rounds  # turn: the pool advances one turn per iteration
    rows = r.conversations * turns * r.samples_per_prompt  # every turn runs: an upper bound
    return Workload(
        prompts_per_call=-(-per_group // row_multiple) * row_multiple,
        samples_per_prompt=r.samples_per_prompt,
        prompt_bucket=prompt_bucket,
        max_new_tokens=r.max_new_tokens,
        sampler_calls=turns * r.pipeline_groups,
        micro_batch_rows=p.micro_batch_size,
        sequence_length=bucket(r.max_prompt_tokens, r.prompt_buckets) + r.max_new_tokens,
        micro_batches=p.epochs * -(-rows // p.micro_batch_size),
        optimizer_steps=p.epochs * -(-rows // p.train_batch_size),
        scoring_forwards=3 if p.advantage == "gae" else 2,
    )


# ---------------------------------------------------------------------------------------------
# Abstract arguments: shapes, dtypes and shardings, no memory


def abstract_tree(shapes, shardings, dtype=None):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh), shapes, shardings)


def abstract_params(config: Qwen2Config, mesh, head: str = "lm"):
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))
    return abstract_tree(shapes, parallel.param_shardings(config, mesh, head))


def sampler_params(config: Qwen2Config, mesh, layout: str):
    """What SamplingLayout hands the sampler: per-layer copies in the compute dtype, or under
    "training" the trainer's own stacked float32 FSDP parameters."""
    return SamplingLayout(config, mesh, layout).abstract(abstract_params(config, mesh))


def rows(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (its shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The iteration's programs, compiled as the trainer builds them


def compile_timed(name: str, lowered) -> tuple[ProgramCost, float]:
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return compiled_cost.program_cost(name, compiled), seconds


def sampler_program(config: Qwen2Config, mesh, layout: str, work: Workload):
    sampler = Sampler(config, stop_ids=(151645, 151643), pad_id=151643)  # Qwen2.5's <|im_end|>, <|endoftext|>
    sampling = SamplingParams(max_new_tokens=work.max_new_tokens, temperature=1.0,
                              num_samples=work.samples_per_prompt)
    shape = (work.prompts_per_call, work.prompt_bucket)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    # Sampler's own jitted generate: the program the rollout runs.
    return sampler._jitted.lower(sampler_params(config, mesh, layout), config, rows(mesh, shape, jnp.int32),
                                 rows(mesh, shape, jnp.bool_), key, sampling, sampler.stop_ids, sampler.pad_id)


def scoring_program(config: Qwen2Config, mesh, work: Workload, head: str):
    forwards = ForwardPasses(config, chunk_rows=work.micro_batch_rows)
    shape = (work.micro_batch_rows, work.sequence_length)
    jitted = forwards._logprobs if head == "lm" else forwards._values  # the trainer's jitted forwards
    return jitted.lower(abstract_params(config, mesh, head), rows(mesh, shape, jnp.int32), rows(mesh, shape, jnp.bool_),
                        work.max_new_tokens)


def update_programs(config: Qwen2Config, mesh, train: TrainConfig, work: Workload, head: str):
    """(accumulate one micro-batch's gradient, apply the optimizer) for the actor or the critic."""
    p = train.ppo
    steps = 1000  # the schedule's length changes numbers in the program, not its shape or cost
    opt = dict(b1=p.adam_b1, b2=p.adam_b2, weight_decay=p.weight_decay, grad_clip=p.grad_clip,
               warmup_ratio=p.warmup_ratio, min_lr_ratio=p.min_lr_ratio)
    if head == "lm":  # as rlpa_jax/app/build.py builds the actor's and critic's Updaters
        loss = actor_loss_fn(config, p.clip_eps, p.entropy_coef)
        optimizer = with_output_scale_lr(make_optimizer(p.actor_lr, steps, **opt), p.actor_lr, p.output_scale_lr)
        fields = ("old_logprobs", "advantages")
    else:
        loss = critic_loss_fn(config, p.value_clip_eps)
        optimizer = make_optimizer(p.critic_lr, steps, **opt)
        fields = ("old_values", "returns")
    updater = Updater(loss, optimizer, work.micro_batch_rows, response_tokens, mesh=mesh,
                      param_shardings=parallel.param_shardings(config, mesh, head))
    params = abstract_params(config, mesh, head)
    opt_state = abstract_tree(jax.eval_shape(optimizer.init, params), updater.opt_state_shardings(params))
    trainable = Trainable(params, opt_state)
    sequence, response = (work.micro_batch_rows, work.sequence_length), (work.micro_batch_rows, work.max_new_tokens)
    micro = Experience(tokens=rows(mesh, sequence, jnp.int32), attention_mask=rows(mesh, sequence, jnp.bool_),
                       response_mask=rows(mesh, response, jnp.bool_),
                       **{name: rows(mesh, response, jnp.float32) for name in fields})
    updater._build(trainable, micro)  # the Updater's own jitted steps: the programs the trainer runs
    terms = updater._zero_terms
    total_units = np.float32(1.0)
    accumulate = updater._accumulate.lower(params, params, terms, micro, total_units)
    apply = updater._apply.lower(trainable, params, terms)
    return accumulate, apply, trainable


# ---------------------------------------------------------------------------------------------
# Roofline

_WIRE_FACTOR = {"all-gather": 7 / 8, "reduce-scatter": 7 / 8, "all-to-all": 7 / 8, "all-reduce": 2 * 7 / 8,
                "collective-permute": 1.0}


def link_seconds(cost: ProgramCost, in_loop: bool, hw: Hardware) -> float:
    """Ring algorithms over n = 8 devices: launches x latency + wire bytes / link bandwidth."""
    wire = sum(_WIRE_FACTOR[kind] * size for kind, size in cost.by_kind(in_loop).items())
    return cost.launches(in_loop) * hw.collective_latency_s + wire / hw.link_bytes_per_s


def bound(flops: float, hbm_bytes: float, link_s: float, hw: Hardware) -> tuple[float, str]:
    """(seconds, the term that sets them) of max(FLOPs / peak, HBM bytes / bandwidth, link time)."""
    terms = {"flops": flops / hw.peak_flops, "hbm": hbm_bytes / hw.hbm_bytes_per_s, "link": link_s}
    name = max(terms, key=terms.get)
    return terms[name], name


def kv_cache_device_bytes(config: Qwen2Config, work: Workload, mesh) -> float:
    """The sampler's keys and values, rows split over (data, fsdp) as its cache constraint says."""
    slots = work.prompt_bucket + work.max_new_tokens
    total = (2 * config.num_layers * work.rows_per_call * slots * config.num_kv_heads * config.head_dim
             * np.dtype(config.dtype).itemsize)
    return total / (mesh.shape["data"] * mesh.shape["fsdp"])


def decode_step(cost: ProgramCost, params_bytes: int, kv_bytes: float, hw: Hardware) -> tuple[float, str]:
    """One decode step reads the device's parameters, what it gathered, and its KV cache."""
    gathered = cost.by_kind(in_loop=True).get("all-gather", 0)
    return bound(cost.flops_per_iteration, params_bytes + gathered + kv_bytes, link_seconds(cost, True, hw), hw)


def prefill(cost: ProgramCost, params_bytes: int, kv_bytes: float, hw: Hardware) -> float:
    gathered = cost.by_kind(in_loop=False).get("all-gather", 0)
    return bound(cost.fixed_flops, params_bytes + gathered + kv_bytes, link_seconds(cost, False, hw), hw)[0]


def program_seconds(cost: ProgramCost, hw: Hardware) -> float:
    # Scoring and update micro-batches are compute bound: the HBM term is left to the FLOP term.
    return bound(cost.fixed_flops, 0.0, link_seconds(cost, False, hw), hw)[0]


# ---------------------------------------------------------------------------------------------


def compile_all(config: Qwen2Config, mesh, train: TrainConfig, work: Workload, layouts, context_name: str):
    """(program name -> cost, program name -> compile seconds, per-device bytes of the training
    state that lives through an iteration, of the gradient sums that live through an update)."""
    costs: dict[str, ProgramCost] = {}
    compile_s: dict[str, float] = {}

    def add(name, lowered):
        costs[name], compile_s[name] = compile_timed(name, lowered)

    with parallel.activate(mesh) if context_name == "activated" else contextlib.nullcontext():
        for layout in layouts:
            add(f"sampler/{layout}", sampler_program(config, mesh, layout, work))
        add("score/logprobs", scoring_program(config, mesh, work, "lm"))
        add("score/values", scoring_program(config, mesh, work, "value"))
    state = grads = 0
    with parallel.activate(mesh):  # the Updater always runs inside it
        for head, role in (("lm", "actor"), ("value", "critic")):
            accumulate, apply, trainable = update_programs(config, mesh, train, work, head)
            add(f"{role}/accumulate", accumulate)
            add(f"{role}/apply", apply)
            state += device_bytes(trainable)
            grads += device_bytes(trainable.params)
    state += device_bytes(abstract_params(config, mesh))  # the frozen reference
    return costs, compile_s, state, grads


def report(model: str, config: Qwen2Config, mesh, train: TrainConfig, work: Workload, layouts, context_name: str):
    costs, compile_s, state, grads = compile_all(config, mesh, train, work, layouts, context_name)
    n_devices = mesh.devices.size
    weights = tree_bytes(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    print(f"\n### Qwen2.5-{model}: {config.num_params() / 1e9:.2f}B parameters ({weights / GB:.1f} GB float32), "
          f"{config.num_layers} layers, vocab {config.vocab_size}\n")
    print(f"Mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}, "
          f"{config.compute_dtype} compute, remat {config.remat}; sampler and scoring forward compiled "
          f"{context_name}. Sampler call: {work.prompts_per_call} prompts x {work.samples_per_prompt} samples = "
          f"{work.rows_per_call} rows, prompt bucket {work.prompt_bucket}, {work.max_new_tokens} new tokens. "
          f"Scoring and update micro-batch: {work.micro_batch_rows} rows x {work.sequence_length} tokens.\n")
    print("| program | memory / device, XLA:CPU plan (GB) | without CPU bf16 upcasts (GB) | arguments / temporaries (GB) "
          "| collectives per decode step (MB, ops) | collectives per call outside the loop (GB) | "
          "GFLOP per token | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cost in costs.items():
        if name.startswith("sampler"):
            flops = f"{cost.flops_per_iteration * n_devices / work.rows_per_call / 1e9:.2f}"
            loop = f"{cost.collective_bytes_per_iteration / 1e6:,.3f} ({cost.launches(in_loop=True)})"
        else:
            tokens = work.micro_batch_rows * work.sequence_length
            flops = "-" if name.endswith("apply") else f"{cost.fixed_flops * n_devices / tokens / 1e9:.2f}"
            loop = "-"
        print(f"| {name} | {cost.memory_bytes / GB:.2f} | {cost.accelerator_memory_bytes / GB:.2f} | "
              f"{cost.argument_bytes / GB:.2f} / {cost.temp_bytes / GB:.2f} | {loop} | "
              f"{cost.fixed_collective_bytes / GB:,.2f} | {flops} | {compile_s[name]:.0f} |")
    print()
    for name, cost in costs.items():
        if name.startswith("sampler"):
            kinds = ", ".join(f"{k} {v / 1e6:,.3f} MB" for k, v in sorted(cost.by_kind(in_loop=True).items()))
            print(f"- {name}, in the decode loop per step: {kinds or 'nothing'}")

    # Between programs the device holds the training state; gradient sums only during an update.
    # A program's arguments are that state (or the sampler's copy of the actor, which is not).
    training = [c for name, c in costs.items() if not name.startswith("sampler")]
    worst_training = max(training, key=lambda c: c.accelerator_memory_bytes - c.argument_bytes)
    print(f"\nTraining state per device (actor and critic parameters and Adam moments, reference): "
          f"{state / GB:.2f} GB, + gradient sums {grads / GB:.2f} GB during updates.")
    print(f"\nSeconds per PPO iteration, roofline lower bounds: every turn decodes {work.max_new_tokens} tokens; "
          f"{work.sampler_calls} sampler calls, {work.scoring_forwards} x {work.micro_batches} scoring forwards, "
          f"{work.micro_batches} actor and {work.micro_batches} critic micro-batch steps, "
          f"{work.optimizer_steps} optimizer steps each. Peak memory is the larger of the rollout "
          f"(state + the sampler) and the training programs (state + gradient sums + the largest one's "
          f"temporaries and outputs: {worst_training.name}), without XLA:CPU's bf16 upcasts.\n")
    print("| hardware | sampler layout | decode step (ms, bound) | rollout (s) | scoring (s) | updates (s) | "
          "iteration (s) | peak memory / device (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    kv_bytes = kv_cache_device_bytes(config, work, mesh)
    problems = []
    for hw in HARDWARE:
        score_s = work.micro_batches * (2 * program_seconds(costs["score/logprobs"], hw)
                                        + (work.scoring_forwards - 2) * program_seconds(costs["score/values"], hw))
        update_s = sum(work.micro_batches * program_seconds(costs[f"{role}/accumulate"], hw)
                       + work.optimizer_steps * program_seconds(costs[f"{role}/apply"], hw)
                       for role in ("actor", "critic"))
        update_fits = compiled_cost.fits(worst_training, hw.memory_bytes,
                                         state + grads - worst_training.argument_bytes)
        update_peak = state + grads + worst_training.accelerator_memory_bytes - worst_training.argument_bytes
        for layout in layouts:
            cost = costs[f"sampler/{layout}"]
            params_bytes = device_bytes(sampler_params(config, mesh, layout))
            step_s, limit = decode_step(cost, params_bytes, kv_bytes, hw)
            rollout_s = work.sampler_calls * (prefill(cost, params_bytes, kv_bytes, hw)
                                             + (work.max_new_tokens - 1) * step_s)
            # The training layout samples from the actor's own parameters, already in the state.
            beside = state - (cost.argument_bytes if layout == "training" else 0)
            problem = compiled_cost.fits(cost, hw.memory_bytes, beside) or update_fits
            problems += [f"{hw.name}: {problem}"] if problem else []
            peak = max(beside + cost.accelerator_memory_bytes, update_peak)
            print(f"| {hw.name} | {layout} | {step_s * 1e3:.1f} ({limit}) | {rollout_s:.0f} | {score_s:.0f} | "
                  f"{update_s:.0f} | {rollout_s + score_s + update_s:.0f} | {peak / GB:.0f} "
                  f"{'fits' if problem is None else 'DOES NOT FIT'} |")
    for problem in dict.fromkeys(problems):
        print(f"- {problem}")
    if mesh.shape["tensor"] == 1 and {"replicated", "tensor"} <= set(layouts):
        print("\n(The mesh's tensor axis has size 1, so the tensor layout is the replicated one.)")
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="0.5b,3b,7b", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"sampler layouts, of {', '.join(LAYOUTS)}")
    parser.add_argument("--config", default=str(REPO / "configs" / "qwen2.5-3b-8gpu.yaml"),
                        help="the run config whose mesh, rollout and PPO sizes are the workload")
    parser.add_argument("--prompt-bucket", type=int, default=2048, help="the sampler call's prompt length")
    parser.add_argument("--context", choices=("activated", "trainer"), default="activated",
                        help="compile the sampler and scoring forward inside parallel.activate(mesh) or, as "
                             "rl/trainer.py calls them, outside it")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [m for m in models if m not in MODELS] + [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"unknown model or layout: {', '.join(unknown)}")

    train = load_config(args.config)
    mesh = parallel.make_mesh(train.mesh)
    work = workload_of(train, args.prompt_bucket)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; "
          f"workload from {Path(args.config).name}")
    for hw in HARDWARE:
        print(f"- {hw.name}, per GPU: {hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16, HBM {hw.hbm_bytes_per_s / 1e12:.2f} TB/s, "
              f"NVLink {hw.link_bytes_per_s / 1e9:.0f} GB/s each way, {hw.collective_latency_s * 1e6:.0f} us per "
              f"collective, {hw.memory_bytes / 1e9:.0f} GB")
    for model in models:
        config = load_model_config(MODELS[model], compute_dtype=train.model.compute_dtype, remat=train.model.remat)
        report(model, config, mesh, train, work, layouts, args.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
