"""The static estimate (`vsampler.tools.estimate`, `vsampler compile-check --estimate`): the profile reader, the
arithmetic that counts the data-dependent loops, and, where libtpu is installed, libtpu's cost model on a
kernel whose cost is known in shape and on the sampling kernel itself."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from vsampler.kernels import block_sizes, chunked_passes
from vsampler.kernels import sampler as kernel

from vsampler.core import trips
from vsampler.core.numerics import MAX_PASSES
from vsampler.tools import estimate

PROFILE = """hlo_op_estimate {
  hlo_op_name: "%s"
  estimated_cycles: %d
  num_equivalent_hlos: 1
  dma_instruction_type: DMA_INSTRUCTION_TYPE_LOCAL
  scalar_inputs: 0
}
"""


def test_profile_reader_sums_each_op_of_the_program(tmp_path):
    (tmp_path / "fused_sample.1_static_llo_profile.textproto").write_text(PROFILE % ("fused_sample.1", 736022))
    (tmp_path / "copy.3_static_llo_profile.textproto").write_text(PROFILE % ("copy.3", 617) + PROFILE % ("copy.3", 3))
    (tmp_path / "notes.txt").write_text(PROFILE % ("not-a-profile", 5))
    assert estimate.read_static_profile(tmp_path) == {"fused_sample.1": 736022, "copy.3": 620}
    assert estimate.read_static_profile(tmp_path / "absent") == {}


class LinearModel:
    """A stand-in compile worker whose cycles are linear in the fixed trips, as the cost model's are for
    fixed-trip loops: a base, a cost per trip of each loop (only where its guard, if any, is on) and a
    cost per guarded branch (once, however many loops it holds)."""

    def __init__(self, sites, base=100_000, per_trip=None, branch=None):
        self.sites, self.base = sites, base
        self.per_trip = per_trip or {site.loop: 1_000 * (i + 1) for i, site in enumerate(sites)}
        self.branch = branch or {site.guard: 50_000 for site in sites if site.guard}
        self.jobs = []

    def cycles(self, trips, stages, conds):
        total = self.base
        branches = set()
        for site in self.sites:
            if not estimate._site_runs(site.loop, stages, conds):
                continue
            if site.guard not in conds:  # the kernel has no such cond here: the loop runs unguarded
                total += self.per_trip[site.loop] * trips.get(site.loop, 0)
            elif trips.get(site.guard, 0):
                total += self.per_trip[site.loop] * trips.get(site.loop, 0)
                branches.add(site.guard)
        return total + sum(self.branch.get(guard, 0) for guard in branches)

    def compile(self, job):
        self.jobs.append(job)
        stages = {name: job[name] for name in ("top_k", "top_p", "min_p", "random")}
        case = estimate.EstimateCase(
            job["generation"], job["batch"], job["vocab"], job["dtype"], allowed=job["allowed"]
        )
        plan = block_sizes.plan(job["batch"], job["vocab"], job["dtype"], job["generation"], job["allowed"])
        logits = job["batch"] * job["vocab"] * 2
        return {
            "ok": True,
            "error": "",
            "cycles": {"fused_sample.1": self.cycles(job["trips"], stages, estimate._conds(case, plan, stages))},
            "argument_bytes": logits + 1024,
            "output_bytes": 512,
            "logits_bytes": logits,
        }


def _per_block(columns: dict[int, list[float]]) -> np.ndarray:
    blocks = len(next(iter(columns.values())))
    stats = np.zeros((blocks, kernel.STAT_COLUMNS), np.float32)
    for column, values in columns.items():
        stats[:, column] = values
    return stats


FULL = {"top_k": True, "top_p": True, "min_p": True, "random": True, "min_tokens": False}


# the resident kernel's statistics columns by site (`kernel.SITES`)
COLUMN = {site.loop: site.column for site in kernel.SITES}


def test_mean_trips_per_block_are_counted_exactly_where_the_model_is_linear(monkeypatch):
    case = estimate.EstimateCase("v5e", 64, 128256, "float32", "full")
    assert block_sizes.plan(64, 128256, "float32", "v5e").chunk is None  # the resident variant's loops
    trips = {COLUMN["candidate_top_k"]: [1, 2] * 4, COLUMN["candidate_top_p"]: [0] * 7 + [1]}  # no fallback
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    model = LinearModel(kernel.SITES)
    r = estimate.estimate(case, model)
    assert r.ok, r.error
    loops = {loop.loop: loop.trips for loop in r.loops}
    assert loops == {"candidate_top_k": 1.5, "candidate_top_p": 0.125, "row_mass": 0, "top_k": 0, "top_p": 0, "draw": 0}
    per = model.per_trip
    # the fallback's branch, compiled in, is taken in no block
    assert r.cycles == pytest.approx(100_000 + 1.5 * per["candidate_top_k"] + 0.125 * per["candidate_top_p"])
    assert [(g.guard, g.taken, g.branch_cycles) for g in r.guards] == [("fallback", 0.0, 50_000)]
    # one compile at the rounded trips, one more per loop whose mean is not a whole number, one without
    # the cond taken less than always
    rounded = {"candidate_top_k": 2, "candidate_top_p": 0, "row_mass": 0, "top_k": 0, "top_p": 0, "draw": 0}
    # (a loop at 0 trips: between 1 and 2, since at 0 it stays a while loop)
    assert [job["trips"] for job in model.jobs] == [
        {**rounded, "fallback": 1},
        {**rounded, "candidate_top_k": 3, "fallback": 1},
        {**rounded, "candidate_top_p": 1, "fallback": 1},
        {**rounded, "candidate_top_p": 2, "fallback": 1},
        {**rounded, "fallback": 0},
    ]
    # whole-number means, the fallback in every block: the rounded compile is the estimate
    trips.update({COLUMN["candidate_top_k"]: [2] * 8, COLUMN["candidate_top_p"]: [1] * 8})
    trips.update({COLUMN["top_k"]: [3] * 8, COLUMN["top_p"]: [1] * 8, COLUMN["draw"]: [18] * 8})
    model.jobs.clear()
    r = estimate.estimate(case, model)
    assert (
        r.cycles
        == 100_000 + 2 * per["candidate_top_k"] + per["candidate_top_p"] + 50_000 + 2 * per["top_k"] + 17 * per["draw"]
    )
    assert len(model.jobs) == 1
    assert r.floor_seconds == pytest.approx((64 * 128256 * 2 + 1536) / 8.2e11)
    assert r.x_floor == pytest.approx(r.seconds / r.floor_seconds)


def test_fixed_sites_keep_what_a_launch_computes_to_decide_them():
    """With fixed trips (the estimate's compiles) a cond runs the branch named and a loop the trips named,
    but the cond's predicate and the loop's condition (before each trip and after the last) stay in the
    program: their values come back as the site's count, so the compiler cannot drop them and all that
    fed only them. Dropped, they were never counted: the resident kernel's fallback predicate and the
    third values its column pass keeps for it, 5.9k cycles of `top_k`'s 89.4k (B=64, V=128256, float32,
    v5e); the top-p search's and the draw's loop conditions, 7.9k of `top_p`'s 244.9k."""
    import jax
    import jax.numpy as jnp

    fixed = trips.FixedTrips.of({"c": 1, "w": 3})
    out, flag = jax.jit(lambda p: trips.cond("c", fixed, p, lambda: jnp.int32(1), lambda: jnp.int32(2)))(False)
    assert int(out) == 1 and int(flag) == 0  # the branch named; the predicate's own value
    state, going_on = jax.jit(lambda x: trips.while_loop("w", fixed, lambda s: s < 2, lambda s: s + 1, x))(0)
    assert int(state) == 3  # three trips, whatever the condition says
    assert int(going_on) == 2  # it said go on before the first two (at 0, 1), stop before the third and after
    # a launch (no fixed trips) is the plain loop and cond
    state, n = jax.jit(lambda x: trips.while_loop("w", None, lambda s: s < 2, lambda s: s + 1, x))(0)
    assert (int(state), int(n)) == (2, 2)


