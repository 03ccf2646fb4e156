"""The resident kernel with its candidates' sampling stage run once per group of row blocks (Pallas;
TPU Mosaic, interpret mode on CPU).

`sampler.py`'s candidate path costs, per block of R rows: the block's copy and column pass (bound by
the VALU slots, growing with R), the fold, and the sampling stage on the folded candidates (searches,
draw and their straight-line code), which is bound by its passes' latency: on 64 rows it cost about
twice what it did on 16 (v5e, bfloat16, `top_k`: 16.0k cycles against 7.6k a 16-row block). This kernel
keeps the first two per block and shares the third: each grid step owns a group of G blocks, copies
them one after the other into two VMEM slots itself (the next copy started before this block's passes),
keeps each block's folded candidates (and, for top-p over whole rows, its rows' mass) in scratch, then
runs the sampling stage once over the group's G x R rows. A block some row of which the candidates
cannot decide (the cond "fallback") is copied again and runs the whole-row path, its rows' outputs
rewritten: one loop over the group's blocks, so that path, most of the code, is compiled once (written
out a block at a time, a v5e compile at B=256, V=256000 took 6x as long).

The copies and column passes are written out a block at a time, so libtpu's static cost model charges
every block and the group's sampling stage (it takes a `pl.when` on the grid index as not taken: a
last-step `pl.when` would hide that stage's cost). Same stages, same values as `sampler.py` row for
row: only the rows a sampling stage sees at once change, which no row's result depends on.

Used where the block-size policy groups blocks (`block_sizes.BlockPlan.group_for`) and the call takes
the candidate path without log-prob outputs; otherwise `sampler.fused_sample` serves. Reference:
`vsampler.core.reference`. Block sizes: `vsampler.kernels.block_sizes`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from vsampler.kernels import block_sizes, candidates
from vsampler.kernels import sampler as resident
from vsampler.kernels.config import ROW_COLUMNS, TOP_K, TOP_P, KernelConfig, T
from vsampler.kernels.sampler import KEPT_MASS, S_MAX, THRESHOLD, X_MAX

from vsampler.core import trips as loop_trips
from vsampler.core.numerics import inverse_temperature

_SITE_COLUMN = {site.loop: site.column for site in resident.SITES}

# The group's first block is copied in up to this many parts along the vocabulary (`ColumnLayout.parts`:
# the column pass starts on the first part while the others arrive); every later block's copy was
# started before the block ahead of it was sampled. A probe (four (16, 128256) bfloat16 blocks, three
# max passes each, v5e, static estimate) gave 49,032 cycles with the first block copied whole, 45,008
# in 2 parts, 43,048 in 4 and 42,061 in 8; the kernel itself (v5e, B=64, V=128256, `top_k`, bfloat16
# / float32) 66,265 / 82,408 whole, 60,646 / 73,654 in 4 parts, 63,366 / 73,691 in 8.
FIRST_COPY_PARTS = 4
# In interpret mode (tests) two: the same code path, each part another loop nest for XLA to compile.
INTERPRET_COPY_PARTS = 2


def takes(vocab: int, config: KernelConfig, allowed: bool) -> bool:
    """Whether a call with these stages runs grouped: the candidate path, no log-prob outputs (they read
    each block's logits after its token is known)."""
    stages = {**config.filters, "random": config.random, "allowed": allowed}
    return config.top_n is None and resident.uses_candidates(vocab, **stages)


def group_scratch_shapes(group_rows: int, vocab: int, config: KernelConfig) -> list:
    """The group's scratch: folded candidates' values and ids, their bounds, the rows' whole mass and its
    block's trips of that pass, whether the candidates decided each row."""
    from jax.experimental.pallas import tpu as pltpu

    lanes, bound_lanes = resident.candidate_layout(vocab, config).folded_lanes
    return [
        pltpu.VMEM((group_rows, lanes), jnp.float32),
        pltpu.VMEM((group_rows, lanes), jnp.int32),
        pltpu.VMEM((group_rows, bound_lanes), jnp.float32),
        pltpu.VMEM((group_rows, 1), jnp.float32),
        pltpu.VMEM((group_rows, 1), jnp.float32),
        pltpu.VMEM((group_rows, 1), jnp.int32),
    ]


def _whole_mass(x_ref, values, bound, block_params, eos, fused, *, vocab: int, config: KernelConfig, interpret: bool):
    """The whole rows' mass of one resident block where top-p will need it (`candidates.needs_row_mass`;
    0 elsewhere): the column pass's sums (`fused`, `candidates.FusedMass`) where they stand for it, one
    pass over the block if any other row needs it (the `row_mass` site): (mass (R, 1), trips)."""
    whole, inverse_t, s_max = candidates.needs_row_mass(
        values,
        bound,
        temperature=resident.row_column(block_params, T),
        k=resident.row_column(block_params, TOP_K) if config.top_k else None,
        p=resident.row_column(block_params, TOP_P),
        inverse_temperature=inverse_temperature,
        reductions=candidates.RowReductions(tree=not interpret),
    )
    row_mass = resident.block_row_mass(x_ref, block_params, eos, vocab=vocab, config=config, interpret=interpret)
    return candidates.mass_where(whole, row_mass, inverse_t, s_max, jnp.zeros_like(s_max), config.trips, fused)


def grouped_sampler_kernel(
    x_hbm,
    rows_ref,
    eos_ref,
    token_ref,
    finished_ref,
    stats_ref,
    slots,
    copies,
    part_copies,
    *scratch,
    vocab: int,
    config: KernelConfig,
    block_rows: int,
    interpret: bool,
) -> None:
    """One group of G blocks: x (B, V) in HBM, rows (G x R, 8), eos (1, E) -> token (G x R, 1), finished
    (G x R, 1), stats (G x R, STAT_COLUMNS); `slots` (2, R, V) and `copies` (2 DMA semaphores) the
    blocks' VMEM slots, `part_copies` (FIRST_COPY_PARTS DMA semaphores) the first block's parts, then
    `sampler.scratch_shapes`' arrays and `group_scratch_shapes`' six."""
    group = rows_ref.shape[0]
    blocks = group // block_rows
    first_row = pl.program_id(0) * group
    rows, eos = rows_ref[...], eos_ref[...]
    candidate_scratch = scratch[:-6]  # `sampler.scratch_shapes`' arrays, then the group's
    values_ref, ids_ref, bound_ref, mass_ref, mass_trips_ref, exact_ref = scratch[-6:]
    block = {"vocab": vocab, "config": config, "interpret": interpret}

    def copy(b: int | jax.Array, slot: int | jax.Array):
        from jax.experimental.pallas import tpu as pltpu

        start = pl.multiple_of(first_row + b * block_rows, block_rows)
        return pltpu.make_async_copy(x_hbm.at[pl.ds(start, block_rows)], slots.at[slot], copies.at[slot])

    def rows_of(b: int | jax.Array):
        return pl.ds(pl.multiple_of(b * block_rows, block_rows), block_rows)

    layout = resident.candidate_layout(vocab, config)
    part_lanes = layout.part_lanes(INTERPRET_COPY_PARTS if interpret else FIRST_COPY_PARTS)

    def first_block_part(k: int):  # lanes part_lanes[k] of the group's first block, into slot 0
        from jax.experimental.pallas import tpu as pltpu

        lanes = pl.ds(part_lanes[k][0], part_lanes[k][1] - part_lanes[k][0])
        rows = pl.ds(pl.multiple_of(first_row, block_rows), block_rows)
        return pltpu.make_async_copy(x_hbm.at[rows, lanes], slots.at[0, :, lanes], part_copies.at[k])

    # each block while resident: its folded candidates, and its rows' whole mass where top-p needs it
    def candidates_of(b: int | jax.Array, slot: int | jax.Array, parts: int = 1, wait=None) -> None:
        x_ref, block_params = slots.at[slot], rows_ref[rows_of(b), :]
        values, ids, bound, fused = resident.block_candidates(
            x_ref, candidate_scratch, block_params, eos, parts=parts, wait=wait, lone_block=blocks == 1, **block
        )
        values_ref[rows_of(b)], ids_ref[rows_of(b)], bound_ref[rows_of(b)] = values, ids, bound
        if config.top_p:
            mass_ref[rows_of(b)], trips = _whole_mass(x_ref, values, bound, block_params, eos, fused, **block)
            mass_trips_ref[rows_of(b)] = jnp.full((block_rows, 1), trips.astype(jnp.float32))

    # written out a block at a time, the next block's copy started before this block's passes (a
    # `fori_loop` over the blocks with the slot `b % 2` compiled the column pass twice instead of once a
    # block, but cost 83,397 cycles against 66,265: v5e, B=64, V=128256, bfloat16, `top_k`); the first
    # block in parts, its column pass starting on each part as it arrives
    for k in range(len(part_lanes)):
        first_block_part(k).start()
    for b in range(blocks):
        if b + 1 < blocks:
            copy(b + 1, (b + 1) % 2).start()
        if b == 0:
            candidates_of(0, 0, len(part_lanes), lambda k: first_block_part(k).wait())
            continue
        copy(b, b % 2).wait()
        candidates_of(b, b % 2)

    # the group's sampling stage, once over its G x R rows, written out for every row
    mass = mass_ref[...] if config.top_p else jnp.zeros((group, 1), jnp.float32)
    fast = resident.sample_candidates(
        values_ref[...], ids_ref[...], bound_ref[...], rows, mass, dtype=slots.dtype, **block
    )
    token_ref[...], finished_ref[...] = resident.finished_rows(fast.token, fast.x_max, rows, eos, pad_id=config.pad_id)
    values = {THRESHOLD: fast.threshold, S_MAX: fast.s_max, KEPT_MASS: fast.kept_mass, X_MAX: fast.x_max}
    if config.top_p:  # each block's own row-mass trips
        values[_SITE_COLUMN["row_mass"]] = mass_trips_ref[...]
    stats_ref[...] = resident.stats_block(values, {_SITE_COLUMN[loop]: t for loop, t in fast.trips.items()})
    exact_ref[...] = fast.exact.astype(jnp.int32)

    # then each block some row of which the candidates cannot decide: copied again, the whole-row path,
    # its rows' outputs rewritten (one loop over the blocks: the whole-row path compiled once)
    def fall_back(b, carry):
        at = rows_of(b)

        def whole_row() -> None:
            again = copy(b, 0)
            again.start()
            again.wait()
            block_params = rows_ref[at, :]
            token, threshold, s_max, kept_mass, x_max, trips = resident.whole_row_block(
                slots.at[0], None, block_params, eos, **block
            )
            token_ref[at], finished_ref[at] = resident.finished_rows(
                token, x_max, block_params, eos, pad_id=config.pad_id
            )
            rewritten = {THRESHOLD: threshold, S_MAX: s_max, KEPT_MASS: kept_mass, X_MAX: x_max}
            loops = {_SITE_COLUMN[loop]: 1 + t for loop, t in zip(resident.WHOLE_ROW_LOOPS, trips, strict=True)}
            new = resident.stats_block(rewritten, loops)
            column = lax.broadcasted_iota(jnp.int32, new.shape, 1)
            kept = functools.reduce(jnp.logical_and, [column != c for c in (*rewritten, *loops)])
            stats_ref[at] = jnp.where(kept, stats_ref[at], new)

        loop_trips.cond("fallback", config.trips, jnp.any(exact_ref[at] == 0), whole_row, lambda: None)
        return carry

    lax.fori_loop(0, blocks, fall_back, 0)


@functools.partial(jax.jit, static_argnames=("config", "plan", "interpret"))
def fused_sample_grouped(
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None = None,
    *,
    config: KernelConfig,
    plan: block_sizes.BlockPlan,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """`sampler.fused_sample`'s arguments and outputs, the blocks taken `plan.group_for(depth)` rows a
    grid step where the call can (`takes`); otherwise `sampler.fused_sample` itself."""
    batch, vocab = logits.shape
    takes_group = takes(vocab, config, allowed is not None)
    group = plan.group_for(resident.candidate_layout(vocab, config).depth) if takes_group else None
    if group is None:
        return resident.fused_sample(logits, rows, eos, allowed, config=config, plan=plan, interpret=interpret)
    from jax.experimental.pallas import tpu as pltpu

    if group % plan.block_rows or group < plan.block_rows or batch % group:
        raise ValueError(f"a group of {group} rows must be whole blocks of {plan.block_rows} and divide {batch}")
    filters = {**config.filters, "random": config.random, "allowed": False}
    kernel = functools.partial(
        grouped_sampler_kernel, vocab=vocab, config=config, block_rows=plan.block_rows, interpret=interpret
    )
    row_group = lambda i: (i, 0)  # noqa: E731
    compiler_params = None
    if not interpret:
        compiler_params = pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=plan.vmem_limit_bytes
        )
    return pl.pallas_call(
        kernel,
        grid=(batch // group,),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((group, ROW_COLUMNS), row_group),
            pl.BlockSpec(eos.shape, lambda i: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((group, 1), row_group),
            pl.BlockSpec((group, 1), row_group),
            pl.BlockSpec((group, resident.STAT_COLUMNS), row_group),
        ],
        out_shape=resident.output_shapes(batch),
        compiler_params=compiler_params,
        interpret=interpret,
        scratch_shapes=(
            pltpu.VMEM((2, plan.block_rows, vocab), logits.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((FIRST_COPY_PARTS,)),
            *resident.scratch_shapes(plan.block_rows, vocab, logits.dtype, **filters),
            *group_scratch_shapes(group, vocab, config),
        ),
    )(logits, rows, eos)
