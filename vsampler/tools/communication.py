"""What a compiled program communicates, read off its HLO text (after SPMD partitioning: per-device
shapes). The tests use it to prove that the vocabulary-parallel `sample` (`vsampler.impls.vocab_parallel`)
never moves a vocabulary-sized array; the benchmark (`communication_report`, `bench/test_vocab_parallel.py`)
to count the bytes per call."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vsampler.core.numerics import MAX_PASSES
from vsampler.core.params import SamplingParams
from vsampler.core.sampling import sample

COLLECTIVE_OPS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4}
_DTYPE_BYTES |= {"f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLED = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation|branch_computations)=")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled, SPMD-partitioned HLO module (per-device shapes)."""

    op: str  # all-gather | all-reduce | all-to-all | collective-permute | reduce-scatter
    name: str  # the instruction's name
    operand_shapes: tuple[tuple[int, ...], ...]
    result_shapes: tuple[tuple[int, ...], ...]
    operand_bytes: int  # what one device puts in per execution
    runs: int | None  # executions per call: 1, a counted loop's trip count; None in a data-dependent loop

    @property
    def largest_dim(self) -> int:
        """The largest dimension of any operand or result (0 for scalars)."""
        return max((d for shape in self.operand_shapes + self.result_shapes for d in shape), default=0)


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(text)]


def _split_instruction(rest: str) -> tuple[str, str, str, str]:
    """`<type> <opcode>(<operands>), <attributes>` -> (type, opcode, operands, attributes)."""
    depth, i = 0, 0
    while i < len(rest):  # the type: a shape or a parenthesised tuple of shapes
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        if rest[i] == " " and depth == 0:
            break
        i += 1
    type_text, rest = rest[:i], rest[i + 1 :]
    opcode, _, rest = rest.partition("(")
    depth, j = 1, 0
    while j < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[j], 0)
        j += 1
    return type_text, opcode.strip(), rest[: j - 1], rest[j:]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in `hlo_text` (`jax.jit(f).lower(...).compile().as_text()`), with the shapes of
    its operands and results and how often it runs per call (loops with a known trip count multiply;
    a data-dependent loop leaves `runs` None)."""
    types: dict[str, str] = {}  # instruction -> its result type
    found: list[tuple[str, str, str, str, str]] = []  # (computation, name, opcode, type, operands)
    calls: list[tuple[str, str, int | None]] = []  # (caller, callee, runs per caller run)
    computation = ""
    for line in hlo_text.splitlines():
        if (head := _COMPUTATION.match(line)) and " = " not in line.split("(")[0]:
            computation = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            continue
        if not (inst := _INSTRUCTION.match(line)):
            continue
        type_text, opcode, operands, attributes = _split_instruction(line[inst.end() :])
        types[inst.group(1)] = type_text
        base = opcode.removesuffix("-start")
        if base in COLLECTIVE_OPS and not opcode.endswith("-done"):
            found.append((computation, inst.group(1), base, type_text, operands))
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
        for match in _CALLED.finditer(attributes):
            in_loop = opcode == "while" and match.group(1) in ("body", "condition")
            names = re.match(r"\{?([^}]*?)\}?(?:,\s*\w+=|$)", attributes[match.end() :])
            for callee in re.findall(r"%?([\w.\-]+)", names.group(1) if names else ""):
                calls.append((computation, callee, (int(trip.group(1)) if trip else None) if in_loop else 1))

    @functools.cache
    def runs(name: str) -> int | None:
        if name == "ENTRY":
            return 1
        total = 0
        for caller, callee, times in calls:
            if callee == name and caller != name:
                outer = runs(caller)
                if outer is None or times is None:
                    return None
                total += outer * times
        return total

    result = []
    for comp, name, op, type_text, operands in found:
        operand_shapes = _shapes(operands)
        if not operand_shapes:  # compiled HLO names its operands without their types: look them up
            for operand in re.findall(r"%([\w.\-]+)", operands):
                operand_shapes += _shapes(types.get(operand, ""))
        result.append(
            Collective(
                op=op,
                name=name,
                operand_shapes=tuple(shape for _, shape in operand_shapes),
                result_shapes=tuple(shape for _, shape in _shapes(type_text)),
                operand_bytes=sum(_DTYPE_BYTES[dtype] * int(np.prod(shape)) for dtype, shape in operand_shapes),
                runs=runs(comp),
            )
        )
    return result


def communication_report(
    batch: int = 8, vocab: int = 128256, shards: int = 8, dtype: str = "float32"
) -> dict[str, Any]:
    """Bytes one call of the vocabulary-parallel `sample` communicates, from its compiled HLO, against
    one all-gather of the same logits. Needs `shards` devices (on CPU:
    `XLA_FLAGS=--xla_force_host_platform_device_count=8`). The workload is the "full" one of the
    benchmarks: T 0.7, top-k 50, top-p 0.9, min-p 0.05, repetition 1.1 over a 512-token history.

    Returns `fixed_bytes` (collectives outside data-dependent loops, times their trip counts),
    `per_pass_bytes` (those inside the top-k / top-p snapping loops, per pass), `bound_bytes` (fixed +
    per pass x `MAX_PASSES`, the loops' cap), `gather_operand_bytes` / `gather_result_bytes` (what one
    device puts into / receives from an all-gather of the logits), `collectives` (count) and
    `largest_dim` (the largest dimension any collective moves)."""
    devices = jax.devices()
    if len(devices) < shards:
        raise ValueError(f"communication_report needs {shards} devices, this process has {len(devices)}")
    mesh = Mesh(np.array(devices[:shards]), ("vocab",))
    width = -(-vocab // shards)
    sharding = NamedSharding(mesh, P(None, "vocab") if vocab % shards == 0 else P())
    logits = jax.device_put(jnp.zeros((batch, vocab), dtype), sharding)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    history = jnp.zeros((batch, 512), jnp.int32)
    keys = jax.random.split(jax.random.key(0), batch)

    def sharded(x: jax.Array, p: SamplingParams, k: jax.Array, h: jax.Array) -> jax.Array:
        return sample(x, p, k, history=h, mesh=mesh, vocab_axis="vocab")

    found = collectives(jax.jit(sharded).lower(logits, params, keys, history).compile().as_text())
    fixed = sum(c.operand_bytes * c.runs for c in found if c.runs is not None)
    per_pass = sum(c.operand_bytes for c in found if c.runs is None)
    gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
    gathered = [c for c in collectives(gather.lower(logits).compile().as_text()) if c.op == "all-gather"]
    return {
        "batch": batch,
        "vocab": vocab,
        "shards": shards,
        "fixed_bytes": fixed,
        "per_pass_bytes": per_pass,
        "bound_bytes": fixed + per_pass * MAX_PASSES,
        "gather_operand_bytes": sum(c.operand_bytes for c in gathered),
        "gather_result_bytes": batch * shards * width * jnp.dtype(dtype).itemsize,
        "collectives": len(found),
        "largest_dim": max((c.largest_dim for c in found), default=0),
    }