def test_batches_measured_on_the_same_rows_share_their_trips(monkeypatch):
    """B=256 and B=1024 (float32: 16-row blocks, sixteen a grid step) both measure their trips on
    TRIP_ROWS rows: one measurement serves both; a batch above TRIP_ROWS is measured on its own rows, and
    B=64 (four blocks a grid step: a group's shared searches take the most trips any of its rows needs)
    on grid steps of its own size."""
    calls = []

    def measure(case, plan):
        calls.append(estimate.trip_rows(case.batch, plan.block_rows))
        return FULL, _per_block({COLUMN["candidate_top_k"]: [1] * 8})

    monkeypatch.setattr(estimate, "measure_trips", measure)
    cache: dict = {}
    for batch in (256, 1024, 256, 2048, 64):
        r = estimate.estimate(
            estimate.EstimateCase("v5e", batch, 128256, "float32", "full"), LinearModel(kernel.SITES), trips_cache=cache
        )
        assert r.ok, r.error
        assert r.blocks == batch // r.block_rows and r.trip_blocks == 8
    assert calls == [estimate.TRIP_ROWS, 2048, estimate.TRIP_ROWS]


def test_loops_sharing_a_cond_count_its_branch_once(monkeypatch):
    """The resident kernel's fallback holds three loops; taken in one block of eight, its branch counts an
    eighth of a block's cost, once, and each loop its trips over all blocks."""
    case = estimate.EstimateCase("v5e", 64, 128256, "float32", "full")
    taken = [0] * 7
    trips = {COLUMN["candidate_top_k"]: [1] * 8, COLUMN["top_k"]: [*taken, 3], COLUMN["draw"]: [*taken, 18]}
    trips[COLUMN["top_p"]] = [*taken, 1]
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    model = LinearModel(kernel.SITES)
    r = estimate.estimate(case, model)
    assert r.ok, r.error
    per = model.per_trip
    loops = {loop.loop: loop for loop in r.loops}
    assert loops["draw"].trips == 17 / 8 and loops["draw"].taken == 1 / 8 and loops["top_k"].trips == 2 / 8
    expected = 100_000 + per["candidate_top_k"] + (50_000 + 2 * per["top_k"] + 17 * per["draw"]) / 8
    assert r.cycles == pytest.approx(expected)
    assert [(g.guard, g.taken, g.branch_cycles) for g in r.guards] == [("fallback", 1 / 8, 50_000)]


