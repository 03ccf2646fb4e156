"""Column candidates: the resident kernel's fast path, one pass over the logits instead of dozens.

The block's (R, V) logits are read as 128-lane vregs; vreg v belongs to column group `v % groups` (the
last few to the first groups). For every lane of every column group, one pass keeps the two largest
values with their vocabulary indices and the third largest value (`column_pass`): R x 2W *candidates*
(W = groups x 128 lanes) and R x W *third* values (top-p alone, whose kept sets are larger, keeps
TOP_P_DEPTH values a lane and the next as the bound, and folds them more loosely). The pass is a few
VALU operations per vreg; for bfloat16 logits fewer, each value and its index held as one float32 key
(`key_pass`, `fold_keys`: the same candidates, decoded once folded; module comment on keys).

The searches then run on a second, smaller level (`fold`): the candidates' 2W lanes fall onto
FOLD_GROUPS x 128 lanes, and each of those keeps the FOLD_KEEP largest values folded onto it (with their
indices) and, as its *bound*, the largest of the rest and of the third values folded onto it. Every
pass of the searches and the draw touches every candidate, so a smaller set is what makes them cheap.

Every threshold of the spec is then searched over the candidates alone, and is exact whenever the kept
set lies among them: every value outside the candidates is at most the row's largest bound s3 (a value
outside the first level is at most its column lane's third value, and the bounds take in those and every
value the fold dropped), so when the combined top-k / top-p threshold is above s3 (or, with min-p alone,
min-p drops s3), each token >= the threshold is a candidate, the counts and masses the searches see
above s3 are the row's, and the kept set, the kept mass and the draw (smallest vocabulary index whose
kept prefix exceeds u x mass, by bisection on the candidates' indices) are the spec's. Where that does
not hold for some row (a k too large for the candidates, a flat distribution's top-p, ties at the
threshold outside the candidates, a +inf logit, temperature alone), the caller runs the whole-row path
for the block instead (`fallback`); `vsampler.kernels.sampler` composes the two.

Top-p without top-k needs the row's whole mass: one more pass (`row_mass`) on the rows that need it.
Reference: `vsampler.core.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vsampler.core import trips as loop_trips
from vsampler.core.numerics import NEG_INF, narrow

LANES = 128
GROUPS = 32  # column groups: 2 x 4096 candidates per row (3 of a top-50 share a column lane: ~0.15% of rows)
# From WIDE_VOCAB up, the two-deep layout (every filter but top-p alone) takes WIDE_GROUPS column groups
# (2 x 8192 candidates a row). A block falls back to the whole-row path when some row has 3 of its kept
# tokens on one column lane, and a fallback block costs about 2x a candidate block at V=128256: on the
# workload's top-k 50 rows (numpy, 8,192 rows, V=128256) 12 rows (2.3% of 16-row blocks) at 32 groups,
# 1 (0.2%) at 64. The wider layout costs its columns' and the fold's extra work (fixed trips, v5e, B=64,
# float32, top_k, no fallback, 32 -> 64 groups): V=32000 50,911 -> 55,175 cycles, V=65536 62,359 ->
# 66,531, V=128256 87,221 -> 89,926, V=256000 150,349 -> 151,350; a fallback in 1% of blocks costs
# 0.8k, 1.2k, 2.1k cycles at the first three. So it pays from about V=100,000 on: the estimate
# (`compile-check --estimate`, v5e, B=64, V=128256, its 1,024 rows: fallback blocks 3.1% -> 0%) top_k
# float32 95,669 -> 89,336 cycles, bfloat16 86,577 -> 82,302, full 116,114 -> 107,049 / 105,411 ->
# 100,129. (Top-p alone's four-deep layout stays at 32: 153,461 -> 168,166 cycles at 64, fixed trips.)
WIDE_GROUPS = 64
WIDE_VOCAB = 100_000
# A column pass folds COLUMNS_TOGETHER column groups at once, their vregs interleaved (each group's fold
# is a chain of dependent insertions), UNROLL vregs a loop trip. Static estimate, fixed trips, V=128256,
# one group at a time (8 vregs a trip) -> 2 at once (32): v5e top_k B=8 float32 22,928 -> 21,946 cycles,
# bfloat16 19,273 -> 18,083; B=64 float32 89,392 -> 87,221, bfloat16 82,586 -> 78,865; full B=64 float32
# 108,693 -> 105,784; v6e top_k B=64 float32 83,577 -> 80,371. (v5e B=64 top_k float32, others: 3 at
# once 88,044, 4: 88,456, 8: 89,688, their accumulators spilling.)
UNROLL = 32
COLUMNS_TOGETHER = 2
# The row mass (`row_mass`) folds MASS_COLUMNS_TOGETHER column groups a loop trip, MASS_UNROLL vregs in
# all: its loop is bound by the one exp a vreg (one EUP push a bundle), and each trip fills and drains
# that pipe (~40 of ~105 bundles a trip at 2 x 32 vregs, bundle dump); no insertion chain limits how many
# columns go at once. Static estimate, v5e, B=64, V=128256, bfloat16, top-p alone, the workload's trips:
# 127,252 cycles at 2 columns, 119,878 at 8 (one (16, 128256) block's pass alone, depth-4 layout: 3.9k
# -> 3.7k; 16 columns 3.6k).
MASS_COLUMNS_TOGETHER, MASS_UNROLL = 8, 128
# A pass of the searches over the candidates costs both each point's compare-select-add over every
# candidate vreg and its row reduction's latency, so each pass evaluates several points (v5e, B=64,
# V=128256, float32, top_k, fixed trips, folded candidates: 7 x 4 as here 83,542 cycles; 15 x 3 86,623;
# 3 x 6 86,284; draw splits 7: 84,055, 1: 88,993).
SEARCH_SPLITS, SEARCH_PASSES = 7, 4  # the searches' plain passes: 8 sub-brackets each, 4096x narrower
# The top-k and top-p-alone searches' plain passes by the logits' dtype (SEARCH_PASSES where not listed):
# a bfloat16 row holds few distinct values, so three passes (512x narrower) leave no snapping pass on the
# workload's rows, where float32 rows need the fourth. Static estimate, the workload's trips, plain
# passes 4 -> 3 (-> 2): v5e, B=64, V=128256, bfloat16: top_k 82,302 -> 79,334 (80,023) cycles, full
# 92,738 -> 89,770 (90,652), top_p 146,438 -> 141,874 (144,954); v6e top_k 79,424 -> 76,220, full
# 91,246 -> 88,042; v5e, B=16, V=262144, bfloat16, k64_p95 (tpu-inference's setting) 50,124 -> 47,620
# (47,677). Float32 with 3: v5e B=64 top_k 89,336 -> 91,160, full 102,246 -> 104,197; B=8 full 25,322
# -> 25,840. The searches are exact with any count: only their cost moves.
SEARCH_PASSES_BY_DTYPE = {jnp.dtype(jnp.bfloat16): 3}
# Top-p after top-k searches a bracket that starts at the k-th value, so it holds at most k distinct
# values: one plain pass, then the snapping passes (each ~0.7k cycles a 16-row block against ~1.1k for a
# plain one). Static estimate, `full` (top-k 50, top-p 0.9, min-p), B=64, V=128256, the workload's
# trips, plain passes 4 -> 1 (snapping passes 0.14 -> 5.42 a block): v5e float32 107,009 -> 102,246
# cycles, bfloat16 100,086 -> 92,738; v6e float32 102,697 -> 97,754, bfloat16 98,987 -> 91,246 (v5e
# float32 with 0 plain passes 114,037, 2: 106,023, 3: 103,928). A row with top-k off in such a batch
# searches all its candidates: more snapping passes, the same value.
TOP_P_AFTER_TOP_K_PASSES = 1
# A stage of more than NARROW_STAGE_ROWS rows (the grouped kernel's, 64 rows and more) evaluates
# SEARCH_SPLITS_WIDE points a plain pass over more passes: there a pass's 7 points cost 2.6x its 3 (the
# stage alone, 64 rows, v5e, top_k: ~2.3k cycles a 7-point pass, 877 a 3-point one, 1.1k at 4, 1.6k at 5,
# 0.8k at 2: the 7 statistics' accumulators over the stage's 8 row tiles spill), so 3 points (2 bits a
# pass) narrow the bracket for the fewest cycles. Static estimate, v5e, B=64, V=128256, the workload's
# trips, float32 / bfloat16, 7 x (4 / 3) -> 3 x (6 / 5) -> 3 x (5 / 4) plain passes: top_k 71,845 /
# 58,837 -> 67,886 / 56,284 -> 68,190 / 55,432 cycles; full 82,133 / 68,167 -> 77,644 / 64,396 ->
# (79,549 / 64,153 with two plain passes after top-k); top_p 124,679 / 111,573 -> 120,309 / 109,139 ->
# 121,236 / 108,398. Float32 takes 6 (4096x narrower, as 7 x 4), bfloat16 4 (256x: a snapping pass or
# less left on the workload's rows); top-p after top-k keeps its one plain pass.
SEARCH_SPLITS_WIDE = 3
SEARCH_PASSES_WIDE_BY_DTYPE = {jnp.dtype(jnp.float32): 6, jnp.dtype(jnp.bfloat16): 4}
# The draw's index search: DRAW_SPLITS + 1 sub-ranges a pass, DRAW_SPLITS_WIDE on a stage of more than
# NARROW_STAGE_ROWS rows, where each point's sum over the candidates costs more against the pass's
# latency. Static estimate, v5e, V=128256, float32, the workload's trips, splits
# 1 / 2 / 3 / 7: B=64 (one stage of 64 rows) top_k 72,866 / 72,453 / 73,654 / - cycles, full 83,142 /
# 82,720 / 83,932 / -, bfloat16 top_k 59,860 / 59,442 / 60,646 / 65,570 (full - / 68,756 / 69,968);
# B=8 (8 rows) top_k 20,199 / 19,011 / 18,649 / -, full 21,571 / 22,323 / 21,660 / -.
DRAW_SPLITS, DRAW_SPLITS_WIDE, NARROW_STAGE_ROWS = 3, 2, 16
# The draw's points step ceil(w / (splits + 1)) across a bracket of width w, computed in float32 (a
# convert, an add, a multiply, a convert back: exact for every w up to FLOAT_STEP_WIDTH and splits + 1 <=
# 8, checked exhaustively in numpy) rather than by int32 floor division, which Mosaic lowers to ~28
# integer operations a vreg (multiplies, shifts, carries, sign fix-ups) on every (R, 1) point, each pass:
# ~30% of a 64-row stage's draw loop (bundle dump). Static estimate, the stage alone (64 rows, v5e):
# top_k 20,109 -> 19,315 cycles, top-p alone 39,032 -> 37,956.
FLOAT_STEP_WIDTH = 1 << 21
# The fold (`fold`): the first level's 2W candidates (64 lane groups at 4096 columns, 128 at WIDE_GROUPS)
# onto FOLD_GROUPS lane groups, 16 values a lane (32 at WIDE_GROUPS), FOLD_KEEP kept: 2,048 candidates a
# row instead of 8,192 (16,384), so every search and draw pass reads 4x (8x) fewer vregs (a 16-row
# block's search pass was 787 bundles, 7 x 128 compares).
# Static estimate, v5e, B=64, V=128256, the workload's trips, float32 / bfloat16: top_k 107,895 /
# 101,792 cycles unfolded, 91,586 / 82,465 folded; full 147,757 / 137,241 -> 118,096 / 108,396; blocks
# falling back still 3.1%. Measured with fixed trips (top_k float32), other shapes: 4 groups keeping 3
# 81,697 (but 4.7% of blocks fell back: four of a top-50 on one of 512 lanes), 8 keeping 3 85,288,
# 8 keeping 2 82,231, 2 keeping 4 81,328 or 5 82,519 (more fallbacks for a larger k).
FOLD_GROUPS = 4
FOLD_KEEP = 4  # values kept per folded lane
# Full-vocabulary top-p (neither top-k nor min-p on) keeps far more tokens than top-k 50: on the
# workload's rows (normal x 3 logits, temperature 0.7, p 0.9) 1 to 785 at V=128256 (median 332) and 10 to
# 1,455 at V=256000. Two candidates a column lane then miss a kept token in a third of the rows (every
# 16-row block fell back), so top-p alone takes TOP_P_DEPTH candidates a lane. Rows that would fall
# back, numpy over 256 workload rows, 32 column groups (blocks of 16 rows): depth 3 2.3% (37.5% of
# blocks), 4 0% at V=128256; at V=256000 depth 4 0.4% (6.2% of blocks), 5 0%. Unfolded, its 16,384
# candidates a row made every search and draw pass 8x the top-k path's: 137,887 cycles at B=64, V=32000
# (the whole-row path's was 102,764), and the V=128256 profiled compile outgrew 24 GB of host memory.
TOP_P_DEPTH = 4
# Its fold: onto TOP_P_FOLD_GROUPS lane groups, each folded lane keeping 7 values (7,168 candidates a row)
# up to TOP_P_WIDE_VOCAB, 8 (8,192) above it, where the kept sets are larger. Static estimate, v5e,
# B=64, float32, top-p alone: V=128256 fixed trips 153,461 cycles keeping 6, 165,797 keeping 8, 192,201
# onto 16 groups keeping 6; V=256000 the workload's trips 367,714 keeping 6 (27% of blocks fell back)
# and 312,449 keeping 8 (6.2%: the depth's own limit). At V=128256 keeping 6, 2 of 1,024 workload rows
# (3.1% of 16-row blocks) had 7 kept tokens on one folded lane (numpy over the reference's kept sets:
# no column lane held more than its 4), and each such block ran the whole-row path (~175k cycles);
# keeping 7, none of the 1,024 did: the workload's trips, B=64, bfloat16 116,465 -> 111,849 cycles,
# float32 131,116 -> 124,943.
TOP_P_FOLD_GROUPS = 8
TOP_P_WIDE_VOCAB = 1 << 17


@dataclasses.dataclass(frozen=True)
class ColumnLayout:
    """Which vregs of a row each column group holds: vreg `j * groups + c` for j < `main_chunks`, then
    vreg `main_chunks * groups + c` for c < `tail` (the row's last vreg among them: partial when V is
    not a multiple of 128, then read as the row's last 128 lanes, those of the vreg before masked)."""

    vocab: int
    groups: int
    main_chunks: int
    tail: int
    depth: int = 2  # the largest values (with their indices) each column lane keeps; the next is its bound

    @classmethod
    def of(cls, vocab: int, depth: int = 2) -> ColumnLayout | None:
        """The layout for rows of `vocab` values, `depth` candidates a column lane; None below one vreg
        (the whole-row path serves)."""
        if vocab < LANES:
            return None
        vregs = -(-vocab // LANES)
        groups = min(WIDE_GROUPS if depth == 2 and vocab >= WIDE_VOCAB else GROUPS, vregs)
        main = (vregs - 1) // groups
        return cls(vocab, groups, main, vregs - main * groups, depth)

    @property
    def width(self) -> int:
        return self.groups * LANES

    @property
    def fold_shape(self) -> tuple[int, int]:
        """(folded lane groups, values kept a folded lane) for this depth and vocabulary."""
        if self.depth == 2:
            return FOLD_GROUPS, FOLD_KEEP
        return TOP_P_FOLD_GROUPS, 7 if self.vocab <= TOP_P_WIDE_VOCAB else 8

    @property
    def fold_groups(self) -> int | None:
        """The folded candidates' lane groups (`fold`), or None where folding would not shrink them or
        would not fall evenly: the candidates' `depth` x `groups` lane groups and the bounds' `groups` must
        each fall evenly onto FOLD_GROUPS, more than FOLD_KEEP values a folded lane (every vocabulary from
        3,969 up, where there are 32 or WIDE_GROUPS column groups). Deeper layouts (top-p alone) fall onto
        `fold_shape`'s groups instead. (Until 2026-12-07 only the candidates' count was checked, and a
        count of column groups that is no multiple of the folded groups, V=1280 or 1792 for top-k, 2304
        to 3840 for top-p alone, failed in `fold` on the bounds' last, partial slice.)"""
        groups, keep = self.fold_shape
        lane_groups = self.depth * self.groups
        if self.groups % groups or lane_groups // groups <= keep:
            return None
        return groups

    @property
    def folded_lanes(self) -> tuple[int, int]:
        """Lanes of `fold`'s values and ids, and of its bounds (the column pass's own where it does not fold)."""
        groups = self.fold_groups
        if groups is None:
            return self.depth * self.width, self.width
        return self.fold_shape[1] * groups * LANES, groups * LANES

    @property
    def partial(self) -> bool:
        return self.vocab % LANES != 0

    @property
    def last_lanes(self) -> int:
        """The vreg index `for_each_column` gives the row's last 128 lanes where V is not a multiple of 128
        (read as lanes V - 128 .. V - 1, not at a vreg boundary): one past the row's vregs."""
        return -(-self.vocab // LANES)

    def parts(self, count: int) -> tuple[tuple[int, int], ...]:
        """The main chunks split into up to `count` ranges [lo, hi) of about equal length, in order: a
        pass folded part by part (`for_each_column`'s `chunks`) reads vocabulary lanes
        [lo x W, hi x W) in each, the last part also the tail vregs, up to V (`part_lanes`)."""
        count = max(1, min(count, self.main_chunks))
        edges = [self.main_chunks * i // count for i in range(count + 1)]
        return tuple(itertools.pairwise(edges))

    def part_lanes(self, count: int) -> tuple[tuple[int, int], ...]:
        """The vocabulary lanes [start, stop) each of `parts(count)` reads: [lo x W, hi x W), the last
        one up to V (its tail vregs and the row's partial last vreg)."""
        parts = self.parts(count)
        return tuple(
            (lo * self.width, self.vocab if i == len(parts) - 1 else hi * self.width)
            for i, (lo, hi) in enumerate(parts)
        )

    def scratch_bytes(self, rows: int) -> int:
        """VMEM the candidates take: values and indices (R, depth x W), the bounds (R, W)."""
        return rows * self.width * 4 * (2 * self.depth + 1)


Prepare = Callable[[jax.Array, jax.Array], jax.Array]


def _lane_tree(a: jax.Array, combine: Callable, reduce: Callable) -> jax.Array:
    """A row reduction of a candidates-sized (R, n x 128) array: its vregs combined elementwise in a
    tree (VALU operations, a few levels deep), then one cross-lane reduction; the whole-row block's
    reductions (`sampler.BlockReductions`) would cost a cross-lane reduction per slice."""
    return reduce(tree(combine, [a[:, i : i + LANES] for i in range(0, a.shape[-1], LANES)]), axis=-1, keepdims=True)


def tree(combine: Callable, parts: list[jax.Array]) -> jax.Array:
    """`parts` combined pairwise, level by level: each combine waits for one level, not for all before
    it (a serial chain of dependent operations is what bounds these kernels' passes)."""
    while len(parts) > 1:
        parts = [combine(*parts[i : i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


@dataclasses.dataclass(frozen=True)
class RowReductions:
    """The candidates' row reductions: lane trees for Mosaic; in interpret mode plain reductions, the
    same values up to the order of a sum's terms (interpret mode's XLA compile slows with every slice)."""

    tree: bool = True

    def max(self, a: jax.Array) -> jax.Array:
        return _lane_tree(a, jnp.maximum, jnp.max) if self.tree else jnp.max(a, axis=-1, keepdims=True)

    def min(self, a: jax.Array) -> jax.Array:
        return _lane_tree(a, jnp.minimum, jnp.min) if self.tree else jnp.min(a, axis=-1, keepdims=True)

    def sum(self, a: jax.Array) -> jax.Array:
        return _lane_tree(a, jnp.add, jnp.sum) if self.tree else jnp.sum(a, axis=-1, keepdims=True)


def _fold_vreg(x_ref, layout: ColumnLayout, prepare: Prepare, update, j, c, acc):
    """Folds column group `c`'s vreg `j` (the row's vreg `j * groups + c`, a whole one) into `acc`."""
    lane = lax.broadcasted_iota(jnp.int32, (x_ref.shape[0], LANES), 1)
    vreg = j * layout.groups + c
    start = pl.multiple_of(vreg * LANES, LANES)
    x = prepare(x_ref[:, pl.ds(start, LANES)].astype(jnp.float32), lane + start)
    return update(acc, x, lane + start, vreg)


def _fold_columns(
    x_ref, layout: ColumnLayout, prepare: Prepare, columns: list, chunks: tuple[int, int], update, accs, unroll: int
):
    """Folds `update(acc, values, idx, vreg)` over vregs lo..hi-1 (`chunks`) of each column group in
    `columns` (one acc each), their vregs interleaved in one loop: each column's fold is a dependency
    chain (every insertion waits for the last), so several columns at once fill the VALU slots that one
    leaves idle."""

    def step(j, accs):
        fold = functools.partial(_fold_vreg, x_ref, layout, prepare, update, j)
        return tuple(fold(c, acc) for c, acc in zip(columns, accs, strict=True))

    lo, hi = chunks
    if hi <= lo:
        return accs
    return lax.fori_loop(lo, hi, step, accs, unroll=max(1, min(unroll // len(columns), hi - lo)))


def _fold_last(x_ref, layout: ColumnLayout, prepare: Prepare, update, acc):
    """Folds the row's last, partial vreg into its column's `acc`: read as the row's last 128 lanes
    (a static slice), the lanes of the vreg before masked to -inf."""
    lane = lax.broadcasted_iota(jnp.int32, (x_ref.shape[0], LANES), 1)
    start = layout.vocab - LANES
    idx = lane + start
    first = (layout.main_chunks * layout.groups + layout.tail - 1) * LANES
    x = prepare(x_ref[:, start : layout.vocab].astype(jnp.float32), idx)
    return update(acc, jnp.where(idx >= first, x, NEG_INF), idx, layout.last_lanes)


def for_each_column(
    x_ref,
    layout: ColumnLayout,
    prepare: Prepare,
    init,
    update,
    finish,
    carry,
    unroll: int = UNROLL,
    together: int = COLUMNS_TOGETHER,
    chunks: tuple[int, int] | None = None,
    resume: Callable | None = None,
):
    """`carry = finish(c, acc, carry)` for each column group c in order, `acc` being `init()` folded by
    `update(acc, values, idx, vreg)` over the group's vregs in vocabulary order (`vreg`: the row's vreg
    index, a scalar; `layout.last_lanes` for the row's last 128 lanes). `prepare(x, idx)` turns
    each loaded vreg (float32) into the values folded (sanitising, masks). `together` columns are folded
    at once (`_fold_columns`); `unroll` vregs a loop trip in all.

    `chunks` (lo, hi) folds one part of the row (`ColumnLayout.parts`): only main chunks lo..hi-1, the
    acc starting from `resume(c)` (what `finish` stored for the part before) unless lo is 0, and the
    column's tail and the row's last vreg only in the part that reaches `main_chunks`: part by part, the
    same values in the same order as in one go, so a pass can start on the part of a block already
    copied."""
    lo, hi = (0, layout.main_chunks) if chunks is None else chunks
    ends = hi == layout.main_chunks
    full_tail = layout.tail - 1 if layout.partial else layout.tail

    def columns(first, count: int, carry, with_tail: bool, last: bool = False):
        cs = [first + i for i in range(count)]
        accs = tuple(init() if lo == 0 else resume(c) for c in cs)
        accs = _fold_columns(x_ref, layout, prepare, cs, (lo, hi), update, accs, unroll)
        for c, acc in zip(cs, accs, strict=True):
            if with_tail and ends:  # the column's vreg after its main chunks
                acc = _fold_vreg(x_ref, layout, prepare, update, layout.main_chunks, c, acc)
            if last and ends:
                acc = _fold_last(x_ref, layout, prepare, update, acc)
            carry = finish(c, acc, carry)
        return carry

    def segment(lo: int, hi: int, carry, with_tail: bool):  # columns lo..hi-1, `together` at a time
        sets, rest = divmod(hi - lo, together)
        if sets:
            carry = lax.fori_loop(0, sets, lambda s, k: columns(lo + s * together, together, k, with_tail), carry)
        if rest:  # the last few columns at once, written out once
            carry = columns(hi - rest, rest, carry, with_tail)
        return carry

    # columns with a full tail vreg, the partial one's column (static), the columns without a tail vreg
    carry = segment(0, full_tail, carry, True)
    if layout.partial:
        carry = columns(full_tail, 1, carry, False, last=True)
    return segment(layout.tail, layout.groups, carry, False)


def _column_lanes(layout: ColumnLayout, level: int, c) -> pl.Slice:
    """Column group c's 128 lanes at `level` of a pass's (R, levels x W) output."""
    return pl.ds(pl.multiple_of(level * layout.width + c * LANES, LANES), LANES)


def _for_each_part(
    x_ref, layout: ColumnLayout, prepare: Prepare, init, update, finish, resume, unroll, together, parts, wait, carry=0
):
    """`for_each_column` over `layout.parts(parts)` in order, `wait(k)` (if given) before part k; `finish`
    stores each column's acc where `resume` reads it back for the next part, and its carry goes on from
    part to part (returned)."""
    for k, chunks in enumerate(layout.parts(parts)):
        if wait is not None:
            wait(k)
        carry = for_each_column(x_ref, layout, prepare, init, update, finish, carry, unroll, together, chunks, resume)
    return carry


def _with_mass(rows: int, mass_scale: jax.Array | None, init, update, finish, resume):
    """A pass's `for_each_column` functions, also summing `exp(x * mass_scale)` ((R, 1)) over every value
    into their carry ((R, 128), returned by `_for_each_part`) where `mass_scale` is given (`FusedMass`);
    as they are, with a carry of 0, where it is None."""
    if mass_scale is None:
        return init, update, finish, resume, 0
    zero = jnp.zeros((rows, LANES), jnp.float32)
    return (
        lambda: (init(), zero),
        lambda acc, x, idx, vreg: (update(acc[0], x, idx, vreg), acc[1] + jnp.exp(x * mass_scale)),
        lambda c, acc, carry: finish(c, acc[0], carry) + acc[1],
        lambda c: (resume(c), zero),
        zero,
    )


def _mass_of(carry) -> jax.Array | None:
    return None if isinstance(carry, int) else jnp.sum(carry, axis=-1, keepdims=True)


def _shift_in(above: list[jax.Array], new: jax.Array, held: tuple) -> tuple:
    """`held` (largest first) with `new` inserted where `above[j]` (`new` above held[j], monotone: True
    up to some j) first holds and the rest shifted down one slot, the last dropped: one select at the
    top, two a slot below it. The insertions below move values and ids alike through it."""
    shifted = [jnp.where(above[0], new, held[0])]
    for j in range(1, len(held)):
        shifted.append(jnp.where(above[j - 1], held[j - 1], jnp.where(above[j], new, held[j])))
    return tuple(shifted)


def _network(held: tuple, carried: jax.Array) -> tuple[tuple, jax.Array]:
    """`carried` inserted into `held` (largest first) by a max / min network: (the new held, the one
    pushed out)."""
    out = []
    for a in held:
        out.append(jnp.maximum(a, carried))
        carried = jnp.minimum(a, carried)
    return tuple(out), carried


def _top_m(acc, x, idx, _vreg=None):
    """Insertion into a column lane's m largest values with their indices and the (m + 1)-th largest
    value (its bound); a later value equal to a held one goes below it (lower index first among equal
    values). Compares and selects only, so a NaN (every compare false) changes nothing: the pass needs no
    sanitising (m = 2: 10 VALU operations a vreg, where max/min insertion and a NaN select took 12). (The
    bound as `max(bound, x)` where x displaces nothing saves a compare and a select, 6% of the pass, but
    lets a NaN into the bound, and a row reduction may drop a NaN (XLA's CPU maximum reduction does):
    the lane's real bound would then be lost.)"""
    held, held_ids = acc
    above = [x > a for a in held]
    return _shift_in(above, x, held), _shift_in(above, idx, held_ids)


def _top_m_network(acc, x, idx, _vreg=None):
    """`_top_m` with the values moved by a max / min network (no masks: a NaN is first made -inf) and
    only the indices selected: the same values and indices (but that a 0.0 arriving on a held -0.0 takes
    its slot and leaves it its id: equal values, equal weights). The deeper layout's insertion (TOP_P_DEPTH):
    `_top_m`'s compares, each feeding four selects, outgrew the mask registers (static estimate, v5e,
    B=64, V=128256, float32, top-p alone, fixed trips: 181,871 cycles and an 84 s compile with `_top_m`,
    148,577 and 12 s with this; with m = 2 `_top_m` stays, 87,221 against 87,854 for top_k)."""
    held, held_ids = acc
    x = jnp.where(x == x, x, NEG_INF)
    ids = _shift_in([x > a for a in held[: len(held_ids)]], idx, held_ids)
    values, _ = _network(held, x)  # (the value pushed out of the last slot is not needed: compiled away)
    return values, ids


def column_pass(
    x_ref,
    values_ref,
    ids_ref,
    third_ref,
    layout: ColumnLayout,
    prepare: Prepare,
    unroll: int = UNROLL,
    together: int = COLUMNS_TOGETHER,
    parts: int = 1,
    wait: Callable[[int], None] | None = None,
    mass_scale: jax.Array | None = None,
) -> jax.Array | None:
    """Writes the block's candidates: values_ref / ids_ref (R, m x W), m = `layout.depth`, hold each
    column lane's largest value (lanes [0, W)), second largest (lanes [W, 2W)), ... with their vocabulary
    indices, third_ref (R, W) the (m + 1)-th largest (the lane's bound; the third for m = 2); -inf (index
    0) where a column holds fewer values. `unroll`, `together`: `for_each_column`'s (the same values
    whatever they are). `parts`: the block read in `layout.parts(parts)`, `wait(k)` called before part k
    (a copy of its lanes, `ColumnLayout.part_lanes`, awaited), each column's candidates stored between
    parts in the refs themselves: the same values. `mass_scale` ((R, 1)): also each row's sum of
    `exp(x * mass_scale)`, returned (`FusedMass`); None returned without it."""
    rows, depth = x_ref.shape[0], layout.depth
    lanes = functools.partial(_column_lanes, layout)

    def init():
        ninf = jnp.full((rows, LANES), NEG_INF, jnp.float32)
        zero = jnp.zeros((rows, LANES), jnp.int32)
        return (ninf,) * (depth + 1), (zero,) * depth

    def resume(c):
        values = tuple(values_ref[:, lanes(level, c)] for level in range(depth))
        return (*values, third_ref[:, lanes(0, c)]), tuple(ids_ref[:, lanes(level, c)] for level in range(depth))

    def finish(c, acc, carry):
        values, ids = acc
        for level in range(depth):
            values_ref[:, lanes(level, c)] = values[level]
            ids_ref[:, lanes(level, c)] = ids[level]
        third_ref[:, lanes(0, c)] = values[depth]
        return carry

    insert = _top_m if depth == 2 else _top_m_network
    init, insert, finish, resume, carry = _with_mass(rows, mass_scale, init, insert, finish, resume)
    carry = _for_each_part(x_ref, layout, prepare, init, insert, finish, resume, unroll, together, parts, wait, carry)
    return _mass_of(carry)


# Keys (bfloat16 logits, `keyed`): a bfloat16 value widened to float32 leaves the low 16 bits zero, so
# one float32 *key* carries both the value and where it came from: the value clamped to the finite
# bfloat16 range (+-KEY_LIMIT: an infinity with code bits would be a NaN), its low 16 bits KEY_CODE ^ the
# row's vreg index. Keys order as their values wherever the values differ (the code bits never reach the
# next bfloat16 value), and equal values by their codes (lower index first among equal positive values,
# last among negative ones: which of equal values a lane holds never changes a kept set, since a tie
# straddling the held ones leaves its value in the bound and the row falls back). The column pass keeps
# each lane's m + 1 largest keys with a float max / min network (2m + 1 operations a vreg, three to make
# the key) instead of compares and selects moving values and indices apart (m = 2: ~10 operations, m =
# TOP_P_DEPTH: ~20); the fold works on the keys the same way, and only the folded candidates are decoded
# (`key_values`, `key_ids`): the value is the key's bits less the code, the index comes from the code and
# the lane. What the clamp and the float arithmetic change, `sample(..., keys=True)` checks per row (the
# row falls back to the whole-row path, which is exact, where any of these could matter):
# - -inf and the lowest finite value share one key value, -KEY_LIMIT: exact while nothing at or below it is
#   kept and it weighs 0 (then it is -inf for every stage);
# - +inf and the largest finite value share +KEY_LIMIT: exact only while the row's maximum is below it;
# - a NaN (stage 5: -inf) makes a NaN key, which a NaN-propagating maximum spreads over its lane, the
#   lane's bound then +inf (the row falls back); a maximum that drops NaN drops it (as -inf, exact);
# - zeros and subnormals make subnormal keys, whose code a flush-to-zero unit may lose or duplicate
#   (their order among themselves is then arbitrary): exact while no such value is kept.
KEY_LIMIT = float(jnp.finfo(jnp.bfloat16).max)
KEY_CODE = 0xFFFF  # the low bits: KEY_CODE ^ the vreg index
EMPTY_KEY = float("-inf")  # an empty slot (code 0: no vreg has index KEY_CODE)
TINY = float(jnp.finfo(jnp.float32).tiny)  # the least normal float32: keys below it in magnitude are subnormal


def keyed(dtype) -> bool:
    """Whether the column pass and the fold run on keys: bfloat16 logits (16 free low bits in their
    float32 form), every layout. Static estimate, v5e, B=64, V=128256, bfloat16, the workload's trips
    (no block fell back either way), compares (two-deep) and int32 keys (top-p alone) -> float32 keys:
    top_k 51,970 -> 43,655 cycles, full 57,869 -> 48,559, top_p 100,124 -> 78,537. One (16, 128256)
    block's column pass alone, less its copy: two-deep ~7.0k cycles with compares, ~4.7k on float keys
    (~8.0k on the int32 keys this replaced, whose integer maximum Mosaic issues as a compare and a
    select); four-deep ~12.2k on int32 keys, ~6.4k on float keys."""
    return jnp.dtype(dtype) == jnp.bfloat16


def _key(x: jax.Array, vreg: int | jax.Array) -> jax.Array:
    """The keys of `x` ((R, 128) float32 widened from bfloat16) read from the row's vreg `vreg`."""
    bits = lax.bitcast_convert_type(jnp.minimum(jnp.maximum(x, -KEY_LIMIT), KEY_LIMIT), jnp.int32)
    return lax.bitcast_convert_type(bits | (KEY_CODE ^ vreg), jnp.float32)


def key_values(keys: jax.Array, nan: float) -> jax.Array:
    """The float32 values of `keys`; a NaN's as `nan` (-inf in a candidate slot, +inf in a bound)."""
    bits = lax.bitcast_convert_type(keys, jnp.int32) & ~KEY_CODE
    values = lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(values == values, values, jnp.float32(nan))


def key_ids(keys: jax.Array, layout: ColumnLayout) -> jax.Array:
    """The vocabulary indices of `keys` (R, n x 128), each where its lane puts it in its vreg (the row's
    last 128 lanes where V is not a multiple of 128: `ColumnLayout.last_lanes`); V (no token, and no EOS
    id) for an empty slot or a code lost to a flush to zero."""
    vreg = KEY_CODE ^ (lax.bitcast_convert_type(keys, jnp.int32) & KEY_CODE)
    lane = lax.broadcasted_iota(jnp.int32, keys.shape, 1) & (LANES - 1)
    ids = jnp.where(vreg == layout.last_lanes, layout.vocab - LANES + lane, vreg * LANES + lane)
    return jnp.where(vreg <= layout.last_lanes, ids, layout.vocab)


def key_pass(
    x_ref,
    keys_ref,
    layout: ColumnLayout,
    unroll: int = UNROLL,
    together: int = COLUMNS_TOGETHER,
    parts: int = 1,
    wait: Callable[[int], None] | None = None,
    mass_scale: jax.Array | None = None,
) -> jax.Array | None:
    """`column_pass` for bfloat16 logits, on keys: keys_ref (R, (m + 1) x W) float32 gets each column
    lane's m largest keys (lanes [0, W) the largest, ...) and then the (m + 1)-th largest (lanes
    [m W, (m + 1) W): its bound); EMPTY_KEY where a column holds fewer values. Nothing is decoded here
    (`fold_keys` does it once folded). `parts`, `wait`, `mass_scale`: `column_pass`'s."""
    rows, depth = x_ref.shape[0], layout.depth
    lanes = functools.partial(_column_lanes, layout)

    def init():
        return (jnp.full((rows, LANES), EMPTY_KEY, jnp.float32),) * (depth + 1)

    def update(acc, x, _idx, vreg):
        held, last = _network(acc[:depth], _key(x, vreg))
        return (*held, jnp.maximum(acc[depth], last))

    def finish(c, acc, carry):
        for level in range(depth + 1):
            keys_ref[:, lanes(level, c)] = acc[level]
        return carry

    def resume(c):
        return tuple(keys_ref[:, lanes(level, c)] for level in range(depth + 1))

    init, update, finish, resume, carry = _with_mass(rows, mass_scale, init, update, finish, resume)
    carry = _for_each_part(
        x_ref, layout, lambda x, idx: x, init, update, finish, resume, unroll, together, parts, wait, carry
    )
    return _mass_of(carry)


def drop_candidates(values: jax.Array, ids: jax.Array, dropped: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The candidates less the `dropped` ones ((R, n) like `values` / `ids`: tokens masked after the
    column pass, as stage 4 masks EOS ids): their slots empty (-inf, index 0). Each column lane's bound
    stays the bound of what lies outside the candidates (everything left there is at most it, a dropped
    value below it included), so `sample`'s exactness checks stay sound: at worst a block falls back."""
    return jnp.where(dropped, NEG_INF, values), jnp.where(dropped, 0, ids)


def _insert(acc: tuple, x: jax.Array, idx: jax.Array) -> tuple:
    """Insertion into a folded lane's FOLD_KEEP largest values (largest first), their indices, and the
    largest of the rest (the lane's bound); a later value equal to a held one goes below it. Compares
    and selects, as `_top_m`: a -inf value (an empty candidate slot) never displaces one."""
    held, held_ids, rest = acc
    above = [x > a for a in held]
    return (
        _shift_in(above, x, held),
        _shift_in(above, idx, held_ids),
        jnp.maximum(rest, jnp.where(above[-1], held[-1], x)),
    )


def _exchange(a: tuple, b: tuple) -> tuple[tuple, tuple]:
    """Compare-exchange of two (values, ids) slots: (the larger's, the smaller's), lane by lane; `a` first
    where they are equal."""
    (a_values, a_ids), (b_values, b_ids) = a, b
    up = b_values > a_values
    larger = (jnp.where(up, b_values, a_values), jnp.where(up, b_ids, a_ids))
    return larger, (jnp.where(up, a_values, b_values), jnp.where(up, a_ids, b_ids))


def _exchange_keys(a: tuple, b: tuple) -> tuple[tuple, tuple]:
    """`_exchange` for (keys,) slots (`key_pass`'s): a maximum and a minimum."""
    return (jnp.maximum(a[0], b[0]),), (jnp.minimum(a[0], b[0]),)


Exchange = Callable[[tuple, tuple], tuple[tuple, tuple]]


def _bitonic(slots: list, exchange: Exchange) -> list:
    """A bitonic list of slots (power-of-two length) sorted largest first: a bitonic merge network,
    log2(n) rounds of n / 2 exchanges."""
    slots, distance = list(slots), len(slots) // 2
    while distance:
        for i in range(len(slots)):
            if not i & distance:
                slots[i], slots[i + distance] = exchange(slots[i], slots[i + distance])
        distance //= 2
    return slots


def _merge(a: list, b: list, keep: int, bound: jax.Array, exchange: Exchange) -> tuple[list, jax.Array]:
    """The `keep` largest slots of two lists sorted largest first (equal power-of-two lengths), sorted,
    and `bound` raised to the largest of the rest: both whole where they fit in `keep`; else each slot
    of `a` against its mirror in `b` (the larger ones are the top, a bitonic list) and then sorted."""
    if 2 * len(a) <= keep:
        return _bitonic(a + b[::-1], exchange), bound
    top = []
    for x, y in zip(a, reversed(b), strict=True):
        larger, smaller = exchange(x, y)
        top.append(larger)
        bound = jnp.maximum(bound, smaller[0])
    return _bitonic(top, exchange), bound


def _merge_tree(lists: list, keep: int, bound: jax.Array, empty: tuple, exchange: Exchange) -> tuple[list, jax.Array]:
    """`lists` (each sorted largest first, power-of-two lengths) merged pairwise, round by round (an odd
    one out waits a round; a shorter list is padded with `empty` slots), into one list of at most `keep`
    slots; `bound` raised to the largest slot dropped."""
    while len(lists) > 1:
        merged = []
        for a, b in zip(lists[0::2], lists[1::2], strict=False):
            n = max(len(a), len(b))
            top, bound = _merge(a + [empty] * (n - len(a)), b + [empty] * (n - len(b)), keep, bound, exchange)
            merged.append(top)
        lists = merged + lists[len(merged) * 2 :]
    return lists[0], bound


def _merge_capacity(keep: int) -> int:
    """The slots the merges keep: the least power of two >= `keep` (the slots past `keep` then go to the
    bound)."""
    return 1 << (keep - 1).bit_length()


def _fold_lists(
    columns: list, keep: int, bound: jax.Array, empty: tuple, exchange: Exchange, sorted_levels: bool
) -> tuple[list, jax.Array]:
    """The folded slots of a folded lane group: `columns` (a list of slots a column lane: its levels),
    each sorted first unless `sorted_levels`, merged into the `keep` largest (padded with `empty`), and
    `bound` raised to the largest of the rest."""
    if not sorted_levels:
        columns = [
            _merge_tree([[slot] for slot in levels], len(levels), bound, empty, exchange)[0] for levels in columns
        ]
    held, bound = _merge_tree(columns, _merge_capacity(keep), bound, empty, exchange)
    for slot in held[keep:]:  # merged past `keep` (7 kept of 8): to the bound
        bound = jnp.maximum(bound, slot[0])
    return held[:keep] + [empty] * (keep - len(held)), bound


def merges(layout: ColumnLayout) -> bool:
    """Whether `fold` (values and ids: float32 logits; `fold_keys` merges every layout) merges sorted
    lists (`fold_merged`) for this layout: the deeper layouts (top-p alone's TOP_P_DEPTH levels into 7
    or 8 kept), their depth a power of two at most the merges' capacity. The two-deep layout inserts:
    merging its pairs into 4 kept measured faster alone (the fold of one (16, 128256) block, v5e: 1,350
    -> 920 cycles) but not in the kernel (static estimate, v5e,
    B=64, V=128256, the workload's trips, float32 / bfloat16: top_k 67,886 / 55,432 -> 68,473 / 56,206
    cycles, full 77,644 / 63,544 -> 77,810 / 63,899; v6e top_k 56,080 / 52,258 -> 55,835 / 51,901), where
    top-p alone's gained (v5e 120,309 / 108,398 -> 116,702 / 104,366, v6e 114,687 / 105,105 -> 108,596 /
    100,638: its insertion kept 7 at ~35 VALU operations a vreg; its fold alone 2,458 -> 920 cycles)."""
    depth = layout.depth
    return depth > 2 and not depth & (depth - 1) and depth <= _merge_capacity(layout.fold_shape[1])


def fold(
    values: jax.Array,
    ids: jax.Array,
    third: jax.Array,
    layout: ColumnLayout,
    sorted_levels: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The second level of candidates: `values` / `ids` (R, 2W) and `third` (R, W) from the column pass
    (after `drop_candidates`) -> values / ids (R, FOLD_KEEP x G) and bounds (R, G), G =
    `layout.fold_groups` x 128 lanes. Lane group j of the candidates falls on folded group j %
    fold_groups; each folded lane keeps the FOLD_KEEP largest values that fall on it (-inf, index 0,
    where fewer are finite), and its bound is the largest of the others and of the third values folded
    onto it, so every row value outside the folded candidates is at most the row's largest bound.
    Where `layout.fold_groups` is None the candidates come back as they are, with `third` as the
    bounds.

    Where `merges(layout)`, each column lane's levels are one list sorted largest first (as the column pass
    leaves them; `sorted_levels=False` sorts them first, for candidates some of which were dropped to
    -inf) and the lists falling on a folded lane are merged in a tree, keeping the largest (`_merge`):
    ~14 VALU operations a candidate vreg where inserting them one by one (`_insert`) takes ~35 keeping
    7. Equal values may then keep other ids than insertion would (a tie straddling the kept ones leaves
    its value in the bound: the row falls back either way); the kept values and the bound are the
    same."""
    groups = layout.fold_groups
    if groups is None:
        return values, ids, third
    if merges(layout):
        return fold_merged(values, ids, third, layout, sorted_levels)
    width = groups * LANES
    rows = values.shape[0]
    ninf = jnp.full((rows, width), NEG_INF, jnp.float32)
    keep = layout.fold_shape[1]
    acc = ((ninf,) * keep, (jnp.zeros((rows, width), jnp.int32),) * keep, ninf)
    for start in range(0, values.shape[1], width):
        acc = _insert(acc, values[:, start : start + width], ids[:, start : start + width])
    held, held_ids, bound = acc
    for start in range(0, third.shape[1], width):
        bound = jnp.maximum(bound, third[:, start : start + width])
    return jnp.concatenate(held, axis=1), jnp.concatenate(held_ids, axis=1), bound


def _column_levels(layout: ColumnLayout, *arrays: jax.Array) -> list:
    """The (R, depth x W) arrays of a column pass as the folds merge them: for each `fold_groups` x 128
    column lanes at once, the list of their levels, each a slot of the arrays' slices."""
    width, level_lanes = layout.fold_groups * LANES, layout.width
    return [
        [tuple(a[:, at : at + width] for a in arrays) for at in range(start, arrays[0].shape[1], level_lanes)]
        for start in range(0, level_lanes, width)
    ]


def fold_merged(
    values: jax.Array, ids: jax.Array, third: jax.Array, layout: ColumnLayout, sorted_levels: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`fold` by merging (`merges(layout)`): the same folded values and bounds."""
    width, rows = layout.fold_groups * LANES, values.shape[0]
    empty = (jnp.full((rows, width), NEG_INF, jnp.float32), jnp.zeros((rows, width), jnp.int32))
    columns = _column_levels(layout, values, ids)
    held, bound = _fold_lists(columns, layout.fold_shape[1], empty[0], empty, _exchange, sorted_levels)
    for start in range(0, third.shape[1], width):
        bound = jnp.maximum(bound, third[:, start : start + width])
    return jnp.concatenate([v for v, _ in held], axis=1), jnp.concatenate([i for _, i in held], axis=1), bound


def fold_keys(
    held_keys: jax.Array, bound_keys: jax.Array, layout: ColumnLayout, sorted_levels: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`fold` on `key_pass`'s keys (the candidates' (R, m x W), the bounds' (R, W)): the same
    folded values and bounds up to the keys' stand-ins (module comment on keys; the keys order values as
    `fold` does, and equal values by their codes, so which of equal values keep their ids may differ from
    `fold`'s: a tie that straddles the kept ones leaves its value in the bound, and the row falls back
    either way), decoded only once folded. Merged as `fold_merged` merges (a key's exchange is a maximum
    and a minimum), each column lane's levels sorted as `key_pass` leaves them unless `sorted_levels` is
    False (keys dropped to EMPTY_KEY), in every layout: on keys the two-deep layout's merges also pay
    (static estimate, v5e, B=64, V=128256, bfloat16, the workload's trips, inserting -> merging: top_k
    43,655 -> 42,694 cycles, full 48,559 -> 48,358), where on compares they did not (`merges`)."""
    assert not layout.depth & (layout.depth - 1) and layout.depth <= _merge_capacity(layout.fold_shape[1])
    groups = layout.fold_groups
    if groups is not None:
        width = groups * LANES
        empty = (jnp.full((held_keys.shape[0], width), EMPTY_KEY, jnp.float32),)
        columns = _column_levels(layout, held_keys)
        held, rest = _fold_lists(columns, layout.fold_shape[1], empty[0], empty, _exchange_keys, sorted_levels)
        for start in range(0, bound_keys.shape[1], width):
            rest = jnp.maximum(rest, bound_keys[:, start : start + width])
        held_keys, bound_keys = jnp.concatenate([k for (k,) in held], axis=1), rest
    values = key_values(held_keys, NEG_INF)
    return values, jnp.where(values > NEG_INF, key_ids(held_keys, layout), 0), key_values(bound_keys, jnp.inf)


def row_mass(
    x_ref,
    layout: ColumnLayout,
    prepare: Prepare,
    inverse_t: jax.Array,
    s_max: jax.Array,
    unroll: int = UNROLL,
    together: int = COLUMNS_TOGETHER,
) -> jax.Array:
    """(R, 1): each row's sum of `exp(x * inverse_t - s_max)` over the whole row (one pass; `unroll`,
    `together`: `for_each_column`'s, which leave the sum's order as it is). A -inf value weighs 0 as it
    is; a NaN makes its row's sum NaN, and `sample` then finds that row's top-p target unmet, so its
    block falls back to the whole-row path (which drops NaN as stage 5 says): no select a vreg for it
    (static estimate, v5e, B=64, V=128256, float32, top-p alone, fixed trips: 153,461 -> 149,481
    cycles). Nor is the maximum's weight pinned to 1 as `weight` pins it (for min-p's sake): this sum
    of V terms matches the reference's to rounding, not bit for bit (its order is not the reference's),
    and at the maximum `x * inverse_t - s_max` is 0 or the product's rounding error, so the pin would
    move it by an ulp of one term for two VALU operations a vreg (v5e, B=64, V=128256, bfloat16, top-p
    alone, the workload's trips: 119,878 -> 116,465 cycles). A row without a finite value sums NaN
    here; `needs_row_mass` leaves such rows out. (Top-p alone takes its rows' mass from the column pass
    instead, `FusedMass`: this pass serves the rows where that sum cannot stand for it.)"""
    rows = x_ref.shape[0]

    def update(acc, x, _idx, _vreg):
        return acc + jnp.exp(x * inverse_t - s_max)

    def finish(c, acc, total):
        return total + acc

    zero = jnp.zeros((rows, LANES), jnp.float32)
    total = for_each_column(x_ref, layout, prepare, lambda: zero, update, finish, zero, unroll, together)
    return jnp.sum(total, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    token: jax.Array  # (R, 1) int32
    threshold: jax.Array  # (R, 1): the top-k / top-p threshold in scaled-logit units (-inf: none)
    s_max: jax.Array
    kept_mass: jax.Array
    x_max: jax.Array
    fallback: jax.Array  # scalar bool: some row's result is not exact from the candidates
    trips: dict[str, jax.Array]
    exact: jax.Array  # (R, 1) bool: the row's result is the spec's (`fallback` is some row's not being so)


def needs_row_mass(
    values: jax.Array,
    bound: jax.Array,
    *,
    temperature: jax.Array,
    k: jax.Array | None,
    p: jax.Array,
    inverse_temperature: Callable[[jax.Array, jax.Array], jax.Array],
    reductions: RowReductions = RowReductions(),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Which rows' top-p `sample` takes over the whole row's mass, not the candidates': (whole (R, 1)
    bool, inverse_t, s_max), from the candidates alone (before the searches), so a kernel can compute
    those rows' mass while their logits are resident and hand it to `sample` later (`row_mass` as an
    array). A row is one when top-p is on (p < 1), top-k leaves it whole (k off, or at least the
    finite candidates: then `sample`'s top-k threshold stays -inf) and values lie outside the
    candidates; `sample` computes the same set after its top-k search."""
    x_max = reductions.max(values)
    inverse_t = inverse_temperature(temperature, x_max)
    s_max = x_max * inverse_t
    has_values = s_max > NEG_INF
    outside = reductions.max(bound) * inverse_t > NEG_INF
    whole = (p < 1.0) & outside & has_values
    if k is not None:
        s = values * inverse_t
        finite = reductions.sum(jnp.where(s >= reductions.min(jnp.where(s > NEG_INF, s, jnp.inf)), 1.0, 0.0))
        whole &= ~((k > 0) & (finite > k))
    return whole, inverse_t, s_max


# The row maxima (in scaled units) at which `FusedMass` stands for the row's mass: at the lowest, a term
# exp(s) it lost to underflow (s below about -87) weighs at most e^-47 of the maximum's, V of them far
# below an ulp of the sum; at the highest, exp(-s_max) stays a normal float (above about 87.3 it is
# subnormal, which a flush-to-zero unit makes 0), and overflow shows as an infinite sum.
FUSED_MASS_LOWEST, FUSED_MASS_HIGHEST = -40.0, 80.0


@dataclasses.dataclass(frozen=True)
class FusedMass:
    """Each row's whole mass taken in the column pass itself (`column_pass` / `key_pass` with
    `mass_scale`), before the row's maximum is known: `mass` = the sum of exp(x * `inverse_t`) over the
    row, `inverse_t` the uncapped 1 / T (`numerics.inverse_temperature` at a maximum of 0). The row's
    mass is then `mass * exp(-s_max)`, the same sum as `row_mass`'s up to rounding (each term rounded
    before the scaling rather than after the shift; neither sums in the reference's order), without a
    second pass over the block: the pass's exp goes to the EUP slot, its multiply and add beside the
    column pass's own VALU work. `usable`: the rows where it is that mass (the temperature's cap did
    not act, the maximum lies in [FUSED_MASS_LOWEST, FUSED_MASS_HIGHEST], the sum is finite, so no +inf
    or NaN logit);
    `mass_where` runs `row_mass`'s pass for the rest."""

    mass: jax.Array
    inverse_t: jax.Array

    def usable(self, inverse_t: jax.Array, s_max: jax.Array) -> jax.Array:
        in_range = (s_max >= FUSED_MASS_LOWEST) & (s_max <= FUSED_MASS_HIGHEST)
        return (inverse_t == self.inverse_t) & in_range & (self.mass < jnp.inf)

    def scaled(self, s_max: jax.Array) -> jax.Array:
        return self.mass * jnp.exp(-jnp.clip(s_max, FUSED_MASS_LOWEST, FUSED_MASS_HIGHEST))


def mass_where(
    whole: jax.Array,
    row_mass: Callable[[jax.Array, jax.Array], jax.Array],
    inverse_t: jax.Array,
    s_max: jax.Array,
    elsewhere: jax.Array,
    fixed: loop_trips.FixedTrips | None,
    fused: FusedMass | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The whole rows' mass (`row_mass(inverse_t, s_max)`, one pass over the block) on the `whole` rows,
    `elsewhere` on the others; the pass runs only where some row needs it (the `row_mass` site): (mass
    (R, 1), its trips). `fused`: the column pass's sums, which stand for the mass on their `usable`
    rows, so the pass runs only where some other row needs it."""
    if fused is not None:
        usable = fused.usable(inverse_t, s_max)
        elsewhere = jnp.where(whole & usable, fused.scaled(s_max), elsewhere)
        whole = whole & ~usable
    (mass, _), trips = loop_trips.while_loop(
        "row_mass",
        fixed,
        lambda st: jnp.any(whole) & (st[1] == 0),
        lambda st: (jnp.where(whole, row_mass(inverse_t, s_max), st[0]), st[1] + 1),
        (elsewhere, jnp.int32(0)),
    )
    return mass, trips


@dataclasses.dataclass(frozen=True)
class SearchShape:
    """How `sample`'s searches narrow their brackets on a stage of some rows: points a plain pass of the
    threshold searches evaluates, the top-k and top-p-alone searches' plain passes, top-p-after-top-k's,
    and the draw's points a pass."""

    splits: int
    plain_passes: int
    top_p_after_top_k_passes: int
    draw_splits: int


def search_shape(rows: int, dtype) -> SearchShape:
    """The `SearchShape` of a stage of `rows` rows sampling logits of `dtype`: narrow stages (a block,
    at most NARROW_STAGE_ROWS rows) SEARCH_SPLITS points a pass, wide ones (a group) SEARCH_SPLITS_WIDE
    (module comments). Only the cost moves: every shape finds the same thresholds and tokens."""
    dtype = jnp.dtype(dtype)
    if rows <= NARROW_STAGE_ROWS:
        passes = SEARCH_PASSES_BY_DTYPE.get(dtype, SEARCH_PASSES)
        return SearchShape(SEARCH_SPLITS, passes, TOP_P_AFTER_TOP_K_PASSES, DRAW_SPLITS)
    passes = SEARCH_PASSES_WIDE_BY_DTYPE.get(dtype, SEARCH_PASSES_WIDE_BY_DTYPE[jnp.dtype(jnp.float32)])
    return SearchShape(SEARCH_SPLITS_WIDE, passes, TOP_P_AFTER_TOP_K_PASSES, DRAW_SPLITS_WIDE)


def draw_points(lo: jax.Array, hi: jax.Array, splits: int, vocab: int) -> list[jax.Array]:
    """`splits` increasing index points cutting the draw's bracket (lo, hi] (int32, per row) into pieces
    of at most ceil((hi - lo) / (splits + 1)) indices each, the last points at most `hi` (a point at `hi`
    only repeats what the bracket knows), so each pass leaves a bracket that much narrower. In float32
    (`FLOAT_STEP_WIDTH`) where the bracket's width allows, else by integer division."""
    if vocab > FLOAT_STEP_WIDTH:
        return [lo + (hi - lo) * j // (splits + 1) for j in range(1, splits + 1)]
    width = (hi - lo).astype(jnp.float32)
    step = ((width + jnp.float32(splits + 0.5)) * jnp.float32(1.0 / (splits + 1))).astype(jnp.int32)
    points = [lo + step]
    for _ in range(1, splits):  # (adds: an int32 multiply is a chain of operations on Mosaic)
        points.append(points[-1] + step)
    return [jnp.minimum(t, hi) for t in points]


def sample(
    values: jax.Array,
    ids: jax.Array,
    bound: jax.Array,
    *,
    temperature: jax.Array,
    k: jax.Array | None,
    p: jax.Array | None,
    min_p: jax.Array | None,
    u: jax.Array,
    vocab: int,
    row_mass: Callable[[jax.Array, jax.Array], jax.Array] | jax.Array,
    search: Callable,
    weight: Callable,
    inverse_temperature: Callable[[jax.Array, jax.Array], jax.Array],
    reductions: RowReductions = RowReductions(),
    fixed: loop_trips.FixedTrips | None,
    dtype=jnp.float32,
    keys: bool = False,
    fused_mass: FusedMass | None = None,
) -> CandidateResult:
    """The spec's stages 6-10 on a block's candidates (module docstring): `values` / `ids` (R, n x 128),
    `bound` (R, m x 128), every row value outside the candidates at most the row's largest bound (the
    first level's third values, or the folded bounds of `fold`); per-row (R, 1) parameters (`k`, `p`,
    `min_p`: None when the stage is off for the block). `row_mass(inverse_t, s_max)`: the whole rows'
    mass (needed by top-p without top-k), run once where some row needs it; or that mass as an (R, 1)
    array, already computed on the rows `needs_row_mass` names (others are not read). `search` is
    `vsampler.core.numerics.largest_value_with_trips`, `weight` `numerics.weight`, `inverse_temperature`
    stage 6's factor (`numerics.inverse_temperature`).
    `dtype`: the logits' (with the rows, it picks the searches' `search_shape`). `fused_mass`: the column
    pass's whole-row sums (`FusedMass`), taken for `row_mass` where usable.

    A random row is exact (`fallback` stays False for it) when no value outside the candidates can be
    kept (all are <= s3, the largest bound):
      - top-k on: its k-th largest candidate is above s3 (then it is the row's k-th largest); top-k
        asked for but k at least the finite candidates: nothing lies outside them;
      - top-p on: the candidates hold the target mass (over the top-k set, or the whole row's);
      - the kept set's lower bound is above s3: the threshold, or min-p's cut when min-p drops s3 (a
        top-p threshold below s3 is then below the cut in the row too, so the kept sets agree);
    and no logit is +inf. A greedy row (the first index of the maximum) is exact when no value outside
    the candidates ties its maximum, and no logit is +inf. `keys`: the candidates were decoded from
    `key_pass`'s keys, and a row is exact only where their stand-ins (module comment on keys) cannot
    matter: no kept candidate at -KEY_LIMIT or below it or subnormal, -KEY_LIMIT weighing 0, the maximum
    below +KEY_LIMIT (for a greedy row: above -KEY_LIMIT and not subnormal)."""
    row_min, row_max, row_sum = reductions.min, reductions.max, reductions.sum
    reductions = {"column_min": row_min, "column_max": row_max}
    shape = search_shape(values.shape[0], dtype)
    x_max = row_max(values)
    first_max = row_min(jnp.where(values == x_max, ids, vocab))
    first_max = jnp.where(first_max == vocab, 0, first_max)
    greedy = temperature == 0.0
    inverse_t = inverse_temperature(temperature, x_max)
    s = values * inverse_t
    s_max = x_max * inverse_t
    bound_max = row_max(bound)
    s3 = bound_max * inverse_t  # at least every value outside the candidates
    outside = s3 > NEG_INF
    # a greedy row's token, the first index of the maximum, is a candidate unless a value outside them
    # ties the maximum (the fold keeps equal values in lane order, not vocabulary order)
    first_max_held = bound_max < x_max
    e = weight(s, s_max)
    has_values = s_max > NEG_INF
    finite = s > NEG_INF
    lowest = row_min(jnp.where(finite, s, jnp.inf))
    exact = ~outside | ~has_values
    threshold = jnp.full_like(s_max, NEG_INF)
    trips = {}

    if k is not None:

        def count_ge(t):
            return row_sum(jnp.where(s >= t, jnp.float32(1), jnp.float32(0)))

        on = (k > 0) & has_values & (count_ge(lowest) > k)
        kth, trips["candidate_top_k"] = search(
            count_ge,
            k,
            s,
            jnp.where(on, lowest, s_max),
            s_max,
            on,
            site="candidate_top_k",
            fixed=fixed,
            splits=shape.splits,
            plain_passes=shape.plain_passes,
            **reductions,
        )
        threshold = jnp.where(on, kth, threshold)
        exact |= on & (kth > s3)  # (k asked for with k >= the finite candidates: exact only if ~outside)
        asked = k > 0
    else:
        asked = jnp.zeros_like(exact)
    # from here, `exact` rows with top-k asked for have an exact top-k set; the others must be bounded
    exact_k = exact | ~asked

    if p is not None:
        kept_e = jnp.where(s >= threshold, e, 0.0)
        candidate_mass = row_sum(kept_e)
        whole = (p < 1.0) & (threshold == NEG_INF) & outside & has_values  # top-p over the whole row
        if callable(row_mass):
            mass, trips["row_mass"] = mass_where(whole, row_mass, inverse_t, s_max, candidate_mass, fixed, fused_mass)
        else:
            mass = jnp.where(whole, row_mass, candidate_mass)
        target = p * mass
        on = (p < 1.0) & has_values & (candidate_mass >= target)
        exact_k &= on | (p >= 1.0) | ~has_values

        def mass_ge(t):
            return row_sum(jnp.where(s >= t, kept_e, 0.0))

        lo = jnp.where(on, jnp.where(threshold > NEG_INF, threshold, lowest), s_max)
        v_star, trips["candidate_top_p"] = search(
            mass_ge,
            target,
            s,
            lo,
            s_max,
            on,
            site="candidate_top_p",
            fixed=fixed,
            splits=shape.splits,
            plain_passes=shape.plain_passes if k is None else shape.top_p_after_top_k_passes,
            **reductions,
        )
        threshold = jnp.where(on, jnp.maximum(threshold, v_star), threshold)

    # nothing outside the candidates is kept: the kept set's lower bound is above s3
    bounded = threshold > s3
    if min_p is not None:
        bounded |= weight(s3, s_max) < min_p
    exact = exact_k & (bounded | ~outside | ~has_values)

    kept = finite & (s >= threshold)
    if min_p is not None:
        kept &= e >= min_p
    kept_e = jnp.where(kept, e, 0.0)
    kept_mass = row_sum(kept_e)
    target = u * kept_mass

    splits = shape.draw_splits

    def prefix_search(_, bracket):
        lo_, hi_ = bracket  # prefix(lo) <= target < prefix(hi)
        points = draw_points(lo_, hi_, splits, vocab)
        return narrow(lo_, hi_, points, [row_sum(jnp.where(ids <= t, kept_e, 0.0)) <= target for t in points])

    passes, width = 0, vocab  # the bracket (-1, V - 1): each pass leaves at most ceil(width / (splits + 1))
    while width > 1:
        passes, width = passes + 1, -(-width // (splits + 1))
    bracket = (jnp.full_like(first_max, -1), jnp.full_like(first_max, vocab - 1))
    _, crossing = lax.fori_loop(0, passes, prefix_search, bracket)
    # `crossing` is then a kept candidate's index wherever the kept mass exceeds the target: the prefix (a
    # sum of non-negative terms in one fixed order) only rises with t, and only at the index of a kept
    # candidate of positive weight (the candidates' indices are distinct), so the bracket's upper end,
    # whose prefix exceeds the target where the one below it does not, is one. `is_kept` guards that
    # anyway (else, as where rounding leaves the target short of the kept mass: the last kept index);
    # the first kept index past `crossing` once stood in, a reduction over every candidate that the
    # argument above never lets choose.
    is_kept = row_max(jnp.where((ids == crossing) & kept, 1, 0)) > 0
    last_kept = row_max(jnp.where(kept, ids, -1))
    sampled = jnp.where(is_kept & (kept_mass > target), crossing, last_kept)
    sampled = jnp.where(kept_mass > 0, sampled, 0)
    token = jnp.where(greedy, first_max, sampled)
    # (logical operations: Mosaic cannot select between boolean vectors)
    greedy_ok = first_max_held | ~outside
    if keys:  # the keys' stand-ins (module comment on keys) must not decide the row
        floor_s = jnp.float32(-KEY_LIMIT) * inverse_t
        stand_in = (values <= -KEY_LIMIT) | (jnp.abs(values) < TINY)
        exact &= (weight(floor_s, s_max) == 0.0) & (row_max(jnp.where(kept & stand_in, 1, 0)) == 0)
        greedy_ok &= (x_max > -KEY_LIMIT) & (jnp.abs(x_max) >= TINY)
    row_ok = (x_max < (KEY_LIMIT if keys else jnp.inf)) & ((greedy & greedy_ok) | (~greedy & exact))
    return CandidateResult(token, threshold, s_max, kept_mass, x_max, ~jnp.all(row_ok), trips, row_ok)
