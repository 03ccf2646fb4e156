"""How fast the TPU kernel runs, without a TPU: libtpu's static cost model, with the loops counted.

Every figure here is a **static estimate (libtpu cost model), not measured on a TPU**. How one is made,
for one configuration (TPU generation x B x V x dtype x the stages a workload turns on):

1. **Trips.** The kernel runs in Pallas interpret mode on the workload's rows (`vsampler.tools.workloads`),
   with the generation's block plan, and writes how many trips each data-dependent loop took in each
   block of rows (`vsampler.core.trips`: the top-k and top-p searches' snapping passes, the draw's
   bisection; a cond around a search: taken or not). Their means over the blocks are the trips. They
   are measured on at least `TRIP_ROWS` rows of the workload (whole blocks), not only the call's B:
   a cond taken in a few blocks in a hundred (the candidates' fallback, about 2% of 16-row blocks on
   the workload's logits) would otherwise be seen in none of B=64's four blocks and cost nothing.
2. **Compiles with fixed trips.** libtpu's cost model counts a static-trip loop exactly but a
   data-dependent `while_loop` as 0 trips (and a data-dependent cond as not taken), so each loop is
   compiled as a `fori_loop` of fixed trips: once at the trips rounded to integers (every cond taken),
   and once more per loop with one more trip (per cond: not taken). (The profile flag reserves as much
   VMEM again as the kernel's limit: where a compile runs out, they all take half the VMEM as their
   limit, `profile_vmem_limit`. Where the compile with every cond taken still does not fit and no
   measured block took the candidates' whole-row fallback, it is compiled not taken instead: step 3
   would subtract that branch whole anyway; where some did, there is no estimate, and the message gives
   the compile without it as a lower bound. The breakdown's compile of one more trip of a loop whose
   cond no measured block took, which no estimate needs, may outgrow VMEM: that loop's cost is then
   left unmeasured.) The model's cycles are read from the profile libtpu
   writes with `--xla_jf_dump_static_llo_profile_to` (summed over the program's ops: the kernel's custom
   call and a few layout copies), in a subprocess, since the flag must be set before libtpu loads.
3. **The estimate** is the rounded compile plus, per loop, (mean trips - rounded trips) x the cycles of
   one more trip (per cond, (1 - fraction taken) x what the cond's branch costs subtracted): exact where
   the model is linear in the trips, which it is for a fixed-trip loop.

Time = cycles / the generation's clock (`CLOCK_HZ`); the floor = the HBM bytes one call moves (from the
compiled executable: about one read of the logits) / the generation's HBM bandwidth. The model leaves
out what a static schedule cannot know: DMA contention and HBM refresh, the launch, other work on the
chip; and libtpu's flags are undocumented (checked with `VERIFIED_LIBTPU`). The penalties' sparse
scatter before the kernel is not part of the kernel's estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

LABEL = "static estimate (libtpu cost model), not measured on a TPU"
VERIFIED_LIBTPU = "0.0.42"  # the libtpu whose (undocumented) profile flag and output format this reads
PROFILE_FLAG = "--xla_jf_dump_static_llo_profile_to"

# TensorCore clocks. v4: 1050 MHz (Jouppi et al., "TPU v4", ISCA 2023, Table 1). v5e: 1.5 GHz, from
# Google's published 197 bf16 TFLOP/s = 4 MXUs x 128 x 128 x 2 flops x 1.50 GHz. v5p: 459 TFLOP/s over
# 2 TensorCores x 4 MXUs x 128 x 128 x 2 gives 1.75 GHz. v6e: 918 TFLOP/s over 4 MXUs of 256 x 256
# x 2 gives 1.75 GHz. v5p and v6e are derived, not published clocks: uncertain (Google's v6e page has
# said both 2 and 4 MXUs; 2 would imply an implausible 3.5 GHz).
CLOCK_HZ: dict[str, float] = {"v4": 1.05e9, "v5e": 1.5e9, "v5p": 1.75e9, "v6e": 1.75e9}
CLOCK_SOURCES: dict[str, str] = {
    "v4": "published (TPU v4 paper)",
    "v5e": "derived from peak bf16 TFLOP/s",
    "v5p": "derived from peak bf16 TFLOP/s (uncertain)",
    "v6e": "derived from peak bf16 TFLOP/s (uncertain)",
}

# generations libtpu's cost model cannot profile (it aborts the compiling process on them): why, in short
UNMODELLED: dict[str, str] = {"v4": "not modelled by libtpu's cost model (v5e, v5p, v6e only)"}
UNMODELLED_DETAIL = (
    "v4: libtpu's static profile aborts the compile with 'Dma latency model is currently only supported on "
    "VF/VL/GF/GL' (v5p, v5e, v6e): no estimate; the kernel still compiles for v4 (compile-check without "
    "--estimate)"
)

_ESTIMATE = re.compile(r'hlo_op_name:\s*"([^"]+)"\s*estimated_cycles:\s*(\d+)')
_RESULT_PREFIX = "VSAMPLER-ESTIMATE "


class TpuEstimateUnavailable(RuntimeError):
    """libtpu, or its static profile, is not available here: no estimate (never a silent zero)."""


class WorkerDied(TpuEstimateUnavailable):
    """The compile worker exited during a compile (libtpu aborted): that configuration has no estimate."""


# what a dying compile worker's stderr says that matters, most telling first; and the lines of the
# crash handlers (a core-dump hook, a stack dump) that say nothing about why, unless they are FATAL
_FATAL = re.compile(r"^F\d{4} ")  # a glog FATAL line: libtpu's own check, or its allocator's
_DEATH_CLUES = (
    _FATAL,
    re.compile(r"Check failed|RESOURCE_EXHAUSTED|bad_alloc|Cannot allocate|MemoryError|out of memory", re.I),
    re.compile(r"^terminate called|^\w*Error: "),
)
_CRASH_NOISE = re.compile(r"coredump|process_state\.cc|logmanagerd|RAW: |^\*\*\* |^PC: |^\s*@\s")


def death_message(returncode: int | None, stderr: str) -> str:
    """Why the compile worker died, in one line: how it ended (an exit status, or the signal that killed
    it: SIGKILL is most often the host running out of memory) and the most telling line of its stderr
    (a libtpu FATAL check, an allocation failure, a Python error), not the crash handlers' own lines."""
    if returncode is None:
        how = "stopped answering"
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"was killed by {name}" + (" (the host out of memory?)" if name == "SIGKILL" else "")
    else:
        how = f"exited with status {returncode}"
    lines = [line.strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and (_FATAL.search(line) or not _CRASH_NOISE.search(line))]
    for clue in _DEATH_CLUES:
        found = [line for line in lines if clue.search(line)]
        if found:
            why = " (ENOMEM: the host out of memory)" if "mmap error: 12" in found[0] else ""
            return f"libtpu aborted the profiling compile (the worker {how}): {found[0][:400]}{why}"
    last = f": {lines[-1][:400]}" if lines else " (nothing on its stderr)"
    return f"libtpu aborted the profiling compile (the worker {how}){last}"