def test_the_stage_breakdown_stays_on_the_path_most_blocks_take(monkeypatch):
    """`full` on the resident kernel: its stages are measured on the candidate path with the fallback
    not taken (the fallback has its own row, by the blocks that took it), and no removal moves the
    kernel to the whole-row path (top-k off would: top-k's search, the column pass and the draw are one
    row against the greedy kernel); the rows add up to that compile, the estimate's remainder apart."""
    case = estimate.EstimateCase("v5e", 64, 128256, "float32", "full")
    taken = [0] * 7
    trips = {COLUMN["candidate_top_k"]: [1] * 8, COLUMN["top_k"]: [*taken, 3], COLUMN["draw"]: [*taken, 18]}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    model = LinearModel(kernel.SITES)
    r = estimate.estimate(case, model, breakdown=True)
    assert r.ok, r.error
    assert list(r.stages) == [
        "min-p",
        "top-p search",
        "candidate path: column pass, fold, top-k search, temperature + draw",
        "base (loads, sanitising, first maximum, EOS, outputs)",
    ]
    # the compile with the fallback not taken: the base and the candidates' search at its rounded trip
    assert sum(r.stages.values()) == 100_000 + model.per_trip["candidate_top_k"] < r.compiled_cycles
    stage_jobs = model.jobs[-3:]  # after the estimate's own compiles: min-p off, top-p off, greedy
    assert all(job["trips"]["fallback"] == 0 for job in stage_jobs)
    flags = ("top_k", "top_p", "min_p", "random")
    on_path = [kernel.uses_candidates(case.vocab, allowed=False, **{f: job[f] for f in flags}) for job in stage_jobs]
    assert on_path == [True, True, False] and not stage_jobs[-1]["random"]
    _, rows = estimate.breakdown_table(r)
    remainder = rows[-1]
    assert remainder[0] == "the fallback's blocks and fractional trips"
    assert float(remainder[2].replace(",", "")) == pytest.approx(r.cycles - sum(r.stages.values()))


def test_the_breakdown_keeps_top_p_alones_deeper_candidates_as_one_path(monkeypatch):
    """Top-p alone takes deeper candidates than top-p beside top-k or min-p (`kernel.candidate_depth`):
    with min-p and top-p on, removing min-p would leave the top-p-alone kernel, another program, so the
    breakdown makes no such removal (min-p, top-p's search, the column pass and the draw are one row);
    with top-p alone its candidate path is one row against the greedy kernel."""
    model = LinearModel(kernel.SITES)
    flags = ("top_k", "top_p", "min_p", "random")
    min_p_top_p = {**FULL, "top_k": False}
    assert kernel.candidate_depth(top_k=False, min_p=True) < kernel.candidate_depth(top_k=False, min_p=False)
    for stages, config, first in (
        (min_p_top_p, "full", "candidate path: column pass, fold, min-p, top-p search, temperature + draw"),
        (
            {**FULL, "top_k": False, "min_p": False},
            "top_p",
            "candidate path: column pass, fold, top-p search, temperature + draw",
        ),
    ):
        trips = {COLUMN["candidate_top_p"]: [1] * 4, COLUMN["row_mass"]: [1] * 4}
        monkeypatch.setattr(estimate, "measure_trips", lambda c, plan, s=stages, t=trips: (s, _per_block(t)))
        jobs_before = len(model.jobs)
        r = estimate.estimate(estimate.EstimateCase("v5e", 64, 128256, "float32", config), model, breakdown=True)
        assert r.ok, r.error
        assert list(r.stages) == [first, "base (loads, sanitising, first maximum, EOS, outputs)"]
        stage_job = model.jobs[-1]  # the greedy kernel: the only stage compile
        assert len(model.jobs) > jobs_before and not any(stage_job[f] for f in flags)


def test_a_loop_inside_a_cond_counts_its_branch_by_the_fraction_of_blocks_that_ran_it(monkeypatch):
    plan = block_sizes.plan(64, 256000, "bfloat16", "v5p")
    assert plan.chunk is not None  # the chunked variant: its top-k searches run inside conds
    case = estimate.EstimateCase("v5p", 64, 256000, "bfloat16", "full")
    # column values: 0 = the cond was not taken in that block, else 1 + the loop's trips
    trips = {5: [0, 1, 3, 1], 6: [2, 2, 0, 2], 7: [0, 1, 0, 1]}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, p: (FULL, _per_block(trips)))
    model = LinearModel(chunked_passes.SITES)
    r = estimate.estimate(case, model, breakdown=True)
    assert r.ok, r.error
    loops = {loop.loop: loop for loop in r.loops}
    assert (loops["top_k_bound"].taken, loops["top_k_bound"].trips) == (0.75, 0.5)
    assert (loops["top_k"].taken, loops["top_k"].trips) == (0.75, 0.75)
    assert (loops["top_p"].taken, loops["top_p"].trips) == (1.0, 0.5)
    per, branch = model.per_trip, model.branch
    expected = (
        100_000
        + 0.75 * branch["top_k_bound_search"]
        + 0.5 * per["top_k_bound"]
        + 0.75 * branch["top_k_search"]
        + 0.75 * per["top_k"]
        + 0.5 * per["top_p"]
    )
    assert r.cycles == pytest.approx(expected)
    assert {g.guard: g.branch_cycles for g in r.guards} == {"top_k_bound_search": 50_000, "top_k_search": 50_000}
    assert loops["top_k"].cycles_per_trip == per["top_k"]
    # the stage breakdown adds up to the compile at the rounded trips (the chunked variant's conds taken),
    # each stage removed in turn: the chunked variant has no candidate path to stay on
    assert sum(r.stages.values()) == r.compiled_cycles
    assert list(r.stages)[:4] == ["min-p", "top-p search", "top-k search", "temperature + draw"]


