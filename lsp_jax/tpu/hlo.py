"""What a compiled XLA program does per chip, read from its text: FLOPs, HBM bytes and
collective bytes, by named phase and per decode step, loop bodies times trip counts.

XLA's own `cost_analysis()` counts a while-loop body once, which for the self-play
iteration (decode loops, scanned layers) undercounts by one to three orders of
magnitude. This module walks the compiled module (`compiled.as_text()`, after SPMD
partitioning, so every shape is one chip's shard) from its entry computation and
multiplies each loop body by its trip count:
  - scans and fori loops: the bound read from the loop condition (`counter < N`) or
    XLA's `known_trip_count`;
  - decode loops: their most iterations, from the name scope the sampler gives each one
    (`lsp_jax.sampling.DECODE_SCOPE` + N; they stop early when every row is done, so
    the counts are upper bounds).
Operations are assigned to the phase whose name scope (`jax.named_scope` in
lsp_jax.train.step.lsp_step) appears in their `op_name` metadata; operations without
one inherit the phase of the loop that runs them.

Costs, all per chip and estimates of what the hardware does:
  - FLOPs: 2 per multiply-add of every dot and convolution, fused or not.
  - HBM bytes: operands read and results written at fusion boundaries (what stays
    inside a fusion lives in registers/VMEM); a fused operand that is only sliced
    counts its slice, an in-place dynamic-update-slice counts the update.
  - Collective bytes: the result size of each all-gather, all-reduce, all-to-all and
    collective-permute, and the operand size of each reduce-scatter (the full-size
    side of the collective).
"""

import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
}
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \((.*)\) -> (.*) \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Opcodes that move no HBM data of their own (bookkeeping, or a body counted inside).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "iota",
}
_SLICES = {"dynamic-slice", "slice", "gather"}
PHASES = (
    "rollout_params",
    "challenger_rollout",
    "solver_rollout",
    "rewards",
    "reference",
    "update",
)
OTHER = "other"


