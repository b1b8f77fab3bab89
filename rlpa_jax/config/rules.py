"""Cross-field rules of the config tree: checks that read several options (a batch that splits into
micro-batches, heads that split over the mesh, one rate limit per endpoint...). Each names the keys
it reads, so a rule whose inputs already failed is skipped (and never divides by a zero that was
already reported).

Every rule holds for every job; a few more hold only for the job that reads their options
(JOB_RULES: launch/sft.py's SFT batch, launch/dpo.py's DPO batch, launch/eval.py's judge), so a PPO
config is not refused for a section it never reads. What only the machine decides (a mesh axis at
-1 takes the remaining devices) is checked when the mesh is built (rlpa_jax/app/build.py)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from rlpa_jax.config.llm_sections import LLM_PARENTS, LLM_ROLES, section_at
from rlpa_jax.config.options import Problems
from rlpa_jax.config.tree import TrainConfig

CrossFieldRule = Callable[[TrainConfig], "str | None"]
CROSS_FIELD_RULES: list[tuple[tuple[str, ...], CrossFieldRule]] = []
# The programs that load a config (the `job` of load_config) and the rules each adds to the others.
JOB_RULES: dict[str, list[tuple[tuple[str, ...], CrossFieldRule]]] = {"train": [], "sft": [], "dpo": [], "eval": []}


def _rule(*keys: str, job: str | None = None):
    def register(check: CrossFieldRule) -> CrossFieldRule:
        (CROSS_FIELD_RULES if job is None else JOB_RULES[job]).append((keys, check))
        return check

    return register


@_rule("ppo.train_batch_size", "ppo.micro_batch_size")
def _whole_micro_batches(c: TrainConfig) -> str | None:
    if c.ppo.train_batch_size % c.ppo.micro_batch_size:
        return (f"ppo.train_batch_size={c.ppo.train_batch_size} must be a multiple of "
                f"ppo.micro_batch_size={c.ppo.micro_batch_size}")
    return None


def _rows_split_over_the_mesh(c: TrainConfig, key: str, rows: int, what: str) -> str | None:
    """A batch's rows are split over the mesh's data x fsdp devices, so their count must be a multiple
    of what the config fixes of that product (an axis at -1 is known once the mesh is built)."""
    fixed = {name: size for name, size in (("mesh.data", c.mesh.data), ("mesh.fsdp", c.mesh.fsdp)) if size != -1}
    devices = math.prod(fixed.values())
    if rows % devices == 0:
        return None
    free = [name for name in ("mesh.data", "mesh.fsdp") if name not in fixed]
    remaining = f"; {free[0]}=-1 takes the remaining devices" if free else ""
    return (f"{key}={rows} must be a multiple of {'*'.join(fixed)}={devices} ({what} are split over the mesh's "
            f"data x fsdp devices{remaining})")


@_rule("ppo.micro_batch_size", "mesh.data", "mesh.fsdp")
def _micro_batches_split_over_the_mesh(c: TrainConfig) -> str | None:
    return _rows_split_over_the_mesh(c, "ppo.micro_batch_size", c.ppo.micro_batch_size, "each micro-batch's rows")


def _sft_batches_split_over_the_mesh(c: TrainConfig) -> str | None:
    return _rows_split_over_the_mesh(c, "sft.batch_size", c.sft.batch_size, "each SFT step's examples")


# PPO's warm start reads the sft section when it is enabled; launch/sft.py always does.
_rule("sft.batch_size", "sft.enabled", "mesh.data", "mesh.fsdp")(
    lambda c: _sft_batches_split_over_the_mesh(c) if c.sft.enabled else None)
_rule("sft.batch_size", "mesh.data", "mesh.fsdp", job="sft")(_sft_batches_split_over_the_mesh)


@_rule("dpo.batch_size", "mesh.data", "mesh.fsdp", job="dpo")
def _dpo_batches_split_over_the_mesh(c: TrainConfig) -> str | None:
    return _rows_split_over_the_mesh(c, "dpo.batch_size", c.dpo.batch_size, "each DPO step's preference pairs")


@_rule("rollout.conversations", "rollout.pipeline_groups")
def _a_conversation_per_group(c: TrainConfig) -> str | None:
    if c.rollout.conversations < c.rollout.pipeline_groups:
        return (f"rollout.conversations={c.rollout.conversations} is below "
                f"rollout.pipeline_groups={c.rollout.pipeline_groups}; it must be at least that")
    return None


@_rule("ppo.advantage", "rollout.schedule")
def _next_turn_in_the_batch(c: TrainConfig) -> str | None:
    if c.ppo.advantage == "cross_turn" and c.rollout.schedule == "turn":
        return ("ppo.advantage=cross_turn bootstraps each turn from the conversation's next turn in the same "
                "iteration, but rollout.schedule=turn samples one turn per conversation per iteration; "
                "use gae or grpo, or rollout.schedule=conversation")
    return None


@_rule("data.switch_turn", "rollout.max_rounds")
def _switch_within_dialogue(c: TrainConfig) -> str | None:
    if c.data.switch_turn is not None and c.data.switch_turn > c.rollout.max_rounds:
        return (f"data.switch_turn={c.data.switch_turn} must be within "
                f"1..rollout.max_rounds={c.rollout.max_rounds}")
    return None


@_rule("mesh.data", "mesh.fsdp", "mesh.tensor")
def _one_free_mesh_axis(c: TrainConfig) -> str | None:
    sizes = {"mesh.data": c.mesh.data, "mesh.fsdp": c.mesh.fsdp, "mesh.tensor": c.mesh.tensor}
    free = [key for key, size in sizes.items() if size == -1]
    if len(free) > 1:
        return f"{' and '.join(free)} are -1; at most one mesh axis may take the remaining devices"
    return None


@_rule("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.devices")
def _mesh_spans_its_devices(c: TrainConfig) -> str | None:
    """With mesh.devices set, the axis sizes must span exactly that many (the machine decides the rest)."""
    if c.mesh.devices is None:
        return None
    sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    fixed = math.prod(size for size in sizes if size != -1)
    spans = c.mesh.devices % fixed == 0 if -1 in sizes else fixed == c.mesh.devices
    if spans:
        return None
    return (f"mesh.data={c.mesh.data} x mesh.fsdp={c.mesh.fsdp} x mesh.tensor={c.mesh.tensor} cannot span "
            f"mesh.devices={c.mesh.devices}; the fixed sizes' product must equal it (divide it, with one axis at -1)")


@_rule("model.tiny.hidden_size", "model.tiny.num_heads")
def _whole_heads(c: TrainConfig) -> str | None:
    tiny = c.model.tiny
    if tiny.hidden_size % tiny.num_heads or (tiny.hidden_size // tiny.num_heads) % 2:
        return (f"model.tiny.hidden_size={tiny.hidden_size} must be num_heads={tiny.num_heads} times an even "
                "head size (rotary embeddings rotate pairs of dimensions)")
    return None


@_rule("model.tiny.num_heads", "model.tiny.num_kv_heads")
def _whole_kv_groups(c: TrainConfig) -> str | None:
    tiny = c.model.tiny
    if tiny.num_heads % tiny.num_kv_heads:
        return (f"model.tiny.num_heads={tiny.num_heads} must be a multiple of "
                f"model.tiny.num_kv_heads={tiny.num_kv_heads}")
    return None


def _endpoint_rule(section: str, needed: Callable[[TrainConfig], str | None], job: str | None = None) -> None:
    """A role that talks to an LLM (`needed` says why, or None) must have an endpoint (base_url) or,
    on backend local, a checkpoint folder."""
    parents = [section]
    while parents[-1] in LLM_PARENTS:
        parents.append(LLM_PARENTS[parents[-1]])

    # (a parent's bad URL is inherited, so it is reported once, as itself)
    @_rule(f"{section}.base_url", f"{section}.backend", f"{section}.checkpoint", job=job)
    def has_endpoint(c: TrainConfig) -> str | None:
        reason = needed(c)
        role = section_at(c, section)
        if reason is None:
            return None
        if role.backend == "local":
            if role.checkpoint is not None:
                return None
            return (f"{section}.checkpoint: {reason} on {section}.backend=local needs a local Hugging Face Qwen2 "
                    f"folder; set {' or '.join(f'{key}.checkpoint' for key in parents)} (a role inherits unset fields)")
        if role.base_url is not None:
            return None
        return (f"{section}.base_url: {reason} needs an LLM endpoint; set "
                f"{' or '.join(f'{key}.base_url' for key in parents)} (a role inherits unset fields)")


_endpoint_rule("user.llm", lambda c: "user.kind=llm" if c.user.kind == "llm" else None)
_endpoint_rule("judges.profile.llm", lambda c: "judges.kind=llm" if c.judges.kind == "llm" else None)
_endpoint_rule("judges.response.llm", lambda c: "judges.kind=llm" if c.judges.kind == "llm" else None)
_endpoint_rule("judges.llm", lambda c: "data.extractor=llm" if c.data.extractor == "llm" else None)
# The evaluation's judge needs its model only in launch/eval.py (its job's rule); a local one without
# a checkpoint is wrong wherever it is read.
_endpoint_rule("eval.judge.llm",
               lambda c: "judges.kind=llm" if c.judges.kind == "llm" and c.eval.judge.llm.backend == "local" else None)
_endpoint_rule("eval.judge.llm", lambda c: "the evaluation's judge (judges.kind=llm)" if c.judges.kind == "llm" else None,
               job="eval")


@_rule(*(f"{key}.rpm" for key in LLM_ROLES.values()))
def _one_limit_per_endpoint(c: TrainConfig) -> str | None:
    """Roles on one endpoint share its rate limiter, so they must agree on its limits."""
    limits: dict[tuple, dict[tuple, list[str]]] = {}
    for key in LLM_ROLES.values():
        section = section_at(c, key)
        if section.base_url is not None and section.backend != "local":
            endpoint = (section.base_url.rstrip("/"), section.model)
            limits.setdefault(endpoint, {}).setdefault((section.rpm, section.tpm), []).append(key)
    for (url, model), found in limits.items():
        if len(found) > 1:
            listing = "; ".join(f"{', '.join(keys)}: rpm={rpm}, tpm={tpm}" for (rpm, tpm), keys in found.items())
            return (f"roles on one endpoint ({model} at {url}) share its rate limit, but give different "
                    f"rpm/tpm ({listing}); set them once (e.g. in llm or judges.llm)")
    return None


def check_rules(config: TrainConfig, problems: Problems,
                extra_rules: Sequence[tuple[tuple[str, ...], CrossFieldRule]] = (), job: str = "train") -> None:
    """Every rule, `job`'s own (a key of JOB_RULES) and `extra_rules` on `config`, into `problems`."""
    if job not in JOB_RULES:
        raise ValueError(f"config rules: job {job!r} is not one of {', '.join(JOB_RULES)}")
    for keys, check in [*CROSS_FIELD_RULES, *JOB_RULES[job], *extra_rules]:
        if problems.bad_keys.intersection(keys):
            continue
        text = check(config)
        if text:
            problems.add_rule(keys, text)