def test_a_kernel_without_the_candidate_path_has_no_fallback_cond_and_no_candidate_loops(monkeypatch):
    """Top-p under an allowed-token mask runs the whole-row path directly: its loops are not inside the
    fallback cond (no cond row, nothing counted as its branch) and the candidate path's loops do not
    exist; the breakdown's parts are its two loops."""
    top_p = {"top_k": False, "top_p": True, "min_p": False, "random": True, "min_tokens": False}
    case = estimate.EstimateCase("v5e", 64, 128256, "float32", "top_p", allowed=True)
    assert not kernel.uses_candidates(
        case.vocab, allowed=True, **{f: top_p[f] for f in ("top_k", "top_p", "min_p", "random")}
    )
    # unguarded in this kernel, its columns still hold 1 + trips (the path is always taken)
    trips = {COLUMN["top_p"]: [2, 1, 2, 1], COLUMN["draw"]: [13] * 4}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, p: (top_p, _per_block(trips)))
    model = LinearModel(kernel.SITES)
    r = estimate.estimate(case, model, breakdown=True)
    assert r.ok, r.error
    assert r.guards == []
    assert [(loop.loop, loop.trips, loop.guard) for loop in r.loops] == [("top_p", 0.5, None), ("draw", 12, None)]
    per = model.per_trip
    assert r.cycles == pytest.approx(100_000 + 0.5 * per["top_p"] + 12 * per["draw"])
    assert all(cycles >= 0 for cycles in r.stages.values())


class _OutOfVmem:
    """A profiling worker whose every compile runs out of VMEM, as libtpu words it."""

    error = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space vmem. "
        "Used 159.71M of 128.00M vmem. Exceeded vmem capacity by 31.71M."
    )

    def compile(self, job):
        return {"ok": False, "error": self.error, "cycles": {}}


class _Plain:
    """The unprofiled worker: records its jobs and answers whether the kernel fits."""

    instances: ClassVar[list] = []

    def __init__(self, fits: bool, profile: bool = True):
        assert profile is False
        self.fits, self.jobs = fits, []
        _Plain.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def compile(self, job):
        self.jobs.append(job)
        if not self.fits:
            return {"ok": False, "error": "a VMEM error of the kernel itself", "cycles": {}}
        return {"ok": True, "error": "", "cycles": {}, "vmem_used_bytes": 47.5 * 2**20, "vmem_limit_bytes": 112 * 2**20}


@pytest.mark.parametrize("fits", [True, False])
def test_a_profiled_compile_out_of_vmem_says_whether_the_kernel_itself_fits(monkeypatch, fits):
    """libtpu's profile flag raises the kernel's VMEM use: a configuration the profiled compile cannot fit
    is compiled again without the flag (the real program, no fixed trips). Where that fits, the table says
    the estimate alone is missing, with both figures; where it does not, the compiler's error stands."""
    import functools

    _Plain.instances.clear()
    monkeypatch.setattr(estimate, "measure_trips", lambda c, p: (FULL, _per_block({5: [1] * 4})))
    monkeypatch.setattr(estimate, "ProfileWorker", functools.partial(_Plain, fits))
    r = estimate.estimate(estimate.EstimateCase("v5e", 64, 256000, "bfloat16", "full"), _OutOfVmem())
    assert not r.ok
    (plain,) = _Plain.instances
    assert [job["trips"] for job in plain.jobs] == [None]
    assert plain.jobs[0]["vocab"] == 256000 and plain.jobs[0]["dtype"] == "bfloat16"
    if fits:
        assert r.error.startswith("no estimate: libtpu's profiling compile needs 159.71 MiB of VMEM")
        assert "the kernel itself compiles and uses 47.5 MiB of its 112.0 MiB limit" in r.error
    else:
        assert r.error == _OutOfVmem.error


class _FallbackOutOfVmem(LinearModel):
    """The linear model, but a compile with the candidates' whole-row fallback taken runs out of VMEM, as
    libtpu's profiled compiles of bfloat16 blocks from V=256000 do (the kernel itself fits)."""

    def compile(self, job):
        if job["trips"].get(estimate.FALLBACK):
            self.jobs.append(job)
            return {"ok": False, "error": _OutOfVmem.error, "cycles": {}}
        return super().compile(job)


