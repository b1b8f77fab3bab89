"""What a compiled program costs per device: memory, matmul FLOPs, and the bytes its collectives move.

`program_cost(name, compiled)` reads a `jax.stages.Compiled` (jit(f).lower(*args).compile(), which
needs no memory for the arguments when they are `jax.ShapeDtypeStruct`s that carry shardings):
memory from `memory_analysis()`, and FLOPs and collectives from the optimized HLO
(`compiled.as_text()`). So what a real model costs on 8 GPUs can be read on a CPU with 8 fake
devices before anything runs; `fits` says whether a program fits a device.

Work is counted where it executes. A `while` loop whose trip count XLA knows (a `lax.scan` over
layers: `known_trip_count` in its backend_config) multiplies what its body does; a loop whose trip
count depends on data (the sampler's decode loop, which stops when every row has stopped) is
counted per iteration instead. Computations a body calls (fusions, async wrappers, conditionals)
count as part of that body. Collective bytes are per device, the larger side of the op: the
gathered result of an all-gather, the scattered operand of a reduce-scatter, the buffer of an
all-reduce, all-to-all or collective-permute. FLOPs are 2 per multiply-add of every `dot`
(XLA's own cost_analysis() counts a loop body once, whatever its trip count).

Compiled for CPU, a bfloat16 program's memory includes float32 copies of its weights: XLA:CPU
has no bf16 matmul and hoists the upcasts out of loops. `upcast_bytes` finds them, and
`accelerator_memory_bytes` leaves them out.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of HLO primitive types; sub-byte types round up (a bound, not an exact size).
_ELEMENT_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION_START = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(?:condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_COMMENT = re.compile(r"/\*.*?\*/")  # '/*index=5*/' marks in long operand and tuple lists
_DIMS = re.compile(r"\blhs_contracting_dims=\{([0-9,]*)\}")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")


def array_bytes(type_text: str) -> int:
    """Total bytes of every array in an HLO type: 'f32[8,128]{1,0}' or a (nested) tuple of them.
    Element types this table does not know (token, opaque) count 0."""
    total = 0
    for element, dims in _ARRAY.findall(type_text):
        size = _ELEMENT_BYTES.get(element, 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type_text: str
    opcode: str
    operands: tuple[str, ...]  # operand text as written: a name, or 'f32[..] %name' in older dumps
    attributes: str


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVE_KINDS
    name: str  # the HLO instruction
    computation: str
    bytes: int  # per device, per execution
    repeats: int  # executions per program run, or per iteration of `loop`
    loop: str | None  # the data-dependent while loop it runs in, per iteration; None: runs a fixed count per call

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.repeats


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) opcode(...)' -> ('(f32[2], s32[])', ' opcode(...)'); tuples nest."""
    if not rest.startswith("("):
        type_text, _, tail = rest.partition(" ")
        return type_text, " " + tail
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return rest[: i + 1], rest[i + 1:]
    raise ValueError(f"unbalanced tuple type in HLO: {rest[:120]!r}")


def _split_operands(text: str) -> tuple[tuple[str, ...], str]:
    """'a, f32[2] %b), attrs' -> (('a', 'f32[2] %b'), ', attrs'): split at commas outside brackets."""
    depth, start, parts = 0, 0, []
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                parts.append(text[start:i])
                parts = [_COMMENT.sub("", p).strip() for p in parts]
                return tuple(p for p in parts if p), text[i + 1:]
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    raise ValueError(f"unbalanced operand list in HLO: {text[:120]!r}")


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """(computation name -> its instructions, the entry computation's name) from HLO module text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            start = _COMPUTATION_START.match(line)
            if start:
                current = start.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        type_text, tail = _split_type(match.group(2))
        opcode = _OPCODE.match(tail)
        if not opcode:
            continue
        operands, attributes = _split_operands(tail[opcode.end():])
        computations[current].append(Instruction(match.group(1), type_text, opcode.group(1), operands, attributes))
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation (pass compiled.as_text())")
    return computations, entry


def _operand_type(operand: str, types: dict[str, str]) -> str:
    """An operand's HLO type: written inline ('f32[2] %x', older dumps) or its definition's."""
    if _ARRAY.search(operand):
        return operand.rsplit(" ", 1)[0]
    return types.get(operand.lstrip("%"), "")


def _collective_kind(opcode: str) -> str | None:
    """'all-gather' and 'all-gather-start' -> 'all-gather'; '-done' halves are not counted twice."""
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVE_KINDS else None


def _moved_bytes(instruction: Instruction, types: dict[str, str]) -> int:
    operands = sum(array_bytes(_operand_type(o, types)) for o in instruction.operands)
    result = array_bytes(instruction.type_text)
    if instruction.opcode.endswith("-start"):
        # An async start returns its operand buffers alongside the result (all-gather-start:
        # (input, output)); all-reduce-start returns the result alone.
        result = max(result - operands, 0)
    return max(operands, result)


def _called(instruction: Instruction) -> list[str]:
    names = _CALLED.findall(instruction.attributes)
    for group in _BRANCHES.findall(instruction.attributes):
        names += [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
    return names


def _dot_flops(instruction: Instruction, types: dict[str, str]) -> int:
    """2 x (result elements) x (contracted elements): a dot's multiply-adds, counted as two FLOPs."""
    contracting = _DIMS.search(instruction.attributes)
    lhs = _ARRAY.search(_operand_type(instruction.operands[0], types))
    result = _ARRAY.search(instruction.type_text)
    if not (contracting and lhs and result):
        return 0
    lhs_dims = [int(d) for d in lhs.group(2).split(",") if d]
    contracted = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
    return 2 * math.prod(int(d) for d in result.group(2).split(",") if d) * contracted