def read_static_profile(directory: str | os.PathLike) -> dict[str, int]:
    """The estimated cycles per HLO op from the `*_static_llo_profile.textproto` files libtpu wrote."""
    cycles: dict[str, int] = {}
    for path in sorted(Path(directory).glob("*static_llo_profile.textproto")):
        for name, n in _ESTIMATE.findall(path.read_text()):
            cycles[name] = cycles.get(name, 0) + int(n)
    return cycles


def libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# the compile worker: a subprocess with the profile flag set before libtpu loads


class ProfileWorker:
    """A subprocess that compiles kernel configurations deviceless (`compile_check.compile_tpu`) with
    libtpu's static profile on, one JSON job per line, and answers each with the compile's result and
    the model's cycles per op. `profile=False`: the same compiles without the profile flag (no cycles),
    to tell whether a configuration the profiled compile could not fit fits without it. Use as a context
    manager, or `close()` it."""

    def __init__(self, profile: bool = True) -> None:
        if libtpu_version() is None:
            raise TpuEstimateUnavailable("libtpu is not installed: pip install 'vsampler[tpu]'")
        self._dir = tempfile.TemporaryDirectory(prefix="vsampler-profile-")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        flags = env.get("LIBTPU_INIT_ARGS", "")
        if profile:
            env["LIBTPU_INIT_ARGS"] = f"{flags} {PROFILE_FLAG}={self._dir.name}".strip()
        else:
            env["LIBTPU_INIT_ARGS"] = " ".join(f for f in flags.split() if not f.startswith(PROFILE_FLAG))
        env["JAX_PLATFORMS"] = "cpu"  # deviceless: no TPU probe
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vsampler.tools._estimate_worker",
                self._dir.name,
                *([] if profile else ["--no-profile"]),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def compile(self, job: dict[str, Any]) -> dict[str, Any]:
        """One compile: `job` holds `compile_check.compile_tpu`'s arguments (`trips` as a dict)."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            for line in self._proc.stdout:
                if line.startswith(_RESULT_PREFIX):
                    return json.loads(line[len(_RESULT_PREFIX) :])
        except BrokenPipeError:
            pass
        try:
            returncode = self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            returncode = None
        self._stderr.seek(0)
        raise WorkerDied(death_message(returncode, self._stderr.read()[-20000:]))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> ProfileWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_worker(directory: str, jobs: Iterator[str], out: Any, profile: bool = True) -> None:
    """The worker's loop (`python -m vsampler.tools._estimate_worker DIR [--no-profile]`): compile each job,
    answer with the cycles libtpu's profile gives for it (none with `profile=False`), then clear the
    profile for the next one."""
    from vsampler.core.trips import FixedTrips
    from vsampler.tools import compile_check

    for line in jobs:
        job = json.loads(line)
        trips = job.pop("trips", None)
        for path in Path(directory).glob("*"):
            path.unlink()
        try:
            r = compile_check.compile_tpu(**job, trips=None if trips is None else FixedTrips.of(trips))
            answer = dataclasses.asdict(r)
            answer["cycles"] = read_static_profile(directory) if r.ok and profile else {}
            if r.ok and profile and not answer["cycles"]:
                answer["ok"] = False
                answer["error"] = (
                    f"libtpu wrote no static profile ({PROFILE_FLAG} unsupported by libtpu {libtpu_version()}?)"
                )
        except compile_check.TpuCompilerUnavailable as err:
            answer = {"ok": False, "error": str(err), "cycles": {}, "block_rows": 0}
        out.write(_RESULT_PREFIX + json.dumps(answer) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------------
# one configuration's estimate


@dataclasses.dataclass(frozen=True)
class EstimateCase:
    """What is estimated: a workload config (`vsampler.tools.workloads.CONFIGS`) on one TPU generation;
    `allowed`: with the workload's allowed-token mask; `top_n`: with that many log-prob entries."""

    generation: str
    batch: int
    vocab: int
    dtype: str = "float32"
    config: str = "full"
    allowed: bool = False
    top_n: int | None = None

    @property
    def label(self) -> str:
        extra = (" +mask" if self.allowed else "") + (f" +logprobs {self.top_n}" if self.top_n is not None else "")
        return f"{self.generation} {self.config} B={self.batch} V={self.vocab} {self.dtype}{extra}"