def test_a_fallback_no_block_took_is_left_out_of_a_profiled_compile_it_outgrew(monkeypatch):
    """The estimate subtracts an untaken cond's branch whole, so where the profiled compile with the
    whole-row fallback outgrows VMEM and no measured block took it, the compile without it is the same
    estimate: it is given, and the notes say so. Where some blocks took it, there is no estimate, but the
    message gives the compile without it as a lower bound."""
    import functools

    case = estimate.EstimateCase("v5e", 64, 256000, "bfloat16", "full")
    trips = {COLUMN["candidate_top_k"]: [1, 2] * 4, COLUMN["candidate_top_p"]: [1] * 8}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    fits = estimate.estimate(case, LinearModel(kernel.SITES))
    assert fits.ok and fits.fallback_compiled
    model = _FallbackOutOfVmem(kernel.SITES)
    r = estimate.estimate(case, model)
    assert r.ok, r.error
    assert not r.fallback_compiled and r.cycles == fits.cycles
    assert [(g.guard, g.taken, g.branch_cycles) for g in r.guards] == [("fallback", 0.0, 0)]
    rounded = {"candidate_top_k": 2, "candidate_top_p": 1, "row_mass": 0, "top_k": 0, "top_p": 0, "draw": 0}
    assert [job["trips"] for job in model.jobs] == [
        {**rounded, "fallback": 1},  # out of VMEM, then again at half the VMEM as the limit
        {**rounded, "fallback": 1},
        {**rounded, "fallback": 0},
        {**rounded, "candidate_top_k": 3, "fallback": 0},
    ]
    assert [job.get("vmem_limit_bytes") for job in model.jobs] == [None] + [64 << 20] * 3
    (note,) = [line for line in estimate.notes([r]) if case.label in line]
    assert "did not fit" in note and "no measured block took" in note
    assert not any(case.label in line for line in estimate.notes([fits]))
    broken_down = estimate.estimate(case, _FallbackOutOfVmem(kernel.SITES), breakdown=True)
    assert broken_down.ok and broken_down.cycles == fits.cycles
    assert sum(broken_down.stages.values()) == broken_down.compiled_cycles

    # one block in eight took it: no estimate, the compile without the fallback as a lower bound
    trips[COLUMN["draw"]] = [0] * 7 + [18]
    monkeypatch.setattr(estimate, "ProfileWorker", functools.partial(_Plain, True))
    model = _FallbackOutOfVmem(kernel.SITES)
    r = estimate.estimate(case, model)
    assert not r.ok and r.error.startswith("no estimate: libtpu's profiling compile needs 159.71 MiB")
    plan = block_sizes.plan(64, 256000, "bfloat16", "v5e")
    assert model.jobs[-1]["trips"] == {**rounded, "draw": 2, "fallback": 0}  # the draw's 17 trips in 1 of 8
    without = model.cycles(model.jobs[-1]["trips"], FULL, estimate._conds(case, plan, FULL))
    floor_us = (64 * 256000 * 2 + 1536) / 8.2e11 * 1e6
    assert r.error.endswith(
        f"; without the whole-row fallback (taken in 12% of blocks, not counted) it compiles to {without:,} "
        f"cycles, {estimate._us(without / 1.5e9)} us, {without / 1.5e9 * 1e6 / floor_us:.1f}x the floor: a lower bound"
    )


class _FallbackLoopOutOfVmem(LinearModel):
    """The linear model, but a compile with the whole-row fallback taken and one of its loops at two
    trips or more runs out of VMEM, as libtpu's profiled compile of tpu-inference's setting (v5e,
    bfloat16, V=262144, k64_p95) does at half the VMEM: the fallback's loops unrolled outgrow it."""

    def compile(self, job):
        trips = job["trips"]
        if trips.get(estimate.FALLBACK) and max(trips.get(loop, 0) for loop in ("top_k", "top_p", "draw")) >= 2:
            self.jobs.append(job)
            return {"ok": False, "error": _OutOfVmem.error, "cycles": {}}
        return super().compile(job)


def test_the_breakdown_of_a_fallback_no_block_took_says_which_trip_costs_outgrew_vmem(monkeypatch):
    """Only the breakdown asks what one more trip of the fallback's loops costs where no measured block
    took the fallback (none of their trips is counted). Where that compile outgrows VMEM, the estimate
    and the rest of the breakdown stand, and those loops' rows say why they have no cost; where some
    block took the fallback, the same failure leaves no estimate."""
    import functools

    case = estimate.EstimateCase("v5e", 16, 262144, "bfloat16", "full")
    trips = {COLUMN["candidate_top_k"]: [1] * 8, COLUMN["candidate_top_p"]: [3] * 8}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    plain = estimate.estimate(case, _FallbackLoopOutOfVmem(kernel.SITES))
    model = _FallbackLoopOutOfVmem(kernel.SITES)
    r = estimate.estimate(case, model, breakdown=True)
    assert plain.ok and r.ok, r.error
    assert r.cycles == plain.cycles == estimate.estimate(case, LinearModel(kernel.SITES), breakdown=True).cycles
    unmeasured = {loop.loop for loop in r.loops if loop.cycles_per_trip is None}
    assert unmeasured == {"top_k", "top_p", "draw"}  # the fallback's loops
    assert all(loop.cycles_per_trip == model.per_trip[loop.loop] for loop in r.loops if loop.guard is None)
    (fallback,) = r.guards  # the stages add up to the compile with it not taken
    assert fallback.taken == 0 and sum(r.stages.values()) == r.compiled_cycles - fallback.branch_cycles > 0
    _, rows = estimate.breakdown_table(r)
    outgrew = [row for row in rows if "outgrew VMEM" in row[1]]
    assert [row[0] for row in outgrew] == ["loop: top_k", "loop: top_p", "loop: draw"]
    assert all(row[2] == "0" and "inside fallback" in row[1] for row in outgrew)

    # one block in eight took it (the draw's 8 trips there: 1 rounded, so the rounded compile fits and
    # the draw's next trip is what outgrows VMEM): its loops' trips count, so there is no estimate
    trips[COLUMN["draw"]] = [0] * 7 + [8]
    monkeypatch.setattr(estimate, "ProfileWorker", functools.partial(_Plain, True))
    r = estimate.estimate(case, _FallbackLoopOutOfVmem(kernel.SITES), breakdown=True)
    assert not r.ok and r.error.startswith("no estimate: libtpu's profiling compile needs 159.71 MiB")