_HALF_FLOATS = ("bf16[", "f16[")
_PASS_THROUGH = ("parameter", "convert", "bitcast", "copy")


def _is_upcast(instruction: Instruction, computations: dict[str, list[Instruction]], types: dict[str, str]) -> bool:
    """A convert from a 16-bit float to float32 that XLA inserted itself (JAX's converts carry
    metadata): XLA:CPU has no bf16 matmul, so it upcasts dot operands, and hoists the upcast of a
    loop-invariant weight stack out of the loop. A fusion that only wraps such a convert counts."""
    if "metadata=" in instruction.attributes or not instruction.type_text.startswith("f32["):
        return False
    if instruction.opcode == "convert":
        return _operand_type(instruction.operands[0], types).startswith(_HALF_FLOATS)
    if instruction.opcode != "fusion":
        return False
    called = _called(instruction)
    body = computations.get(called[0], []) if called else []
    return (bool(body) and all(i.opcode in _PASS_THROUGH for i in body)
            and any(i.opcode == "convert" for i in body)
            and all(i.type_text.startswith(_HALF_FLOATS) for i in body if i.opcode == "parameter"))


@dataclasses.dataclass(frozen=True)
class HloCost:
    """What the optimized HLO says a program does per device: its collectives, its matmul FLOPs by
    where they run (None: a fixed number of times per call; a loop name: per iteration of that
    data-dependent loop), and the float32 copies of 16-bit arrays XLA made at the top level."""

    collectives: tuple[Collective, ...]
    dot_flops: dict[str | None, int]
    upcast_bytes: int  # top-level compiler-inserted 16-bit -> float32 converts (see _is_upcast)