def shape_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (a tuple counts all its elements)."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(type_text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _dims(type_text: str) -> list[int]:
    match = _SHAPE.search(type_text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    type_text: str
    operands: list[str]
    arguments: str  # The text inside the parentheses (operands, or a literal).
    attributes: str
    op_name: str

    @property
    def bytes(self) -> int:
        return shape_bytes(self.type_text)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    types: dict  # Name of every value (parameters too) -> its type text.

    @property
    def root(self) -> Instruction:
        return self.instructions[-1]


def _split_arguments(text: str) -> tuple[str, str]:
    """(what is inside 'opcode(...)', the attributes after it) of `text`, the rest of an
    instruction line after 'opcode('."""
    depth = 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return text[:i], text[i + 1 :]
            depth -= 1
    return text, ""


def _parameter_types(signature: str) -> dict:
    """'p0: f32[2], p1: (s32[], bf16[4])' -> {'p0': 'f32[2]', 'p1': '(s32[], bf16[4])'}."""
    types, depth, start = {}, 0, 0
    for i, char in enumerate(signature + ","):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            name, _, type_text = signature[start:i].partition(":")
            if type_text:
                types[name.strip().lstrip("%")] = type_text.strip()
            start = i + 1
    return types


def parse(text: str) -> tuple[dict, str]:
    """(computations by name, name of the entry computation) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = Computation(header.group(2), [], _parameter_types(header.group(3)))
            computations[current.name] = current
            if header.group(1):
                entry = current.name
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, opcode, rest = match.groups()
        arguments, attributes = _split_arguments(rest)
        operands = re.findall(r"%([\w.\-]+)", arguments)
        op_name = _OP_NAME.search(attributes)
        instruction = Instruction(
            name,
            opcode,
            type_text,
            operands,
            arguments,
            attributes,
            op_name.group(1) if op_name else "",
        )
        current.instructions.append(instruction)
        current.types[name] = type_text
    if entry is None:
        raise ValueError("No ENTRY computation in this HLO text.")
    return computations, entry


@dataclasses.dataclass
class Costs:
    """Per-chip totals of one part of a program."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collective_bytes: dict = dataclasses.field(default_factory=dict)  # kind -> bytes

    def add(self, other: "Costs", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, value in other.collective_bytes.items():
            self.collective_bytes[kind] = self.collective_bytes.get(kind, 0.0) + times * value

    @property
    def all_gather_bytes(self) -> float:
        return self.collective_bytes.get("all-gather", 0.0)

    @property
    def total_collective_bytes(self) -> float:
        return sum(self.collective_bytes.values())


@dataclasses.dataclass
class DecodeLoop:
    """One decode while-loop: its phase, its most iterations, the cost of one step."""

    phase: str
    steps: int
    per_step: Costs
    largest_all_gather: int  # Bytes of the largest single all-gather in one step.


@dataclasses.dataclass
class ProgramCosts:
    phases: dict  # phase -> Costs (whole program, loops multiplied out)
    decode_loops: list  # DecodeLoop, in program order
    unknown_trip_counts: int  # While loops counted once for lack of a bound

    @property
    def total(self) -> Costs:
        total = Costs()
        for costs in self.phases.values():
            total.add(costs)
        return total


def _phase_of(op_name: str, inherited: str) -> str:
    parts = op_name.split("/")
    for phase in PHASES:
        if phase in parts:
            return phase
    return inherited


class _Walker:
    def __init__(self, computations, decode_scope):
        self.computations = computations
        self.decode = re.compile(re.escape(decode_scope) + r"(\d+)/while$")
        self.phases: dict = {}
        self.decode_loops: list = []
        self.unknown = 0

    def trip_count(self, instruction: Instruction) -> int | None:
        match = self.decode.search(instruction.op_name)
        if match:
            return int(match.group(1))
        match = _TRIP.search(instruction.attributes)
        if match:
            return int(match.group(1))
        condition = re.search(r"condition=%?([\w.\-]+)", instruction.attributes)
        return self._bound_from_condition(condition.group(1)) if condition else None

    def _bound_from_condition(self, name: str) -> int | None:
        """N of a `counter < N` loop condition (lax.scan, fori_loop)."""
        computation = self.computations.get(name)
        if computation is None:
            return None
        constants = {
            inst.name: int(inst.arguments)
            for inst in computation.instructions
            if inst.opcode == "constant" and re.fullmatch(r"-?\d+", inst.arguments.strip())
        }
        for inst in reversed(computation.instructions):
            if inst.opcode == "compare" and "direction=LT" in inst.attributes:
                for operand in inst.operands[1:]:
                    if operand in constants:
                        return constants[operand]
            if inst.opcode == "fusion":
                called = _CALLED.search(inst.attributes)
                bound = self._bound_from_condition(called.group(1)) if called else None
                if bound is not None:
                    return bound
        return None

    def fused_costs(self, name: str) -> Costs:
        """FLOPs and collectives inside a fused computation (nested fusions too; XLA
        fuses collective matmuls, with their all-gathers, on TPU)."""
        computation = self.computations.get(name)
        costs = Costs()
        if computation is None:
            return costs
        for inst in computation.instructions:
            costs.flops += _dot_flops(inst, computation.types)
            kind = _collective_kind(inst.opcode)
            if kind:
                size = _collective_size(inst, kind, computation.types)
                costs.collective_bytes[kind] = costs.collective_bytes.get(kind, 0.0) + size
                costs.largest = max(
                    getattr(costs, "largest", 0), size if kind == "all-gather" else 0
                )
            if inst.opcode == "fusion":
                called = _CALLED.search(inst.attributes)
                if called:
                    inner = self.fused_costs(called.group(1))
                    costs.add(inner)
                    costs.largest = max(getattr(costs, "largest", 0), getattr(inner, "largest", 0))
        return costs

    def sliced_bytes(self, computation: Computation, name: str, depth: int = 0):
        """Bytes actually read of value `name` of a fused computation when every path
        from it ends in a slice (through views such as bitcasts, and into nested
        fusions): the slices' sizes. None when some user reads it whole."""
        uses = [i for i in computation.instructions if name in i.operands]
        if not uses or depth > 8:
            return None
        total = 0.0
        for use in uses:
            if use.opcode in _SLICES and use.operands[0] == name:
                total += use.bytes
                continue
            if use.opcode in _VIEWS:
                inner = self.sliced_bytes(computation, use.name, depth + 1)
            elif use.opcode == "fusion":
                inner = self._sliced_in_fusion(use, name, depth)
            else:
                return None
            if inner is None:
                return None
            total += inner
        return total

    def _sliced_in_fusion(self, use: Instruction, name: str, depth: int):
        called = _CALLED.search(use.attributes)
        fused = self.computations.get(called.group(1)) if called else None
        if fused is None:
            return None
        params = {int(i.arguments or 0): i for i in fused.instructions if i.opcode == "parameter"}
        total = 0.0
        for index, operand in enumerate(use.operands):
            if operand != name:
                continue
            if index not in params:
                return None
            inner = self.sliced_bytes(fused, params[index].name, depth + 1)
            if inner is None:
                return None
            total += inner
        return total

    def fusion_bytes(self, inst: Instruction, outer_types: dict) -> float:
        called = _CALLED.search(inst.attributes)
        fused = self.computations.get(called.group(1)) if called else None
        if fused is None:
            return inst.bytes + sum(shape_bytes(outer_types.get(o, "")) for o in inst.operands)
        params = [i for i in fused.instructions if i.opcode == "parameter"]
        params.sort(key=lambda i: int(i.arguments or 0))
        root = fused.root
        in_place = root.opcode == "dynamic-update-slice"
        total = 0.0
        for index, operand in enumerate(inst.operands):
            size = shape_bytes(outer_types.get(operand, ""))
            if index < len(params):
                sliced = self.sliced_bytes(fused, params[index].name)
                if sliced is not None:
                    size = min(size, sliced)
                if in_place and root.operands and root.operands[0] == params[index].name:
                    size = 0.0  # The buffer updated in place: only the update moves.
            total += size
        if in_place and len(root.operands) > 1:
            total += shape_bytes(fused.types.get(root.operands[1], ""))
        else:
            total += inst.bytes
        return total

    def walk(self, name: str, times: float, phase: str, sink: Costs | None = None):
        """Adds computation `name`, run `times` times, to the phase totals (and to
        `sink`, the current decode step's costs, when inside a decode loop)."""
        computation = self.computations[name]
        for inst in computation.instructions:
            inst_phase = _phase_of(inst.op_name, phase)
            costs = Costs()
            if inst.opcode == "while":
                self._walk_loop(inst, times, inst_phase, sink)
                continue
            if inst.opcode in ("call", "conditional", "async-start"):
                branches = _BRANCHES.search(inst.attributes)
                names = (
                    [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                    if branches
                    else _CALLED.findall(inst.attributes)
                )
                for called in names[:1] if inst.opcode == "conditional" else names:
                    if called in self.computations:
                        self.walk(called, times, inst_phase, sink)
                continue
            kind = _collective_kind(inst.opcode)
            if kind:
                size = _collective_size(inst, kind, computation.types)
                costs.collective_bytes[kind] = size
                if sink is not None and kind == "all-gather":
                    sink.largest = max(getattr(sink, "largest", 0), size)
            if inst.opcode == "fusion":
                called = _CALLED.search(inst.attributes)
                if called:
                    inner = self.fused_costs(called.group(1))
                    costs.add(inner)
                    if sink is not None:
                        sink.largest = max(
                            getattr(sink, "largest", 0), getattr(inner, "largest", 0)
                        )
                costs.hbm_bytes += self.fusion_bytes(inst, computation.types)
            elif inst.opcode == "dynamic-update-slice":  # In place: the update moves.
                costs.hbm_bytes += 2 * shape_bytes(computation.types.get(inst.operands[1], ""))
            elif inst.opcode in _SLICES:
                costs.hbm_bytes += 2 * inst.bytes
            elif inst.opcode not in _FREE and not inst.opcode.endswith("-done"):
                costs.flops += _dot_flops(inst, computation.types)
                costs.hbm_bytes += inst.bytes + sum(
                    shape_bytes(computation.types.get(o, "")) for o in inst.operands
                )
            self.phases.setdefault(inst_phase, Costs()).add(costs, times)
            if sink is not None:
                sink.add(costs)

    def _walk_loop(self, inst: Instruction, times: float, phase: str, sink):
        body = re.search(r"body=%?([\w.\-]+)", inst.attributes).group(1)
        trips = self.trip_count(inst)
        if trips is None:
            self.unknown += 1
            trips = 1
        decode = self.decode.search(inst.op_name)
        if decode and sink is None:
            step = Costs()
            self.walk(body, times * trips, phase, step)
            self.decode_loops.append(
                DecodeLoop(phase, trips, step, int(getattr(step, "largest", 0)))
            )
            return
        if sink is None:
            self.walk(body, times * trips, phase, None)
            return
        inner = Costs()
        self.walk(body, times * trips, phase, inner)
        sink.add(inner, trips)
        sink.largest = max(getattr(sink, "largest", 0), getattr(inner, "largest", 0))


# Ops that pass an operand on without reading it from memory themselves.
_VIEWS = {"bitcast", "reshape", "copy", "convert", "transpose", "broadcast"}


def _collective_size(inst: Instruction, kind: str, types: dict) -> int:
    """The full-size side of a collective: its result, or a reduce-scatter's operand."""
    if kind == "reduce-scatter":
        return sum(shape_bytes(types.get(o, "")) for o in inst.operands)
    if inst.opcode.endswith("-start") and inst.type_text.startswith("("):
        return max((shape_bytes(t) for t in _tuple_elements(inst.type_text)), default=0)
    return inst.bytes


def _tuple_elements(type_text: str) -> list[str]:
    return [f"{d}[{s}]" for d, s in _SHAPE.findall(type_text)]


def _collective_kind(opcode: str) -> str | None:
    base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def _dot_flops(inst: Instruction, types: dict) -> float:
    """2 x multiply-adds of a dot (output size x contracted size) or a convolution
    (output size x the kernel's size per output feature)."""
    if inst.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
        lhs = _dims(types.get(inst.operands[0], "")) if inst.operands else []
        dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
        contracted = math.prod(lhs[d] for d in dims if d < len(lhs))
        return 2.0 * math.prod(_dims(inst.type_text)) * contracted
    if inst.opcode == "convolution" and len(inst.operands) > 1:
        return 2.0 * _convolution_macs(inst, types)
    return 0.0


def _window_field(window: str, key: str, count: int, default: int) -> list:
    match = re.search(key + r"=([\d_x]+)", window)
    if not match:
        return [(default, default) if key == "pad" else default] * count
    parts = match.group(1).split("x")
    if key == "pad":
        return [tuple(int(v) for v in part.split("_")) for part in parts]
    return [int(v) for v in parts]


def _convolution_macs(inst: Instruction, types: dict) -> float:
    """Multiply-adds of an HLO convolution, counting only window taps that land on real
    input elements. The TPU compiler writes many batched matmuls as convolutions whose
    padded, dilated windows act as batch dimensions, so |output| x |kernel| / features
    would overcount them by the window sizes."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attributes)
    lhs = _dims(types.get(inst.operands[0], ""))
    rhs = _dims(types.get(inst.operands[1], ""))
    out = _dims(inst.type_text)
    if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(3)) != len(out):
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    spatial = sorted(c for c in out_labels if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", inst.attributes)
    window = window.group(1) if window else ""
    n = len(spatial)
    sizes = _window_field(window, "size", n, 1)
    strides = _window_field(window, "stride", n, 1)
    pads = _window_field(window, "pad", n, 0)
    lhs_dilation = _window_field(window, "lhs_dilate", n, 1)
    rhs_dilation = _window_field(window, "rhs_dilate", n, 1)
    taps = 1
    for d, label in enumerate(spatial):
        size_in = lhs[lhs_labels.index(label)]
        size_out = out[out_labels.index(label)]
        extent = (size_in - 1) * lhs_dilation[d]
        valid = 0
        for o in range(size_out):
            for w in range(sizes[d]):
                pos = o * strides[d] + w * rhs_dilation[d] - pads[d][0]
                valid += 0 <= pos <= extent and pos % lhs_dilation[d] == 0
        taps *= valid
    batch = out[out_labels.index("b")]
    features = out[out_labels.index("f")]
    return float(batch * features * rhs[rhs_labels.index("i")] * taps)


def program_costs(hlo_text: str, *, decode_scope: str | None = None) -> ProgramCosts:
    """Per-chip costs of a compiled program, by phase and per decode step."""
    if decode_scope is None:
        from lsp_jax.sampling import DECODE_SCOPE as decode_scope
    computations, entry = parse(hlo_text)
    walker = _Walker(computations, decode_scope)
    walker.walk(entry, 1.0, OTHER)
    return ProgramCosts(walker.phases, walker.decode_loops, walker.unknown)