class _ProfileReservesTheLimit(LinearModel):
    """The linear model, but a compile needs the kernel's own VMEM (`used`, MiB, more with the fallback
    taken) plus its scoped limit, as libtpu's profiled compiles do, of v5e's 128 MiB."""

    def __init__(self, sites, used):
        super().__init__(sites)
        self.used = used

    def compile(self, job):
        plan = block_sizes.plan(job["batch"], job["vocab"], job["dtype"], job["generation"], job["allowed"])
        limit = job.get("vmem_limit_bytes") or plan.vmem_limit_bytes
        used = (self.used + (30 if job["trips"].get(estimate.FALLBACK) else 0)) * 2**20
        if used > limit:  # compile_check's form of libtpu's message
            self.jobs.append(job)
            error = (
                "RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Scoped allocation with size "
                f"{used / 2**20:.2f}M and limit {limit / 2**20:.2f}M exceeded scoped vmem limit by 6.00M."
            )
            return {"ok": False, "error": error}
        if used + limit > 128 * 2**20:
            self.jobs.append(job)
            return {"ok": False, "error": _OutOfVmem.error.replace("159.71", f"{(used + limit) / 2**20:.2f}")}
        return super().compile(job)


def test_a_profiled_compile_out_of_vmem_at_the_policys_limit_takes_half_the_vmem(monkeypatch):
    """libtpu's profile flag reserves as much VMEM again as the kernel's scoped limit: where the profiled
    compile runs out at the block-size policy's limit, every compile of the estimate takes half the
    VMEM as its limit, which gives the same cycles; the notes say so. A kernel that needs more than half
    fits no limit: without the fallback's branch (taken in no block) it may still."""
    import functools

    case = estimate.EstimateCase("v5e", 64, 256000, "bfloat16", "full")
    assert block_sizes.plan(64, 256000, "bfloat16", "v5e").vmem_limit_bytes == 112 << 20
    trips = {COLUMN["candidate_top_k"]: [1, 2] * 4, COLUMN["candidate_top_p"]: [1] * 8}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    fits = estimate.estimate(case, LinearModel(kernel.SITES))
    model = _ProfileReservesTheLimit(kernel.SITES, used=20)
    r = estimate.estimate(case, model)
    assert r.ok, r.error
    assert r.cycles == fits.cycles and r.fallback_compiled and r.profile_vmem_limit_bytes == 64 << 20
    assert [job.get("vmem_limit_bytes") for job in model.jobs] == [None] + [64 << 20] * (len(model.jobs) - 1)
    assert [(g.guard, g.taken, g.branch_cycles) for g in r.guards] == [("fallback", 0.0, 50_000)]
    (note,) = [line for line in estimate.notes([r]) if "half" in line]
    assert "v5e 64 MiB" in note and not any("half" in line for line in estimate.notes([fits]))
    # 40 MiB, 70 with the fallback taken (over the limit of half): only the compiles without it fit
    model = _ProfileReservesTheLimit(kernel.SITES, used=40)
    r = estimate.estimate(case, model)
    assert r.ok and r.cycles == fits.cycles and not r.fallback_compiled
    # 70 MiB (100 with the fallback): no limit fits; the plain compile (the policy's limit, no override)
    # says the kernel does
    _Plain.instances.clear()
    monkeypatch.setattr(estimate, "ProfileWorker", functools.partial(_Plain, True))
    r = estimate.estimate(case, _ProfileReservesTheLimit(kernel.SITES, used=70))
    assert not r.ok and r.error.startswith("no estimate: libtpu's profiling compile needs 212.00 MiB")
    assert r.error.endswith("; under half the VMEM as its limit: the kernel needs 70.00 MiB, over that 64.00 MiB limit")
    (plain,) = _Plain.instances
    assert "vmem_limit_bytes" not in plain.jobs[0]


def test_greedy_has_no_loops_and_v4_is_refused_before_any_compile(monkeypatch):
    greedy = {"top_k": False, "top_p": False, "min_p": False, "random": False, "min_tokens": False}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, p: (greedy, _per_block({5: [0] * 8})))
    model = LinearModel(kernel.SITES)
    r = estimate.estimate(estimate.EstimateCase("v6e", 64, 128256, "float32", "greedy"), model)
    assert r.ok and r.loops == [] and r.cycles == 100_000 and len(model.jobs) == 1
    v4 = estimate.estimate(estimate.EstimateCase("v4", 64, 128256), model)
    assert not v4.ok and "not modelled" in v4.error and len(model.jobs) == 1
    _, rows = estimate.table([r, v4])
    assert rows[1][5] == "no estimate" and "not modelled" in rows[1][-1]
    assert any("Dma latency model" in line for line in estimate.notes([r, v4]))