def hlo_cost(text: str) -> HloCost:
    """Collectives and matmul FLOPs of optimized HLO text, counted where they run (module docstring)."""
    computations, entry = parse_hlo(text)
    types = {name: {i.name: i.type_text for i in instructions} for name, instructions in computations.items()}
    collectives: list[Collective] = []
    dot_flops: dict[str | None, int] = {}

    def visit(computation: str, repeats: int, loop: str | None, path: tuple[str, ...]) -> None:
        if computation in path or computation not in computations:
            return  # HLO call graphs are acyclic; this only guards against a misparse
        path = path + (computation,)
        for instruction in computations[computation]:
            kind = _collective_kind(instruction.opcode)
            if kind is not None:
                collectives.append(Collective(kind, instruction.name, computation,
                                              _moved_bytes(instruction, types[computation]), repeats, loop))
            elif instruction.opcode == "dot":
                dot_flops[loop] = dot_flops.get(loop, 0) + repeats * _dot_flops(instruction, types[computation])
            if instruction.opcode == "while":
                body = _BODY.search(instruction.attributes).group(1)
                condition = _CONDITION.search(instruction.attributes).group(1)
                trips = _TRIP_COUNT.search(instruction.attributes)
                if trips:
                    # The condition runs once more than the body; its collectives are tiny flags.
                    visit(body, repeats * int(trips.group(1)), loop, path)
                    visit(condition, repeats * (int(trips.group(1)) + 1), loop, path)
                else:
                    visit(body, 1, instruction.name, path)
                    visit(condition, 1, instruction.name, path)
                continue
            for called in _called(instruction):
                visit(called, repeats, loop, path)

    visit(entry, 1, None, ())
    # Top-level upcasts live for the whole call (inside a loop they would be one layer's, briefly).
    upcasts = sum(array_bytes(i.type_text) for i in computations[entry] if _is_upcast(i, computations, types[entry]))
    return HloCost(tuple(collectives), dot_flops, upcasts)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per-device cost of one compiled program."""

    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    alias_bytes: int  # outputs that reuse (donated) argument buffers: counted once
    upcast_bytes: int  # of temp_bytes: XLA:CPU's float32 copies of bf16 weights (HloCost.upcast_bytes)
    xla_flops: float | None  # XLA's cost_analysis(): a while body counts once, whatever its trip count
    dot_flops: dict[str | None, int]  # matmul FLOPs: None -> per call, loop name -> per iteration
    collectives: tuple[Collective, ...]

    @property
    def memory_bytes(self) -> int:
        """Device memory XLA planned for one call: arguments + outputs + temporaries + code."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.generated_code_bytes - self.alias_bytes

    @property
    def accelerator_memory_bytes(self) -> int:
        """memory_bytes without XLA:CPU's upcast copies: what a GPU, which multiplies bf16
        natively, would need (compiled on a GPU, upcast_bytes is 0 and the two agree)."""
        return self.memory_bytes - self.upcast_bytes

    @property
    def fixed_flops(self) -> int:
        """Matmul FLOPs per call outside data-dependent loops (known-count loops multiplied out)."""
        return self.dot_flops.get(None, 0)

    @property
    def flops_per_iteration(self) -> int:
        """Matmul FLOPs of one iteration of every data-dependent loop (the sampler: one decode step)."""
        return sum(v for loop, v in self.dot_flops.items() if loop is not None)

    @property
    def fixed_collective_bytes(self) -> int:
        """Collective bytes per call outside data-dependent loops (known-count loops multiplied out)."""
        return sum(c.total_bytes for c in self.collectives if c.loop is None)

    @property
    def collective_bytes_per_iteration(self) -> int:
        """Bytes one iteration of every data-dependent loop moves (the sampler: one decode step)."""
        return sum(c.total_bytes for c in self.collectives if c.loop is not None)

    def by_kind(self, in_loop: bool) -> dict[str, int]:
        """Collective kind -> bytes, per iteration of the data-dependent loops or per call outside them."""
        totals: dict[str, int] = {}
        for c in self.collectives:
            if (c.loop is not None) == in_loop:
                totals[c.kind] = totals.get(c.kind, 0) + c.total_bytes
        return totals

    def launches(self, in_loop: bool) -> int:
        """Collective ops executed, per iteration of the data-dependent loops or per call outside
        them: each pays a fixed latency, however few bytes it moves."""
        return sum(c.repeats for c in self.collectives if (c.loop is not None) == in_loop)


def _xla_flops(compiled: jax.stages.Compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it; FLOPs are then unknown
        return None
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def program_cost(name: str, compiled: jax.stages.Compiled) -> ProgramCost:
    """Read one compiled program (jit(f).lower(*abstract_args).compile())."""
    memory = compiled.memory_analysis()
    hlo = hlo_cost(compiled.as_text())
    return ProgramCost(
        name=name,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        generated_code_bytes=memory.generated_code_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        upcast_bytes=hlo.upcast_bytes,
        xla_flops=_xla_flops(compiled),
        dot_flops=hlo.dot_flops,
        collectives=hlo.collectives,
    )


def fits(cost: ProgramCost, device_bytes: float, resident_bytes: int = 0, headroom: float = 0.9) -> str | None:
    """None when the program (its accelerator_memory_bytes) plus `resident_bytes` that stay live
    beside it (training state that is not among its arguments) fit in `headroom` of a device's
    memory; otherwise a message naming the program, the estimate and the budget."""
    needed = cost.accelerator_memory_bytes + resident_bytes
    budget = device_bytes * headroom
    if needed <= budget:
        return None
    return (f"{cost.name}: needs {needed / 1e9:.2f} GB per device (arguments {cost.argument_bytes / 1e9:.2f}, "
            f"temporaries {(cost.temp_bytes - cost.upcast_bytes) / 1e9:.2f}, outputs {cost.output_bytes / 1e9:.2f}, "
            f"resident beside it {resident_bytes / 1e9:.2f}) but {headroom:.0%} of the device's "
            f"{device_bytes / 1e9:.1f} GB is {budget / 1e9:.2f} GB")