@dataclasses.dataclass
class LoopCost:
    """One data-dependent loop: its mean trips per block (0 in blocks its cond did not run) and what one
    more trip in every block costs; a loop inside a cond also names it (`guard`) and the fraction of
    blocks that ran it."""

    loop: str
    trips: float
    # 0 where not compiled (whole-number trips, no breakdown asked); None where the breakdown's compile
    # of one more trip ran out of VMEM in a loop whose cond no measured block took (no trip counted)
    cycles_per_trip: int | None
    guard: str | None = None
    taken: float = 1.0

    @property
    def cycles(self) -> float:
        return self.trips * (self.cycles_per_trip or 0)


@dataclasses.dataclass
class GuardCost:
    """A data-dependent cond that holds loops: the fraction of blocks that took it and what its branch
    costs in a block, without its loops' trips (0 where not compiled: always taken, no breakdown)."""

    guard: str
    taken: float
    branch_cycles: int = 0

    @property
    def cycles(self) -> float:
        return self.taken * self.branch_cycles


@dataclasses.dataclass
class KernelEstimate:
    case: EstimateCase
    ok: bool
    error: str = ""
    variant: str = ""  # "resident", or "chunked (N copies)"
    block_rows: int = 0
    blocks: int = 0  # the call's blocks of rows
    trip_blocks: int = 0  # the blocks the trips were measured on (`measure_trips`)
    cycles: float = 0.0  # the estimate, every loop counted
    compiled_cycles: int = 0  # the compile at the rounded trips
    loops: list[LoopCost] = dataclasses.field(default_factory=list)
    guards: list[GuardCost] = dataclasses.field(default_factory=list)
    # breakdown: what each stage adds; they add up to the compile they were measured from
    stages: dict[str, int] = dataclasses.field(default_factory=dict)
    hbm_bytes: int = 0
    logits_bytes: int = 0
    libtpu: str | None = None
    # False where the profiled compile with the candidates' whole-row fallback did not fit, even at half
    # the VMEM as its limit, and no measured block took it: the estimate is then the compile without it
    fallback_compiled: bool = True
    # where the profiled compile at the policy's VMEM limit ran out: the limit it took (`profile_vmem_limit`)
    profile_vmem_limit_bytes: int = 0

    @property
    def seconds(self) -> float:
        return self.cycles / CLOCK_HZ[self.case.generation]

    @property
    def floor_seconds(self) -> float:
        """The HBM bytes one call moves at the generation's bandwidth: what no kernel can beat."""
        from vsampler.kernels import block_sizes

        return self.hbm_bytes / block_sizes.TPU_GENERATIONS[self.case.generation].hbm_bytes_per_s

    @property
    def x_floor(self) -> float:
        return self.seconds / self.floor_seconds if self.floor_seconds else math.inf

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            label=LABEL,
            estimated_us=self.seconds * 1e6,
            floor_us=self.floor_seconds * 1e6,
            x_floor=self.x_floor,
            clock_hz=CLOCK_HZ[self.case.generation],
        )
        return out


def _workload_operands(case: EstimateCase) -> tuple[Any, ...]:
    """The kernel operands of the case's workload, as `vsampler.impls.pallas.kernel_operands` builds them."""
    from vsampler.core import inputs
    from vsampler.impls import pallas
    from vsampler.tools import verification, workloads

    w = workloads.make_inputs(workloads.Workload(case.config, case.batch, case.vocab, case.dtype))
    mask = verification.allowed_mask(case.batch, case.vocab) if case.allowed else None
    inp = inputs.prepare(
        w.logits,
        w.params,
        w.key,
        history=w.history,
        prompt_len=w.prompt_len,
        eos_token_id=verification.EOS if case.allowed else None,
        allowed_tokens=mask,
    )
    return pallas.kernel_operands(inp)


# the least number of rows the trips are measured on (`measure_trips`): 64 blocks of 16 rows
TRIP_ROWS = 1024