@pytest.mark.parametrize("variant", ["resident", "chunked"])
def test_the_kernel_reports_its_loop_trips_per_block(variant):
    """Interpret mode: every row of a block carries its block's trips (what the estimate measures), whole
    numbers within the searches' bounds; with them fixed, the kernel compiles its loops as fixed trips."""
    import jax

    from vsampler.impls import pallas

    case = estimate.EstimateCase("v5e", 16, 9000, "float32", "full")
    plan = block_sizes.plan(16, 9000, "float32", "v5e", chunked=variant == "chunked")
    x, rows, eos, allowed, config = estimate._workload_operands(case)
    assert config.top_k and config.top_p and config.random
    stats = np.asarray(pallas.tpu_launch(plan, x, rows, eos, allowed, config=config, interpret=True)[2])
    sites = kernel.SITES if plan.chunk is None else chunked_passes.SITES
    trips = stats[:, [site.column for site in sites]].reshape(-1, plan.block_rows, len(sites))
    assert (trips == trips[:, :1]).all()  # one count per block
    assert (trips == np.round(trips)).all() and (trips >= 0).all() and (trips <= MAX_PASSES + 1).all()
    _, per_block = estimate.measure_trips(case, plan, least=16)  # these 16 rows, as launched above
    assert (per_block[:, [site.column for site in sites]] == trips[:, 0]).all()
    if plan.chunk is None:  # the whole-row draw's index bisection, where the fallback ran: ceil(log2 V) trips
        draw = next(site.column for site in sites if site.loop == "draw")
        assert np.isin(per_block[:, draw], [0, 1 + np.ceil(np.log2(9000))]).all()
    # by default on TRIP_ROWS rows of the workload, in the plan's blocks
    _, many = estimate.measure_trips(case, plan)
    assert many.shape == (estimate.TRIP_ROWS // plan.block_rows, kernel.STAT_COLUMNS)
    assert estimate.trip_rows(16, plan.block_rows) == estimate.TRIP_ROWS
    assert estimate.trip_rows(2000, 16) == 2000 and estimate.trip_rows(1030, 16) == 1040
    fixed_config = config.replace(trips=trips_of(sites, 2))
    fixed = jax.jit(lambda *a: pallas.tpu_launch(plan, *a, config=fixed_config, interpret=True))(x, rows, eos, allowed)
    assert fixed[0].shape == (16, 1)  # the fixed-trip form traces and runs (its results mean nothing)


def trips_of(sites, n):
    from vsampler.core.trips import FixedTrips

    return FixedTrips.of({**{site.loop: n for site in sites}, **{site.guard: 1 for site in sites if site.guard}})


# --- libtpu's cost model itself (the tpu extra) --------------------------------------------------


@pytest.fixture(scope="module")
def libtpu():
    if estimate.libtpu_version() is None:
        pytest.skip("libtpu is not installed (the tpu extra): no static cost model")


@pytest.mark.slow
def test_cost_model_counts_a_fixed_trip_loop_linearly_and_a_data_dependent_one_as_none(libtpu, tmp_path):
    counts = [2, 3, 4, 8, 16]
    env = {**os.environ, "LIBTPU_INIT_ARGS": f"{estimate.PROFILE_FLAG}={tmp_path}", "JAX_PLATFORMS": "cpu"}
    probe = Path(__file__).with_name("estimate_probe.py")
    out = subprocess.run(
        [sys.executable, str(probe), str(tmp_path), *map(str, counts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cycles = json.loads(out.stdout.strip().splitlines()[-1])
    per_trip = cycles["fori 3"] - cycles["fori 2"]
    assert per_trip > 0
    for n in counts:
        assert cycles[f"fori {n}"] == pytest.approx(cycles["fori 2"] + (n - 2) * per_trip, rel=0.01)
    # the same pass in a data-dependent while loop is counted as no trip at all
    assert cycles["while"] < cycles["fori 2"] - per_trip


@pytest.mark.slow
def test_the_kernels_data_dependent_loops_are_counted_through_their_trips(libtpu):
    case = estimate.EstimateCase("v5e", 8, 32000, "float32", "top_k")
    with estimate.ProfileWorker() as worker:
        r = estimate.estimate(case, worker, breakdown=True)
        assert r.ok, r.error
        job = {"generation": "v5e", "batch": 8, "vocab": 32000, "dtype": "float32", "top_p": False, "min_p": False}
        plain = worker.compile({**job, "min_tokens": False})  # the kernel as launched: while loops, 0 trips
        assert plain["ok"], plain["error"]
    loops = {loop.loop: loop for loop in r.loops}
    assert set(loops) == {"candidate_top_k", "top_k", "draw"}
    (fallback,) = r.guards  # the whole-row path, where the candidates do not decide a block
    assert fallback.guard == "fallback" and fallback.branch_cycles > 0
    # the bisection inside one draw chunk where it ran: log2 of its DRAW_LANES lanes (32000 = 7 full chunks
    # and a 3,328-lane tail, bisected side by side)
    assert loops["draw"].trips == pytest.approx(math.log2(kernel.DRAW_LANES) * fallback.taken)
    # the whole-row loops' passes cost; a snapping pass over the candidates can hide in the schedule
    assert loops["top_k"].cycles_per_trip > 0 and loops["draw"].cycles_per_trip > 0
    assert loops["candidate_top_k"].cycles_per_trip >= 0
    # the kernel as launched holds the fallback as a data-dependent cond, which the model charges in
    # full; the estimate charges its branch by the blocks that took it
    launched = sum(plain["cycles"].values())
    if fallback.taken == 0:
        assert r.cycles == pytest.approx(
            r.compiled_cycles
            - fallback.branch_cycles
            + loops["candidate_top_k"].cycles
            - round(loops["candidate_top_k"].trips) * loops["candidate_top_k"].cycles_per_trip
        )
        assert r.cycles < launched
    assert r.hbm_bytes >= r.logits_bytes == 8 * 32000 * 4
    # the stages on the candidate path, the fallback not taken (`test_the_stage_breakdown_stays_on_...`)
    inside = sum(round(loop.trips) * loop.cycles_per_trip for loop in r.loops if loop.guard == fallback.guard)
    assert sum(r.stages.values()) == r.compiled_cycles - fallback.branch_cycles - inside
    assert "candidate path: column pass, fold, top-k search, temperature + draw" in r.stages


# what a compile worker left on its stderr when libtpu's process aborted (the core-dump hook's lines last)
_ABORT_TAIL = """\
terminate called after throwing an instance of 'std::bad_alloc'
  what():  std::bad_alloc
E1206 07:39:46.545164   24747 coredump_hook.cc:442] RAW: Remote crash data gathering hook invoked.
E1206 07:39:46.545164   24747 coredump_hook.cc:481] RAW: Skipping coredump since rlimit was 0 at process start.
E1206 07:39:46.545164   24747 client.cc:269] RAW: Coroner client retries enabled, will retry for up to 30 sec.
E1206 07:39:46.545164   24747 coredump_hook.cc:537] RAW: Sending fingerprint to remote end.
E1206 07:39:46.545164   24747 coredump_hook.cc:546] RAW: Cannot send fingerprint to Coroner: [NOT_FOUND] stat failed
 on crash reporting socket /var/google/services/logmanagerd/remote_coredump.socket (Is the listener running?)
E1206 07:39:46.545164   24747 coredump_hook.cc:467] RAW: Dumping core locally.
E1206 07:39:46.694366   24747 process_state.cc:708] RAW:
"""


@pytest.mark.parametrize(
    ("returncode", "stderr", "says"),
    [
        (-6, _ABORT_TAIL, ["SIGABRT", "std::bad_alloc"]),
        (-9, "", ["SIGKILL", "out of memory", "nothing on its stderr"]),
        (
            -6,
            "I1206 load\nF1206 04:51:40.1 12 dma_model.cc:88] Check failed: Dma latency model\n"
            "*** Check failure stack trace: ***\n    @     0x7f  (unknown)\n",
            ["SIGABRT", "Dma latency model"],
        ),
        (
            -6,
            "F1206 08:09:00.685832 1231 low_level_alloc.cc:625] RAW: mmap error: 12\n" + _ABORT_TAIL.split("\n", 2)[2],
            ["SIGABRT", "mmap error: 12", "out of memory"],
        ),
        (
            1,
            'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no such generation\n',
            ["status 1", "ValueError: no such generation"],
        ),
    ],
)
def test_a_dead_workers_message_says_how_it_ended_and_why_not_the_crash_handlers_lines(returncode, stderr, says):
    """`estimate.death_message`: the signal (or exit status) and the most telling stderr line, never the
    core-dump hook's (a real abort's tail, from a B=256 profiled compile that ran out of host memory, once
    read "eporting socket /var/google/services/logmanagerd/..."); a FATAL line is kept even when it is the
    allocator's own RAW one."""
    message = estimate.death_message(returncode, stderr)
    for part in says:
        assert part in message
    assert "coredump" not in message and "logmanagerd" not in message and "Dumping core" not in message


@pytest.mark.slow
def test_a_generation_the_model_aborts_on_is_reported_not_crashed(libtpu):
    with estimate.ProfileWorker() as worker:
        with pytest.raises(estimate.WorkerDied, match="Dma latency model"):
            worker.compile({"generation": "v4", "batch": 8, "vocab": 1024, "dtype": "float32"})


@pytest.mark.slow
def test_compile_check_estimates_through_the_same_path(libtpu):
    from vsampler.tools import compile_check

    r = compile_check.estimate_tpu("v6e", 8, 1024, "bfloat16", "greedy")
    assert r.ok, r.error
    assert r.loops == [] and r.cycles == r.compiled_cycles > 0 and r.x_floor > 0
    assert r.as_dict()["label"] == estimate.LABEL


def test_trips_are_measured_on_whole_grid_steps():
    """The grouped kernel's grid steps take several blocks: the rows measured are whole groups of them."""
    grouped = block_sizes.plan(24, 12000, "float32", "v5e")  # three blocks of 8, one grid step
    assert grouped.step_rows == 24 and estimate.trip_rows(24, grouped.step_rows) == 1032
    assert block_sizes.plan(8, 12000, "float32", "v5e").step_rows == 8


class _MoreTripsOutgrowTheProfile(_ProfileReservesTheLimit):
    """`_ProfileReservesTheLimit`, but two or more trips of the whole-row draw (inside the fallback) need
    10 MiB more: the first compile fits at the policy's limit, the one with a trip more does not."""

    def compile(self, job):
        trips = job["trips"]
        extra = 10 if trips.get(estimate.FALLBACK) and trips.get("draw", 0) >= 2 else 0
        self.used += extra
        try:
            return super().compile(job)
        finally:
            self.used -= extra


def test_a_later_compile_that_outgrows_the_profile_runs_alone_at_half_the_vmem(monkeypatch):
    """Where the first compile fits at the policy's limit but one with a loop's trip more does not under the
    profile flag's reservation (the grouped kernel's `top_p`, v5e, B=64, V=128256, float32), that compile
    alone runs at half the VMEM: the estimate stands, the same as where every compile fits."""
    case = estimate.EstimateCase("v5e", 64, 128256, "float32", "full")
    trips = {COLUMN["candidate_top_k"]: [1] * 8, COLUMN["candidate_top_p"]: [3] * 8, COLUMN["draw"]: [0] * 7 + [3]}
    monkeypatch.setattr(estimate, "measure_trips", lambda c, plan: (FULL, _per_block(trips)))
    model = _MoreTripsOutgrowTheProfile(kernel.SITES, used=15)
    r = estimate.estimate(case, model)
    assert r.ok, r.error
    assert r.cycles == estimate.estimate(case, LinearModel(kernel.SITES)).cycles
    assert r.profile_vmem_limit_bytes == 0  # the first compile at the policy's limit
    half = block_sizes.TPU_GENERATIONS["v5e"].vmem_bytes // 2
    retried = [job for job in model.jobs if job.get("vmem_limit_bytes") == half]
    assert retried and all(job["trips"]["draw"] >= 2 for job in retried)