def trip_rows(batch: int, block_rows: int, least: int = TRIP_ROWS) -> int:
    """How many workload rows the trips of a B=`batch` call are measured on: at least `least`, in whole
    grid steps of `block_rows` (the plan's `step_rows`)."""
    rows = max(batch, least)
    return -(-rows // block_rows) * block_rows


def measure_trips(case: EstimateCase, plan: Any, least: int = TRIP_ROWS) -> tuple[dict[str, bool], Any]:
    """Runs the kernel in interpret mode on `trip_rows(B, R, least)` rows of the case's workload (B
    itself where it is larger) with `plan`'s blocks: the stage flags and the (blocks, STAT_COLUMNS)
    statistics of each block's first row (its loops' trips)."""
    import functools

    import jax
    import numpy as np

    from vsampler.impls import pallas

    rows_measured = trip_rows(case.batch, plan.step_rows, least)
    x, rows, eos, allowed, config = _workload_operands(dataclasses.replace(case, batch=rows_measured))
    plan = dataclasses.replace(plan, padded_batch=rows_measured)
    launch = functools.partial(pallas.tpu_launch, plan, config=config.replace(top_n=case.top_n), interpret=True)
    stats = jax.jit(launch)(x, rows, eos, allowed)[2]
    stages = {**config.filters, "random": config.random, "min_tokens": config.min_tokens}
    return stages, np.asarray(stats)[:: plan.block_rows]


def _sites(plan: Any) -> tuple[Any, ...]:
    from vsampler.kernels import chunked_passes
    from vsampler.kernels import sampler as kernel

    return kernel.SITES if plan.chunk is None else chunked_passes.SITES


def estimate(
    case: EstimateCase, worker: ProfileWorker, *, breakdown: bool = False, trips_cache: dict | None = None
) -> KernelEstimate:
    """The static estimate of one configuration (module docstring: how), with `worker` compiling.
    `breakdown`: also the cost of one trip of every loop (one compile each; without it, only loops whose
    mean trips are not whole numbers, and conds not always taken, need theirs) and what each stage adds
    (one compile per stage, each removed in turn from the last); `trips_cache`: measured trips shared
    across generations whose block plans agree."""
    import numpy as np

    from vsampler.kernels import block_sizes

    result = KernelEstimate(case, ok=False, libtpu=libtpu_version())
    if case.generation in UNMODELLED:
        result.error = UNMODELLED[case.generation]
        return result
    try:
        plan = block_sizes.plan(case.batch, case.vocab, case.dtype, case.generation, case.allowed)
    except ValueError as err:
        result.error = str(err)
        return result
    # the trips depend on the rows measured, not on B: batches measured on the same rows share them
    rows_measured = trip_rows(case.batch, plan.step_rows)
    key = (rows_measured, case.vocab, case.dtype, case.config, case.allowed, case.top_n, plan.block_rows, plan.chunk)
    key += (plan.group_rows, plan.deep_group_rows)
    if trips_cache is not None and key in trips_cache:
        stages, per_block = trips_cache[key]
    else:
        stages, per_block = measure_trips(case, plan)
        if trips_cache is not None:
            trips_cache[key] = (stages, per_block)
    result.block_rows, result.blocks = plan.block_rows, plan.padded_batch // plan.block_rows
    result.trip_blocks = per_block.shape[0]
    result.variant = (
        "resident" if plan.chunk is None else f"chunked ({plan.buffers} {'copy' if plan.buffers == 1 else 'copies'})"
    )

    # per loop: mean trips (a guarded loop's column holds 0 = cond not taken, else 1 + trips)
    means: dict[str, tuple[float, float]] = {}
    for site in _sites(plan):
        column = per_block[:, site.column]
        if site.guard is None:
            means[site.loop] = (float(column.mean()), 1.0)
        else:
            means[site.loop] = (float(np.maximum(column - 1, 0).mean()), float((column > 0).mean()))
    fixed = {loop: round(t) for loop, (t, _) in means.items()}
    fixed.update({site.guard: 1 for site in _sites(plan) if site.guard})
    base_job = {
        "generation": case.generation,
        "batch": case.batch,
        "vocab": case.vocab,
        "dtype": case.dtype,
        "allowed": case.allowed,
        "top_n": case.top_n,
        **stages,
    }

    base_fits = False  # the first compile fitted at the policy's limit (or at half the VMEM)

    def cycles(trips: dict[str, int], **changes: Any) -> dict[str, Any]:
        job = {**base_job, **changes, "trips": trips}
        answer = worker.compile(job)
        retry = not answer["ok"] and base_fits and "vmem_limit_bytes" not in job
        limit = profile_vmem_limit(case.generation, plan) if retry else None
        if limit and _VMEM_EXHAUSTED.search(answer["error"]):
            # a later compile (more trips of a loop) that the profile flag's reservation pushes out of VMEM
            # where the first fitted: that one alone at half the VMEM, its cycles the same at any limit
            # (`profile_vmem_limit`; the grouped kernel's `top_p`, v5e, B=64, V=128256, float32)
            answer = worker.compile({**job, "vmem_limit_bytes": limit})
        if not answer["ok"]:
            raise _CompileFailed(answer["error"])
        return answer

    conds = _conds(case, plan, stages)
    # the fraction of measured blocks that took the candidates' whole-row fallback (None: no such cond)
    fallback_taken = max((means[s.loop][1] for s in _sites(plan) if s.guard == FALLBACK), default=None)
    plain_job = dict(base_job)  # the kernel as it runs: the policy's VMEM limit
    first_error = ""  # the profiled compile's at the policy's limit, where it ran out of VMEM
    try:
        try:
            base = cycles(fixed)
        except _CompileFailed as err:
            limit = profile_vmem_limit(case.generation, plan)
            if not (_VMEM_EXHAUSTED.search(str(err)) and limit):
                raise
            first_error = str(err)
            base_job["vmem_limit_bytes"] = result.profile_vmem_limit_bytes = limit
            try:
                base = cycles(fixed)
            except _CompileFailed as err:
                # The fallback's whole-row branch can still outgrow VMEM, or that limit, where the rest
                # of the kernel fits. Where no measured block took it, the estimate subtracts that
                # branch whole, so the compile without it is the estimate itself.
                if not (_out_of_vmem(str(err)) and FALLBACK in conds and fallback_taken == 0):
                    raise
                fixed = {**fixed, FALLBACK: 0}
                base = cycles(fixed)
                result.fallback_compiled = False
        base_fits = True
        result.compiled_cycles = sum(base["cycles"].values())
        result.hbm_bytes = base["argument_bytes"] + base["output_bytes"]
        result.logits_bytes = base["logits_bytes"]
        estimate_cycles = float(result.compiled_cycles)
        running = [site for site in _sites(plan) if _site_runs(site.loop, stages, conds)]
        # a guarded site whose cond this configuration's kernel lacks runs unguarded (taken: 1)
        guard_of = {site.loop: site.guard if site.guard in conds else None for site in running}
        taken_by_guard = {guard_of[site.loop]: means[site.loop][1] for site in running if guard_of[site.loop]}
        for site in running:
            t, taken = means[site.loop]
            guard = guard_of[site.loop]
            loop = LoopCost(site.loop, t, 0, guard, taken)
            # one more trip's cost: for fractional trips, and for a loop whose cond's cost is needed
            guard_partial = guard is not None and taken_by_guard[guard] < 1 and fixed[site.loop] > 0
            if breakdown or t != fixed[site.loop] or guard_partial:
                # between two fixed-trip compiles: at 0 trips the site stays a while loop, whose own
                # overhead (spills around it) a first fixed trip can remove, not add
                n = max(fixed[site.loop], 1)
                try:
                    at_n = result.compiled_cycles if n == fixed[site.loop] else _total(cycles({**fixed, site.loop: n}))
                    loop.cycles_per_trip = _total(cycles({**fixed, site.loop: n + 1})) - at_n
                except _CompileFailed as err:
                    # only the breakdown asks a trip's cost of a loop whose cond no measured block took
                    # (none of its trips is counted); where that compile outgrows VMEM (the whole-row
                    # fallback's loops at tpu-inference's setting: v5e, bfloat16, V=262144), the row
                    # says so
                    if not (guard and taken_by_guard[guard] == 0 and _out_of_vmem(str(err))):
                        raise
                    loop.cycles_per_trip = None
                else:
                    estimate_cycles += (t - fixed[site.loop]) * loop.cycles_per_trip
            result.loops.append(loop)
        untaken: dict[str, int] = {}  # per cond: the compile with it not taken
        for guard, taken in taken_by_guard.items():
            cost = GuardCost(guard, taken)
            if not result.fallback_compiled and guard == FALLBACK:  # not compiled: taken in no block
                untaken[guard] = result.compiled_cycles
            elif breakdown or taken < 1:
                without = untaken[guard] = _total(cycles({**fixed, guard: 0}))
                inside = sum(fixed[lp.loop] * (lp.cycles_per_trip or 0) for lp in result.loops if lp.guard == guard)
                # the branch's cost with its loops at their rounded trips, less those trips
                cost.branch_cycles = result.compiled_cycles - without - inside
                estimate_cycles -= (1 - taken) * cost.branch_cycles
            result.guards.append(cost)
        result.cycles = estimate_cycles
        if breakdown:
            # the resident kernel's stages as most blocks run them: on the candidates, the fallback not
            # taken (it has its own row, by the blocks that took it)
            apart = FALLBACK in untaken
            total = untaken[FALLBACK] if apart else result.compiled_cycles
            stage_trips = {**fixed, FALLBACK: 0} if apart else fixed
            result.stages = _stage_breakdown(case, plan, stages, stage_trips, total, cycles)
    except _CompileFailed as err:
        result.error = first_error or str(err)
        out_of_vmem = _VMEM_EXHAUSTED.search(result.error)
        if out_of_vmem:
            diagnosed = _profiled_vmem_diagnosis(plain_job, result.error, out_of_vmem)
            fits_plainly, result.error = diagnosed != result.error, diagnosed
            if first_error and fits_plainly:
                result.error += f"; under half the VMEM as its limit: {_vmem_shortfall(str(err))}"
            if FALLBACK in conds and fixed.get(FALLBACK) and fallback_taken:
                result.error += _without_fallback_bound(result, fixed, fallback_taken, cycles)
        return result
    result.ok = True
    return result


def profile_vmem_limit(generation: str, plan: Any) -> int | None:
    """The scoped-VMEM limit a profiled compile takes where it ran out of VMEM at the policy's: half the
    generation's VMEM (None where the policy's limit is no larger). libtpu's profile flag reserves as
    much VMEM again as the kernel's limit (libtpu 0.0.42, v5e, bfloat16, `top_k`, V=256000, fixed trips:
    the kernel uses 23.1 MiB, the profiled compile at the policy's 112 MiB limit needs 135.2), so a
    kernel that uses up to half the VMEM fits profiled under a limit of half. The model's cycles do not
    depend on the limit (the same, to the cycle, at 65.8, 64 and 48 MiB for B=64, V=128256, the fallback
    taken or not, and at 64 and 48 MiB for V=256000 without it; with it the kernel needs 48.9 MiB)."""
    from vsampler.kernels import block_sizes

    half = block_sizes.TPU_GENERATIONS[generation].vmem_bytes // 2
    return half if plan.vmem_limit_bytes is not None and plan.vmem_limit_bytes > half else None


# libtpu's words when a compile does not fit VMEM
_VMEM_EXHAUSTED = re.compile(r"Ran out of memory in memory space vmem\. Used ([\d.]+)M of ([\d.]+)M")


def _out_of_vmem(error: str) -> bool:
    """Whether a compile failed for VMEM: the chip's, or the kernel's scoped limit."""
    from vsampler.tools.compile_check import SCOPED_VMEM_EXCEEDED

    return bool(_VMEM_EXHAUSTED.search(error) or SCOPED_VMEM_EXCEEDED.search(error))


def _vmem_shortfall(error: str) -> str:
    """A VMEM failure in a few words (the error itself where it is not one)."""
    from vsampler.tools.compile_check import SCOPED_VMEM_EXCEEDED

    if scoped := SCOPED_VMEM_EXCEEDED.search(error):
        return f"the kernel needs {scoped.group(1)} MiB, over that {scoped.group(2)} MiB limit"
    if used := _VMEM_EXHAUSTED.search(error):
        return f"needs {used.group(1)} MiB of the {used.group(2)} MiB there are"
    return error


def _profiled_vmem_diagnosis(job: dict[str, Any], error: str, used: re.Match) -> str:
    """Why a profiled compile ran out of VMEM: libtpu's static-profile flag alone raises the kernel's
    scoped VMEM (measured, libtpu 0.0.42, v5e, B=64, V=256000, bfloat16, top-p: 47.5 MiB compiled
    plainly, 159.6 MiB with the flag, over the 128 MiB there are). The same configuration is compiled
    again without the flag: where it fits, the kernel runs and only the estimate is missing, which the
    message says; where it does not, the compiler's own error stands (a block-size policy bug). `used`:
    `_VMEM_EXHAUSTED`'s match in `error`."""
    try:
        with ProfileWorker(profile=False) as plain:
            answer = plain.compile({**job, "trips": None})
    except TpuEstimateUnavailable:
        return error
    if not answer["ok"]:
        return error
    return (
        f"no estimate: libtpu's profiling compile needs {used.group(1)} MiB of VMEM of the {used.group(2)} MiB "
        f"there are (its static-profile flag raises the kernel's VMEM use); the kernel itself compiles and uses "
        f"{answer['vmem_used_bytes'] / 2**20:.1f} MiB of its {answer['vmem_limit_bytes'] / 2**20:.1f} MiB limit"
    )


def _without_fallback_bound(result: KernelEstimate, fixed: dict[str, int], taken: float, cycles: Any) -> str:
    """Where the profiled compile with the whole-row fallback outgrew VMEM and some measured blocks took
    it: what the kernel costs without that branch, a lower bound (the message's tail; '' if that compile
    fails too)."""
    try:
        answer = cycles({**fixed, FALLBACK: 0})
    except _CompileFailed:
        return ""
    bound = dataclasses.replace(
        result,
        cycles=float(_total(answer)),
        hbm_bytes=answer["argument_bytes"] + answer["output_bytes"],
    )
    return (
        f"; without the whole-row fallback (taken in {_share(taken)} of blocks, not counted) it compiles to "
        f"{bound.cycles:,.0f} cycles, {_us(bound.seconds)} us, {bound.x_floor:.1f}x the floor: a lower bound"
    )


class _CompileFailed(Exception):
    pass


def _total(answer: dict[str, Any]) -> int:
    return sum(answer["cycles"].values())


# the resident kernel's candidate path: its loops, and the cond around its whole-row fallback
CANDIDATE_LOOPS = frozenset({"candidate_top_k", "candidate_top_p", "row_mass"})
FALLBACK = "fallback"


def _on_candidate_path(vocab: int, plan: Any, stages: dict[str, Any], allowed: bool) -> bool:
    """Whether the kernel for these stage flags takes the resident kernel's candidate path (the chunked
    variant has none)."""
    from vsampler.kernels import sampler as kernel

    flags = {name: bool(stages.get(name)) for name in ("top_k", "top_p", "min_p", "random")}
    return plan.chunk is None and kernel.uses_candidates(vocab, allowed=allowed, **flags)


def _conds(case: EstimateCase, plan: Any, stages: dict[str, bool]) -> frozenset[str]:
    """The guards (data-dependent conds) the kernel has for this configuration: the chunked variant's
    always; the resident kernel's whole-row fallback only where it takes the candidate path (otherwise
    its whole-row loops run unguarded)."""
    from vsampler.kernels import chunked_passes

    if plan.chunk is not None:
        return frozenset(site.guard for site in chunked_passes.SITES if site.guard)
    return frozenset({FALLBACK}) if _on_candidate_path(case.vocab, plan, stages, case.allowed) else frozenset()


def _site_runs(loop: str, stages: dict[str, bool], conds: frozenset[str]) -> bool:
    """Whether a kernel loop exists with these stage flags (the draw's and searches' need sampling; the
    candidate path's, the candidate path: `conds` holds its fallback)."""
    if not stages["random"]:
        return False
    if loop in CANDIDATE_LOOPS and FALLBACK not in conds:
        return False
    if loop.startswith(("top_k", "candidate_top_k")):
        return stages["top_k"]
    if loop in ("top_p", "candidate_top_p", "row_mass"):
        return stages["top_p"]
    return True


def _stage_breakdown(
    case: EstimateCase, plan: Any, stages: dict[str, bool], fixed: dict[str, int], total: int, cycles: Any
) -> dict[str, int]:
    """What each stage adds at the trips `fixed` (the compile of `total` cycles): stages removed one at a
    time from the last (log-prob values, the mask, min-p, top-p, top-k, then temperature + the draw),
    each the difference between consecutive compiles; what remains is the base (loads, sanitising, the
    first maximum, EOS, outputs: the greedy kernel). A removal that would move the resident kernel
    between its candidate path and its whole-row path (the last of top-k, top-p and min-p, or the
    mask), or between its candidate depths (the last of top-k and min-p beside top-p), is not made: the
    other path is another program, not this one less a stage, so the path's cost with the stages still
    on it and the draw is one row, against the greedy kernel."""
    from vsampler.kernels import sampler as kernel

    def on_candidates(flags: dict[str, Any]) -> int | None:  # the candidates' depth, None off their path
        if not _on_candidate_path(case.vocab, plan, flags, flags["allowed"]):
            return None
        return kernel.candidate_depth(top_k=bool(flags["top_k"]), min_p=bool(flags["min_p"]))

    removals: list[tuple[str, dict[str, Any]]] = []
    if case.top_n is not None:
        removals.append(("log-prob values", {"top_n": None}))
    if case.allowed:
        removals.append(("allowed-token mask", {"allowed": False}))
    for flag, name in (("min_p", "min-p"), ("top_p", "top-p search"), ("top_k", "top-k search")):
        if stages["random"] and stages[flag]:
            removals.append((name, {flag: False}))
    greedy = {"top_k": False, "top_p": False, "min_p": False, "random": False}
    steps: list[tuple[str, dict[str, Any]]] = []
    flags: dict[str, Any] = {**stages, "allowed": case.allowed}
    for i, (name, change) in enumerate(removals):
        if on_candidates(flags) != on_candidates({**flags, **change}):
            path = "candidate path: column pass, fold" if on_candidates(flags) is not None else "whole-row path"
            rest = [n for n, c in removals[i:] if "allowed" not in c]  # a mask stays in the greedy base
            steps.append((", ".join([path, *rest, "temperature + draw"]), greedy))
            break
        steps.append((name, change))
        flags.update(change)
    else:
        if stages["random"]:
            steps.append(("temperature + draw", greedy))
    out: dict[str, int] = {}
    changes: dict[str, Any] = {}
    before = total
    for name, change in steps:
        changes.update(change)
        after = _total(cycles(fixed, **changes))
        out[name] = before - after
        before = after
    mask = "the allowed-token mask, " if flags["allowed"] else ""
    out[f"base (loads, sanitising, {mask}first maximum, EOS, outputs)"] = before
    return out


def estimate_grid(
    cases: Sequence[EstimateCase], *, breakdown: bool = False, progress: Any = None
) -> list[KernelEstimate]:
    """Estimates every case with one compile worker (`progress(label)` after each)."""
    trips_cache: dict = {}
    results = []
    worker = ProfileWorker()
    try:
        for case in cases:
            try:
                results.append(estimate(case, worker, breakdown=breakdown, trips_cache=trips_cache))
            except WorkerDied as err:
                results.append(KernelEstimate(case, ok=False, error=str(err), libtpu=libtpu_version()))
                worker.close()
                worker = ProfileWorker()
            if progress is not None:
                progress(case.label)
    finally:
        worker.close()
    return results


# ---------------------------------------------------------------------------------------------------
# reports


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits and no exponent (0.00488, 41.2, 290, 1234): a small
    estimate never rounds to 0."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


def _us(seconds: float) -> str:
    return significant(seconds * 1e6)


def _share(fraction: float) -> str:
    """A fraction of blocks as a percentage: one decimal below 10% (a cond taken in 2 of 64 blocks is 3.1%)."""
    return f"{fraction:.1%}" if 0 < fraction < 0.1 else f"{fraction:.0%}"


def loops_summary(r: KernelEstimate) -> str:
    """Each loop's mean trips per block (a guarded one: also the fraction of blocks that ran it)."""
    parts = []
    for loop in r.loops:
        taken = f" in {_share(loop.taken)} of blocks" if loop.guard and loop.taken < 1 else ""
        parts.append(f"{loop.loop} {loop.trips:.2f}{taken}")
    return ", ".join(parts) or "-"


def table(results: Sequence[KernelEstimate]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows: one row per estimate (the failures with their reason)."""
    columns = [
        "gen",
        "config",
        "B",
        "V",
        "dtype",
        "variant",
        "cycles",
        "est. us",
        "HBM floor us",
        "x floor",
        "loop trips",
    ]
    rows = []
    for r in results:
        c = r.case
        label = [c.generation, c.config, str(c.batch), str(c.vocab), c.dtype.replace("float", "f")]
        if r.ok:
            rows.append(
                [
                    *label,
                    r.variant,
                    f"{r.cycles:,.0f}",
                    _us(r.seconds),
                    _us(r.floor_seconds),
                    f"{r.x_floor:.1f}",
                    loops_summary(r),
                ]
            )
        else:
            rows.append([*label, "no estimate", "", "", "", "", r.error[:300]])
    return columns, rows


def breakdown_table(r: KernelEstimate) -> tuple[list[str], list[list[str]]]:
    """Where one estimate's cycles go: each loop's trips, then what each stage adds (`estimate(...,
    breakdown=True)`), as cycles and shares of the estimate."""
    rows = []
    for loop in r.loops:
        if loop.cycles_per_trip is None:
            what = f"{loop.trips:.2f} trips; one more trip's compile outgrew VMEM"
        else:
            what = f"{loop.trips:.2f} trips x {loop.cycles_per_trip:,} cycles"
        if loop.guard:
            what += f" (inside {loop.guard})"
        rows.append([f"loop: {loop.loop}", what, f"{loop.cycles:,.0f}", f"{loop.cycles / r.cycles:.1%}"])
    for guard in r.guards:
        what = f"run in {_share(guard.taken)} of blocks x {guard.branch_cycles:,} cycles (its loops apart)"
        rows.append([f"cond: {guard.guard}", what, f"{guard.cycles:,.0f}", f"{guard.cycles / r.cycles:.1%}"])
    fallback_apart = bool(r.stages) and any(g.guard == FALLBACK for g in r.guards)
    how = "at the rounded trips" + (", fallback not taken" if fallback_apart else "")
    for stage, n in r.stages.items():
        rows.append([f"stage: {stage}", how, f"{n:,}", f"{n / r.cycles:.1%}"])
    correction = r.cycles - (sum(r.stages.values()) if r.stages else r.compiled_cycles)
    if correction:
        what = "the fallback's blocks and fractional trips" if fallback_apart else "fractional trips"
        rows.append([what, "estimate less the stages' compile", f"{correction:,.0f}", f"{correction / r.cycles:.1%}"])
    return ["part", "how", "cycles", "share"], rows


def notes(results: Sequence[KernelEstimate]) -> list[str]:
    """The label every estimate carries and what it rests on."""
    gens = sorted({r.case.generation for r in results})
    clocks = ", ".join(f"{g} {CLOCK_HZ[g] / 1e9:.2f} GHz ({CLOCK_SOURCES[g]})" for g in gens)
    version = libtpu_version()
    out = [
        f"All times: {LABEL}. Clocks: {clocks}. HBM floor: the bytes one call moves (from the compiled "
        "executable) at the generation's HBM bandwidth. Loop trips: mean per block of rows, measured in "
        f"interpret mode on at least {TRIP_ROWS} rows of the workload (B where larger); the estimate counts "
        "them (vsampler/tools/estimate.py says how).",
    ]
    if any(g in UNMODELLED for g in gens):
        out.append(UNMODELLED_DETAIL)
    capped = sorted({(r.case.generation, r.profile_vmem_limit_bytes) for r in results if r.profile_vmem_limit_bytes})
    if capped:
        limits = ", ".join(f"{gen} {limit / 2**20:.0f} MiB" for gen, limit in capped)
        out.append(
            f"Where a profiled compile ran out of VMEM at the block-size policy's limit, it took a limit of half "
            f"the VMEM ({limits}): libtpu's profile flag reserves as much VMEM again as the limit, and the "
            "model's cycles do not depend on it (vsampler/tools/estimate.py, profile_vmem_limit)"
        )
    uncompiled = [r.case.label for r in results if r.ok and not r.fallback_compiled]
    if uncompiled:
        out.append(
            f"{'; '.join(uncompiled)}: the profiled compile with the candidates' whole-row fallback did not fit "
            "(libtpu's profile flag reserves as much VMEM again as the kernel's limit) and no measured block took "
            "that branch, so the compile without it is the estimate (the estimate subtracts an untaken branch whole)"
        )
    if version is not None and not version.startswith(VERIFIED_LIBTPU):
        out.append(f"libtpu {version}: the profile format was verified with {VERIFIED_LIBTPU} only")
    return out


# ---------------------------------------------------------------------------------------------------
# the bench's headline estimates, cached on disk (the estimate is a pure function of the code and libtpu)

HEADLINE_GENERATIONS = ("v5e", "v6e")


def headline_cases(configs: Sequence[str], batch: int, vocab: int) -> list[EstimateCase]:
    """The cases `vsampler bench` estimates beside its CPU timings: each config at the run's largest
    batch and vocabulary, float32, on v5e and v6e."""
    return [EstimateCase(gen, batch, vocab, "float32", config) for gen in HEADLINE_GENERATIONS for config in configs]


def _code_fingerprint() -> str:
    """What an estimate depends on: the kernels' and this package's sampling sources, jax and libtpu."""
    import hashlib

    import jax

    import vsampler
    from vsampler import kernels

    digest = hashlib.sha256(f"{jax.__version__} {libtpu_version()}".encode())
    for folder in (Path(kernels.__file__).parent, Path(vsampler.__file__).parent):
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vsampler" / "estimates.json"


def cached_estimates(
    cases: Sequence[EstimateCase], cache_path: Path | None = None, progress: Any = None, compute: bool = True
) -> list[dict[str, Any]] | None:
    """`estimate_grid(cases)` as `KernelEstimate.as_dict()`s, reusing those computed before by the same
    code (`_code_fingerprint`) and libtpu, from a JSON file (default `~/.cache/vsampler/estimates.json`).
    `compute=False`: from the cache only, None where some case is not in it."""
    path = cache_path or default_cache_path()
    fingerprint = _code_fingerprint()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    known = stored.get(fingerprint, {})
    missing = [c for c in cases if c.label not in known]
    if missing and not compute:
        return None
    fresh = {r.case.label: r.as_dict() for r in (estimate_grid(missing, progress=progress) if missing else [])}
    out = [known.get(c.label) or fresh[c.label] for c in cases]
    known.update({label: r for label, r in fresh.items() if r["ok"]})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({fingerprint: known}, indent=1))  # only this code's entries stay
    except OSError:
        pass
    return out
