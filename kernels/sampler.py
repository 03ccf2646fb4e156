"""The fused sampling kernel (Pallas; TPU Mosaic, interpret mode on CPU).

One launch per call; each grid step owns a block of R rows of the logits, resident in VMEM for every
pass, and computes, vectorised over its rows (per-row values are (R, 1) columns):

  stage 0   the allowed-token mask: the row's packed `ceil(V / 32)` int32 words, unpacked in VMEM
  stage 4   the min_tokens EOS mask (the row's "too early" flag is computed from its history outside)
  stage 5   NaN -> -inf; a row holding +inf keeps its +inf tokens (as 0), drops the rest
  stage 6   greedy rows: the first index of the maximum; others: s = x * (1 / T), e = exp(s - max s)
  stage 7   top-k: the k-th largest value by a count search (`largest_value_with`)
  stage 8   top-p: the largest value whose inclusive kept mass reaches p * total, by a mass search
  stage 9   min-p: e >= min_p
  stage 10  the draw: the smallest index whose prefix of kept mass exceeds u * total: the chunk of
            DRAW_LANES lanes where the prefix crosses, from per-chunk sums, then a bisection on the
            index inside that chunk alone (masked sums; Mosaic has no cumsum)
  empty     a row with no finite value left gets its empty-row token (the first EOS id with a mask)
  EOS       finished rows emit the pad id; a row that samples an EOS id becomes finished
  log-probs (when asked) the raw log-normaliser, the token's logit, its rank (one count pass) and the
            top-n logits with their ids, n max-and-first-index reductions over the resident block (no
            further read of the logits)

It writes per row only the token, the new finished flag, a few floats (the kept threshold in
scaled-logit units, the row's scaled maximum, the kept mass, the raw log-normaliser, the token's logit and rank,
and the trips its block's data-dependent loops took, `SITES`, which the static estimate counts) and the
(R, n) top entries, never a (B, V) array: `process_logits` and log-probabilities
(`vsampler.core.logprobs`) are rebuilt from those. Stages 1-3 (bias and penalties) are the shared sparse
`vsampler.core.penalties` pass that runs before the kernel (an O(B * L) scatter: it reads no logits). In the
deviceless v5e compile (B=8 and 64, V=128256) XLA keeps the scattered logits in VMEM (memory space
S(1)): in place on the lm head's output inside a decode step, after one async copy for a standalone
call; an in-kernel scatter would instead be B * L scalar-driven tile updates (Mosaic stores need
128-aligned lane offsets).

With top-k, top-p or min-p on (and no mask), stages 5-10 first run on the block's column candidates
(`candidates.py`: one pass keeps each column lane's two largest values and the third, then a fold keeps
the four largest of each 16 of those; top-p alone, whose kept sets are larger, keeps four a lane and
the fifth, folded to six or eight of each 16); only a block in which some row's kept set could reach
beyond them runs the whole-row stages above (the cond "fallback").

The searches are the same as the XLA path's (`vsampler.impls.xla`): value bisection whose ends snap to the
row's own values, so thresholds are exact token values and the kept sets equal the reference's.
Where the (R, V) temporaries of these whole-row passes do not fit VMEM (v4 above ~50k vocabulary), the
policy picks the chunked variant (`sampler_chunked.py`): the same rows resident, passes over slices.
Where the batch holds several blocks, the candidate path runs grouped (`sampler_grouped.py`): each
grid step takes up to `block_sizes.GROUP_BLOCKS` blocks, each block's candidates as here, then one
sampling stage over all their rows; this module's functions below are its per-block pieces.
Reference: `vsampler.core.reference`. Block sizes: `vsampler.kernels.block_sizes`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from vsampler.kernels import block_sizes, candidates, row_passes
from vsampler.kernels.config import (
    EMPTY_TOKEN,
    EOS_TOO_EARLY,
    FINISHED,
    MIN_P,
    ROW_COLUMNS,
    TOP_K,
    TOP_P,
    KernelConfig,
    T,
    U,
)

from vsampler.core import logprobs as lp
from vsampler.core import trips as loop_trips
from vsampler.core.numerics import NEG_INF, PLAIN_PASSES, inverse_temperature, largest_value_with_trips, weight

# columns of the per-row statistics output (the last three: the block's trips of each data-dependent loop)
THRESHOLD, S_MAX, KEPT_MASS, LOG_Z_RAW, TOKEN_X = range(5)
RANK = 11  # with log-probs: the sampled token's rank (`vsampler.core.logprobs.token_rank`), an exact count
STAT_COLUMNS = 16
X_MAX = STAT_COLUMNS - 1  # the row's largest penalised logit (stage 6's `inverse_temperature` reads it)
# the data-dependent loops, each a site whose trips the static cost estimate counts (`vsampler.tools.estimate`):
# the candidate path's searches and its whole-row mass pass, then the whole-row path's loops, which run
# only where the candidates are not exact for some row of the block (the cond "fallback")
SITES = (
    loop_trips.Site("candidate_top_k", 5),
    loop_trips.Site("candidate_top_p", 6),
    loop_trips.Site("row_mass", 7),
    loop_trips.Site("top_k", 8, guard="fallback"),
    loop_trips.Site("top_p", 9, guard="fallback"),
    loop_trips.Site("draw", 10, guard="fallback"),
)


def output_shapes(batch: int, top_n: int | None = None) -> list[jax.ShapeDtypeStruct]:
    """What both kernel variants write per call: tokens (B, 1) int32, finished flags (B, 1) int32, the
    per-row statistics (B, STAT_COLUMNS) float32 and, when `top_n` is given, the top-n logits (B, n)
    float32 and their ids (B, n) int32."""
    shapes = [
        jax.ShapeDtypeStruct((batch, 1), jnp.int32),
        jax.ShapeDtypeStruct((batch, 1), jnp.int32),
        jax.ShapeDtypeStruct((batch, STAT_COLUMNS), jnp.float32),
    ]
    if top_n:
        shapes += [jax.ShapeDtypeStruct((batch, top_n), jnp.float32), jax.ShapeDtypeStruct((batch, top_n), jnp.int32)]
    return shapes


def stats_block(columns: dict[int, jax.Array], trips: dict[int, jax.Array]) -> jax.Array:
    """The (R, STAT_COLUMNS) statistics of a TPU block: (R, 1) float columns by index, and int32 trip
    counts by column (one per block, repeated on its rows); columns not given are 0."""
    like = next(iter(columns.values()))
    columns = {**columns, **{c: jnp.full_like(like, n.astype(jnp.float32)) for c, n in trips.items()}}
    return jnp.concatenate([columns.get(c, jnp.zeros_like(like)) for c in range(STAT_COLUMNS)], axis=1)


# The kernel's row reductions: over LANE_SLICES static, 128-aligned lane slices of the row block, each
# reduced on its own, then combined. Mosaic lowers one reduction over a whole (R, V) block as a serial
# chain (one dependent vmax or vadd per vreg, each waiting for the last); independent chains fill the
# VALU slots. v5e, an (8, 131072) float32 block: a count pass 2,168 cycles in one chain, 1,002 in 8.
LANE_SLICES = 8


@dataclasses.dataclass(frozen=True)
class BlockReductions:
    """The whole-row reductions of a resident block, (R, V) -> (R, 1): over `slices` lane slices
    combined pairwise (Mosaic: independent chains), or one plain reduction (`slices == 1`, interpret
    mode, whose XLA compile time doubles with the slices). Maxima and minima are the same either way; a
    sum's terms are added in another order (XLA's CPU reduction never had Mosaic's order anyway)."""

    slices: int = LANE_SLICES

    @classmethod
    def for_mode(cls, interpret: bool) -> BlockReductions:
        return cls(1 if interpret else LANE_SLICES)

    def _split(self, a: jax.Array, reduce: Callable, combine: Callable) -> jax.Array:
        lanes = a.shape[-1]
        if self.slices == 1:
            return reduce(a, axis=-1, keepdims=True)
        per_slice = -(-lanes // self.slices)
        width = -(-per_slice // 128) * 128  # a whole number of vregs
        return candidates.tree(
            combine, [reduce(a[..., i : i + width], axis=-1, keepdims=True) for i in range(0, lanes, width)]
        )

    def max(self, a: jax.Array) -> jax.Array:
        return self._split(a, jnp.max, jnp.maximum)

    def min(self, a: jax.Array) -> jax.Array:
        return self._split(a, jnp.min, jnp.minimum)

    def sum(self, a: jax.Array) -> jax.Array:
        return self._split(a, jnp.sum, jnp.add)


def top_entry_columns(
    x: jax.Array, iota: jax.Array, n: int, reductions: BlockReductions
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The n largest values of each row of `x` and their indices, ties lower index first (a stable
    sort's order), as n (R, 1) columns each: entry j is the largest value after entry j-1 in that order,
    one max and one first-index reduction per entry."""
    values, ids = [], []
    prev_v = jnp.full((*x.shape[:-1], 1), jnp.inf, x.dtype)
    prev_i = jnp.full((*x.shape[:-1], 1), -1, jnp.int32)
    for _ in range(n):
        after = (x < prev_v) | ((x == prev_v) & (iota > prev_i))
        prev_v = reductions.max(jnp.where(after, x, NEG_INF))
        prev_i = reductions.min(jnp.where(after & (x == prev_v), iota, jnp.iinfo(jnp.int32).max))
        values.append(prev_v)
        ids.append(prev_i)
    return values, ids


def unpack_allowed_block(words: jax.Array, vocab: int) -> jax.Array:
    """(R, ceil(V / 32)) int32 packed words -> (R, V) bool: token j is bit j % 32 of word j // 32."""
    repeated = jnp.repeat(words, 32, axis=1)[:, :vocab]
    bit = lax.broadcasted_iota(jnp.int32, repeated.shape, 1) % 32
    return (lax.shift_right_logical(repeated, bit) & 1) > 0


def _sanitized_block(
    x_ref,
    allowed_ref,
    *,
    vocab: int,
    eos_mask: Callable[[jax.Array, jax.Array], jax.Array] | None,
    reductions: BlockReductions,
    interpret: bool,
):
    """Stages 0, 4 and 5 on the whole resident block (`eos_mask(x, idx)`: stage 4, the kernel's, or None
    when min_tokens is off): (x (R, V) float32, its row maximum, the first index of it, the lane iota).
    Without an allowed-token mask the maximum and its first index come from one walk over the block's
    ref (`row_passes.max_and_first_index`, NaN never a maximum), not from two reductions over the
    sanitised block."""
    x = x_ref[...].astype(jnp.float32)
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)

    # stage 0: tokens the packed mask does not allow are -inf
    if allowed_ref is not None:
        x = jnp.where(unpack_allowed_block(allowed_ref[...], vocab), x, NEG_INF)

    # stage 4: EOS ids are -inf while the row has generated fewer than min_tokens tokens
    if eos_mask is not None:
        x = eos_mask(x, iota)

    # stage 5: sanitising (NaN -> -inf; a row holding +inf keeps its +inf tokens, as 0, and drops the rest)
    if allowed_ref is None:
        x_max, first_max = row_passes.max_and_first_index(x_ref, vocab, prepare=eos_mask, unrolled=not interpret)
        pos_inf = x_max == jnp.inf
        # in one select: a value below the row's least kept one (-inf; +inf in a +inf row) or NaN is -inf
        least = jnp.where(pos_inf, jnp.inf, NEG_INF)
        x = jnp.where(x >= least, jnp.minimum(x, jnp.where(pos_inf, 0.0, jnp.inf)), NEG_INF)
        return x, jnp.where(pos_inf, 0.0, x_max), first_max, iota
    x = jnp.where(jnp.isnan(x), NEG_INF, x)
    x_max = reductions.max(x)
    pos_inf = x_max == jnp.inf
    x = jnp.where(pos_inf, jnp.where(x == jnp.inf, 0.0, NEG_INF), x)
    x_max = jnp.where(pos_inf, 0.0, x_max)
    first_max = reductions.min(jnp.where(x == x_max, iota, vocab))
    first_max = jnp.where(first_max == vocab, 0, first_max)
    return x, x_max, first_max, iota


# top-p's plain passes before its snapping ones (`numerics.snapping_search`), by the logits' dtype: a
# bfloat16 row holds few distinct values, so a wider bracket leaves few snapping passes (deviceless v5e
# estimate, B=64, V=128256, the workload's rows, bfloat16: 4 plain passes 213,662 cycles, 5: 191,808,
# 6: 178,527, 8: 190,735, 12: 220,339; float32: 8: 259,376, 10: 241,461, 12: 230,371). The search is
# exact with any count: only its cost moves.
TOP_P_PLAIN_PASSES = {jnp.dtype(jnp.bfloat16): 6}


def row_column(rows: jax.Array, column: int) -> jax.Array:
    """Column `column` of the rows' parameters (R, ROW_COLUMNS) as (R, 1), taken by a lane maximum (the
    other lanes -inf: exactly the value, -0.0 included) rather than sliced: Mosaic lays a slice out at its
    lane offset and then moves it with lane rotations and permutes wherever it meets a reduction's
    result, which the searches' passes did on every pass (bundle dump: 48 lane rotations and 32
    permutes a pass). Static estimate, the sampling stage alone on 64 rows (v5e): top_k 16,097 ->
    13,130 cycles, full 18,180 -> 14,505, top-p alone 34,662 -> 32,624."""
    lane = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    return jnp.max(jnp.where(lane == column, rows, NEG_INF), axis=1, keepdims=True)


def _whole_row_sample(
    x, x_max, first_max, iota, rows, *, vocab, top_k, top_p, min_p, trips, reductions, top_p_plain_passes, rolled
):
    """Stages 6-10 on the whole resident block (`random` rows): (token, threshold, s_max, kept_mass,
    the trips of the loops by site)."""
    temperature = row_column(rows, T)
    site_trips = {}
    row_reductions = {"column_min": reductions.min, "column_max": reductions.max}
    threshold = jnp.full_like(x_max, NEG_INF)
    greedy = temperature == 0.0
    inverse_t = inverse_temperature(temperature, x_max)
    s = x * inverse_t
    s_max = x_max * inverse_t
    e = weight(s, s_max)
    has_values = s_max > NEG_INF

    if top_k:  # stage 7
        k = row_column(rows, TOP_K)

        def count_ge(t: jax.Array) -> jax.Array:
            return reductions.sum(jnp.where(s >= t, jnp.float32(1), jnp.float32(0)))

        lowest = reductions.min(jnp.where(s > NEG_INF, s, jnp.inf))
        on = (k > 0) & has_values & (count_ge(lowest) > k)
        kth, site_trips["top_k"] = largest_value_with_trips(
            count_ge, k, s, jnp.where(on, lowest, s_max), s_max, on, site="top_k", fixed=trips, **row_reductions
        )
        threshold = jnp.where(on, kth, threshold)

    if top_p:  # stage 8
        p = row_column(rows, TOP_P)
        kept_e = jnp.where(s >= threshold, e, 0.0) if top_k else e  # e is 0 where s is -inf
        total = reductions.sum(kept_e)
        target = p * total

        def mass_ge(t: jax.Array) -> jax.Array:
            return reductions.sum(jnp.where(s >= t, kept_e, 0.0))

        on = (p < 1.0) & has_values
        bound = s_max + jnp.log(jnp.maximum(1.0 - p, 0.0) / (2.0 * vocab))
        lo = jnp.where(on, jnp.maximum(threshold, bound), s_max)
        v_star, site_trips["top_p"] = largest_value_with_trips(
            mass_ge,
            target,
            s,
            lo,
            s_max,
            on,
            site="top_p",
            fixed=trips,
            interpolate=total,
            plain_passes=top_p_plain_passes,
            **row_reductions,
        )
        threshold = jnp.where(on, jnp.maximum(threshold, v_star), threshold)

    # the kept tokens: finite ones at or above the threshold (one compare: -inf is below the least float)
    least_kept = jnp.maximum(threshold, -jnp.finfo(jnp.float32).max)

    kept = s >= least_kept
    if min_p:  # stage 9
        kept &= e >= row_column(rows, MIN_P)

    # stage 10: smallest index whose prefix of kept mass exceeds u * total
    sampled, kept_mass, site_trips["draw"] = _draw(
        jnp.where(kept, e, 0.0), kept, row_column(rows, U), reductions=reductions, trips=trips, rolled=rolled
    )
    token = jnp.where(greedy, first_max, sampled)
    return token, threshold, s_max, kept_mass, site_trips


# the draw's chunks: DRAW_LANES lanes (a whole number of vregs) of the resident block each
DRAW_LANES = 4096


def _draw(
    kept_e: jax.Array,
    kept: jax.Array,
    u: jax.Array,
    *,
    reductions: BlockReductions,
    trips: loop_trips.FixedTrips | None,
    rolled: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stage 10 on the resident block, kept mass `kept_e` (R, V): (token (R, 1), kept mass (R, 1), the
    bisection's trips). The row's DRAW_LANES-lane chunks are summed (one pass) and their sums added up in
    vocabulary order, which is the kept mass; the first chunk whose prefix exceeds `u * mass` is copied
    out (one select pass); a bisection on the index inside that chunk alone (about log2 DRAW_LANES trips
    over DRAW_LANES lanes) finds where the prefix crosses. A row whose total rounding leaves at or below
    `u * mass` takes its last kept token; a row with nothing kept, 0.

    The full-width chunks are visited by `_over_chunks`: written out one by one (Mosaic, static lane
    slices), or `rolled` into a loop over the chunk index (interpret mode, whose XLA compile otherwise
    grows with V / DRAW_LANES); the same operations on the same values in the same order either way."""
    vocab = kept_e.shape[1]
    width = min(DRAW_LANES, vocab)
    n_full, tail = divmod(vocab, width)
    lane = lax.broadcasted_iota(jnp.int32, (kept_e.shape[0], width), 1)  # a chunk's lane indices
    lane_f = lane.astype(jnp.float32)
    column = jnp.zeros_like(u)  # an (R, 1) float32 column

    def chunk(a: jax.Array, c: int | jax.Array) -> jax.Array:  # full-width chunk c of an (R, V) array
        if isinstance(c, int):
            return a[:, c * width : (c + 1) * width]
        return lax.dynamic_slice_in_dim(a, c * width, width, 1)

    # one pass: each chunk's sum (kept in an (R, n_full) array) and their sum in vocabulary order, and the
    # lane-wise latest kept index (exact in float32: V < 2**24) over the full-width chunks
    def sum_and_latest(c, acc):
        mass, sums, latest = acc
        chunk_sum = reductions.sum(chunk(kept_e, c))
        start = float(c * width) if isinstance(c, int) else (c * width).astype(jnp.float32)
        ids = jnp.where(chunk(kept, c), lane_f + start, -1.0)
        return mass + chunk_sum, _with_column(sums, c, chunk_sum), jnp.maximum(latest, ids)

    sums = jnp.zeros((kept_e.shape[0], n_full), jnp.float32) if rolled else ()
    init = (column, sums, jnp.full(lane.shape, -1.0))
    kept_mass, sums, latest = _over_chunks(n_full, sum_and_latest, init, rolled)
    tail_sum = reductions.sum(kept_e[:, n_full * width :]) if tail else None
    if tail:
        kept_mass = kept_mass + tail_sum
    target = u * kept_mass

    # the first chunk whose prefix passes the target, the prefix before it, and that chunk's values (a
    # full-width chunk; chunk 0 where none does); `none` (the chunk count): no chunk does
    none = n_full + (tail > 0)

    def cross(c, acc):
        crossing, before, prefix, held = acc
        chunk_sum = _column(sums, c)
        crosses = (crossing == none) & (prefix + chunk_sum > target)
        held = jnp.where(crosses, chunk(kept_e, c), held)
        return jnp.where(crosses, c, crossing), jnp.where(crosses, prefix, before), prefix + chunk_sum, held

    init = (jnp.full(target.shape, none, jnp.int32), column, column, chunk(kept_e, 0))
    crossing, before, prefix, held = _over_chunks(n_full, cross, init, rolled)
    # a narrower last chunk: searched beside the full-width one
    in_tail = jnp.zeros(crossing.shape, bool)
    tail_chunk = None
    if tail:
        in_tail = (crossing == none) & (prefix + tail_sum > target)
        crossing = jnp.where(in_tail, n_full, crossing)
        before = jnp.where(in_tail, prefix, before)
        tail_chunk = kept_e[:, n_full * width :]

    def prefix_through(offset: jax.Array) -> jax.Array:  # prefix through `offset` inside the chunk
        inside = reductions.sum(jnp.where(lane <= offset, held, 0.0))
        if tail_chunk is not None:
            in_last = reductions.sum(jnp.where(lane[:, :tail] <= offset, tail_chunk, 0.0))
            inside = jnp.where(in_tail, in_last, inside)
        return before + inside

    def narrow(state: tuple) -> tuple:
        lo_, hi_ = state  # prefix through lo <= target < prefix through hi
        mid = (lo_ + hi_) // 2
        over = prefix_through(mid) > target
        narrowing = hi_ - lo_ > 1
        return jnp.where(narrowing & ~over, mid, lo_), jnp.where(narrowing & over, mid, hi_)

    last = jnp.where(in_tail, tail - 1, width - 1)
    (_, offset), draw_trips = loop_trips.while_loop(
        "draw", trips, lambda st: jnp.any(st[1] - st[0] > 1), narrow, (jnp.full_like(crossing, -1), last)
    )
    # the last kept index: the full-width chunks' lane-wise latest, then the narrower last chunk's
    last_kept = reductions.max(latest)
    if tail:
        tail_ids = jnp.where(kept[:, n_full * width :], lane_f[:, :tail] + float(n_full * width), -1.0)
        last_kept = jnp.maximum(last_kept, reductions.max(tail_ids))
    last_kept = last_kept.astype(jnp.int32)
    # the crossing index holds mass (the prefix grows there), so it is kept
    token = jnp.where(crossing < none, crossing * width + offset, last_kept)
    return jnp.where(kept_mass > 0, token, 0), kept_mass, draw_trips


def _over_chunks(n: int, step: Callable[[Any, Any], Any], init: Any, rolled: bool) -> Any:
    """`acc = step(c, acc)` for c in 0..n-1: a loop over a traced chunk index when `rolled`, else written
    out with static indices."""
    if rolled:
        return lax.fori_loop(0, n, step, init)
    for c in range(n):
        init = step(c, init)
    return init


def _column(sums: jax.Array | tuple, c: int | jax.Array) -> jax.Array:
    """Chunk c's sum, (R, 1): from the (R, n) array of a rolled loop, or the tuple of (R, 1) columns of a
    written-out one."""
    return sums[c] if isinstance(c, int) else lax.dynamic_slice_in_dim(sums, c, 1, 1)


def _with_column(sums: jax.Array | tuple, c: int | jax.Array, value: jax.Array) -> jax.Array | tuple:
    """`sums` with chunk c's sum: written into the (R, n) array, or appended to the tuple (c == len)."""
    return (*sums, value) if isinstance(c, int) else lax.dynamic_update_slice_in_dim(sums, value, c, 1)


def uses_candidates(vocab: int, *, top_k: bool, top_p: bool, min_p: bool, random: bool, allowed: bool) -> bool:
    """Whether the kernel takes the candidate fast path (`candidates.py`) for these stage flags: sampling
    with top-k, top-p or min-p, which bound the kept set, no allowed-token mask (it stays the whole-row
    path), and at least one vreg of vocabulary. (Rows with none of them on, temperature alone, fall back.)"""
    return random and (top_k or top_p or min_p) and not allowed and candidates.ColumnLayout.of(vocab) is not None


def candidate_depth(*, top_k: bool, min_p: bool, **_: bool) -> int:
    """Candidates a column lane keeps: two where top-k or min-p bounds the kept set (then folded), more
    for top-p alone (`candidates.TOP_P_DEPTH`), whose kept sets are larger."""
    return 2 if top_k or min_p else candidates.TOP_P_DEPTH


def scratch_shapes(block_rows: int, vocab: int, dtype, **stages: bool) -> list:
    """The VMEM scratch the kernel needs for these stage flags and logits dtype: the candidates' arrays
    (bfloat16 logits: their keys, `candidates.key_pass`), or nothing."""
    if not uses_candidates(vocab, **stages):
        return []
    from jax.experimental.pallas import tpu as pltpu

    layout = candidates.ColumnLayout.of(vocab, candidate_depth(**stages))
    if candidates.keyed(dtype):
        return [pltpu.VMEM((block_rows, (layout.depth + 1) * layout.width), jnp.float32)]
    return [
        pltpu.VMEM((block_rows, layout.depth * layout.width), jnp.float32),
        pltpu.VMEM((block_rows, layout.depth * layout.width), jnp.int32),
        pltpu.VMEM((block_rows, layout.width), jnp.float32),
    ]


def eos_masks(rows: jax.Array, eos: jax.Array, min_tokens: bool) -> tuple[jax.Array, Callable, Callable | None]:
    """Stage 4 for a block's rows: (too_early (R, 1), `is_eos_id(idx)`, `eos_masked(x, idx)` or None when
    min_tokens is off). `eos` (1, E), -1 = none."""
    too_early = row_column(rows, EOS_TOO_EARLY) > 0

    def is_eos_id(idx: jax.Array) -> jax.Array:
        return functools.reduce(jnp.logical_or, [idx == eos[:, e : e + 1] for e in range(eos.shape[1])])

    def eos_masked(x: jax.Array, idx: jax.Array) -> jax.Array:  # stage 4 on loaded values
        return jnp.where(too_early & is_eos_id(idx), NEG_INF, x)

    return too_early, is_eos_id, eos_masked if min_tokens else None


def whole_row_block(
    x_ref, allowed_ref, rows: jax.Array, eos: jax.Array, *, vocab: int, config: KernelConfig, interpret: bool
) -> tuple:
    """Stages 0 and 4-10 on one resident block by whole-row passes (greedy rows without a mask: one walk
    for the first maximum): (token, threshold, s_max, kept_mass, x_max, the trips of `top_k`, `top_p`
    and `draw`)."""
    reductions = BlockReductions.for_mode(interpret)
    _, _, eos_mask = eos_masks(rows, eos, config.min_tokens)
    none = (jnp.int32(0),) * 3
    if not config.random and allowed_ref is None:
        # stage 5 (NaN left out, a +inf row's first +inf) and the first index of the maximum: one pass
        x_max, first_max = row_passes.max_and_first_index(x_ref, vocab, prepare=eos_mask, unrolled=not interpret)
        x_max = jnp.where(x_max == jnp.inf, 0.0, x_max)
        return first_max, jnp.full_like(x_max, NEG_INF), x_max, jnp.zeros_like(x_max), x_max, none
    x, x_max, first_max, iota = _sanitized_block(
        x_ref, allowed_ref, vocab=vocab, eos_mask=eos_mask, reductions=reductions, interpret=interpret
    )
    if not config.random:
        return first_max, jnp.full_like(x_max, NEG_INF), x_max, jnp.zeros_like(x_max), x_max, none
    token, threshold, s_max, kept_mass, site_trips = _whole_row_sample(
        x,
        x_max,
        first_max,
        iota,
        rows,
        vocab=vocab,
        trips=config.trips,
        reductions=reductions,
        top_p_plain_passes=TOP_P_PLAIN_PASSES.get(jnp.dtype(x_ref.dtype), PLAIN_PASSES),
        rolled=interpret,
        **config.filters,
    )
    return token, threshold, s_max, kept_mass, x_max, tuple(site_trips.get(n, jnp.int32(0)) for n in WHOLE_ROW_LOOPS)


# the whole-row path's data-dependent loops, in the order `whole_row_block` gives their trips
WHOLE_ROW_LOOPS = ("top_k", "top_p", "draw")


def candidate_layout(vocab: int, config: KernelConfig) -> candidates.ColumnLayout:
    """The column layout of the candidates for this configuration's filters (`candidate_depth`)."""
    return candidates.ColumnLayout.of(vocab, candidate_depth(**config.filters))


def block_candidates(
    x_ref,
    scratch: Sequence[Any],
    rows: jax.Array,
    eos: jax.Array,
    *,
    vocab: int,
    config: KernelConfig,
    interpret: bool,
    parts: int = 1,
    wait: Callable[[int], None] | None = None,
    lone_block: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, candidates.FusedMass | None]:
    """The candidates of one resident block (`candidates.py`): the column pass into `scratch`
    (`scratch_shapes`' arrays), stage 4 on the candidates, the fold: (values, ids, bound, the rows'
    whole mass from the column pass where `fuses_row_mass`, else None). `parts`, `wait`: the column
    pass's (a block whose copy arrives in parts). `lone_block`: the grid step's only block
    (`fuses_row_mass`)."""
    layout = candidate_layout(vocab, config)
    too_early, is_eos_id, _ = eos_masks(rows, eos, config.min_tokens)
    mass_scale = None  # the uncapped 1 / T the column pass scales the rows' mass by, where it takes it
    if fuses_row_mass(layout, config, x_ref.dtype, lone_block):
        temperature = row_column(rows, T)
        mass_scale = inverse_temperature(temperature, jnp.zeros_like(temperature))
    # stage 5's NaN needs nothing in these passes (they only compare; the keys leave a NaN out or let it
    # force a fallback); stage 4 is applied to the candidates afterwards (a few vregs), not to every vreg
    # of the block. Interpret mode: one column group at a time, unrolled once (its XLA compile grows with
    # both; `test_candidates` checks the column pass's interleaved form against numpy)
    unroll, together = (1, 1) if interpret else (candidates.UNROLL, candidates.COLUMNS_TOGETHER)
    if candidates.keyed(x_ref.dtype):  # value and index as one key (`candidates.key_pass`)
        (keys_ref,) = scratch
        mass = candidates.key_pass(x_ref, keys_ref, layout, unroll, together, parts, wait, mass_scale)
        held = layout.depth * layout.width
        keys = keys_ref[:, :held]
        if config.min_tokens:
            keys = jnp.where(too_early & is_eos_id(candidates.key_ids(keys, layout)), candidates.EMPTY_KEY, keys)
        folded = candidates.fold_keys(keys, keys_ref[:, held:], layout, sorted_levels=not config.min_tokens)
        return *folded, None if mass is None else candidates.FusedMass(mass, mass_scale)
    values_ref, ids_ref, third_ref = scratch
    mass = candidates.column_pass(
        x_ref, values_ref, ids_ref, third_ref, layout, lambda x, idx: x, unroll, together, parts, wait, mass_scale
    )
    values, ids = values_ref[...], ids_ref[...]
    if config.min_tokens:
        values, ids = candidates.drop_candidates(values, ids, too_early & is_eos_id(ids))
    folded = candidates.fold(values, ids, third_ref[...], layout, sorted_levels=not config.min_tokens)
    return *folded, None if mass is None else candidates.FusedMass(mass, mass_scale)


def fuses_row_mass(layout: candidates.ColumnLayout, config: KernelConfig, dtype, lone_block: bool) -> bool:
    """Whether the column pass also sums the rows' whole mass (`candidates.FusedMass`), which spares the
    `row_mass` pass: top-p alone (its deep layout; every row with p < 1 needs that mass), without
    min_tokens (whose EOS mask the column pass does not apply), on bfloat16 logits (their key pass), or
    float32 where the block is its grid step's only one. Static estimate, V=128256, the workload's trips,
    top-p alone, the pass -> the column pass's sums: v5e B=64 bfloat16 78,537 -> 75,196 cycles, B=8
    bfloat16 18,326 -> 17,374, B=8 float32 (one block a step, nothing to hide the pass behind) 23,222 ->
    22,220; v6e B=64 bfloat16 73,293 -> 70,370; but v5e B=64 float32 111,399 -> 116,560 (four blocks a
    step: each block's pass ran within the next block's copy), so multi-block float32 keeps the pass (v6e
    B=64 float32 gained, 102,149 -> 100,173; left with v5e). Elsewhere the few rows that need it (top-k
    off in a top-k batch) take the pass, and the column pass stays as lean as it is."""
    fits = candidates.keyed(dtype) or lone_block
    return config.top_p and layout.depth > 2 and not config.min_tokens and fits


def block_row_mass(x_ref, rows: jax.Array, eos: jax.Array, *, vocab: int, config: KernelConfig, interpret: bool):
    """`candidates.row_mass` for one resident block: `row_mass(inverse_t, s_max)`, the whole rows' mass."""
    layout = candidate_layout(vocab, config)
    _, _, eos_mask = eos_masks(rows, eos, config.min_tokens)
    unroll, together = (1, 1) if interpret else (candidates.MASS_UNROLL, candidates.MASS_COLUMNS_TOGETHER)
    prepare = eos_mask or (lambda x, idx: x)
    return lambda inverse_t, s_max: candidates.row_mass(x_ref, layout, prepare, inverse_t, s_max, unroll, together)


def sample_candidates(
    values: jax.Array,
    ids: jax.Array,
    bound: jax.Array,
    rows: jax.Array,
    row_mass: Callable | jax.Array,
    *,
    vocab: int,
    config: KernelConfig,
    dtype: Any,
    interpret: bool,
    fused_mass: candidates.FusedMass | None = None,
) -> candidates.CandidateResult:
    """Stages 6-10 on candidates (`candidates.sample`) for `rows`' parameters (one block's or a group's);
    `fused_mass`: `block_candidates`' whole-row sums."""
    top_k, top_p, min_p = config.top_k, config.top_p, config.min_p
    return candidates.sample(
        values,
        ids,
        bound,
        temperature=row_column(rows, T),
        k=row_column(rows, TOP_K) if top_k else None,
        p=row_column(rows, TOP_P) if top_p else None,
        min_p=row_column(rows, MIN_P) if min_p else None,
        u=row_column(rows, U),
        vocab=vocab,
        row_mass=row_mass,
        search=largest_value_with_trips,
        weight=weight,
        inverse_temperature=inverse_temperature,
        reductions=candidates.RowReductions(tree=not interpret),
        fixed=config.trips,
        dtype=dtype,
        keys=candidates.keyed(dtype),
        fused_mass=fused_mass,
    )


def finished_rows(
    token: jax.Array, x_max: jax.Array, rows: jax.Array, eos: jax.Array, *, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """The empty-row token and EOS for a block's rows: (token out (R, 1) int32, finished out (R, 1) int32).
    A row with no finite value left takes its empty-row token; finished rows emit the pad id; sampling
    an EOS id finishes a row."""
    token = jnp.where(x_max > NEG_INF, token, row_column(rows, EMPTY_TOKEN).astype(jnp.int32))
    finished = row_column(rows, FINISHED) > 0
    is_eos = jnp.max(jnp.where(token == eos, 1, 0), axis=1, keepdims=True) > 0
    return jnp.where(finished, pad_id, token).astype(jnp.int32), (finished | is_eos).astype(jnp.int32)


def fused_sampler_kernel(
    *refs: jax.Array,
    vocab: int,
    config: KernelConfig,
    allowed: bool = False,
    interpret: bool = False,
) -> None:
    """One block of rows: x (R, V), rows (R, 8) packed parameters, eos (1, E)[, allowed (R, ceil(V/32))]
    -> token (R, 1), finished (R, 1), stats (R, STAT_COLUMNS)[, top_x (R, n), top_ids (R, n)], then the
    candidates' scratch (`scratch_shapes`). `config.trips`: fixed trip counts for the data-dependent
    loops (`SITES`), for the static estimate's compiles only. `interpret`: the candidates' reductions and
    loops in the form interpret mode compiles quickly (`candidates.RowReductions`)."""
    top_n, trips = config.top_n, config.trips
    x_ref, rows_ref, eos_ref, *refs = refs
    allowed_ref = refs.pop(0) if allowed else None
    token_ref, finished_ref, stats_ref, *refs = refs
    top_refs, scratch = (refs[:2], refs[2:]) if top_n else ([], refs)
    rows = rows_ref[...]
    eos = eos_ref[...]  # (1, E), -1 = none
    reductions = BlockReductions.for_mode(interpret)
    block = {"vocab": vocab, "config": config, "interpret": interpret}

    def whole_row() -> tuple:
        return whole_row_block(x_ref, allowed_ref, rows, eos, **block)

    fast_trips = {}
    if uses_candidates(vocab, random=config.random, allowed=allowed, **config.filters):
        values, ids, bound, fused = block_candidates(x_ref, scratch, rows, eos, **block)
        row_mass = block_row_mass(x_ref, rows, eos, **block)
        fast = sample_candidates(values, ids, bound, rows, row_mass, dtype=x_ref.dtype, fused_mass=fused, **block)
        fast_trips = fast.trips
        quick = (fast.token, fast.threshold, fast.s_max, fast.kept_mass, fast.x_max, (jnp.int32(0),) * 3)
        result, taken = loop_trips.cond("fallback", trips, fast.fallback, whole_row, lambda: quick)
    else:
        result, taken = whole_row(), jnp.int32(1)
    token, threshold, s_max, kept_mass, x_max, whole_trips = result

    # log-probs: the raw log-normaliser, the token's logit and rank, the top-n entries
    log_z_raw = token_x = rank = jnp.zeros_like(x_max)
    if top_n is not None:
        _, _, eos_mask = eos_masks(rows, eos, config.min_tokens)
        x, x_max, _, iota = _sanitized_block(
            x_ref, allowed_ref, vocab=vocab, eos_mask=eos_mask, reductions=reductions, interpret=interpret
        )
        finite = x_max > NEG_INF
        shift = jnp.where(finite, x_max, 0.0)
        log_z_raw = jnp.where(finite, shift + jnp.log(reductions.sum(jnp.exp(x - shift))), NEG_INF)
        token_x = reductions.max(jnp.where(iota == token, x, NEG_INF))
        temperature, mode = row_column(rows, T), config.logprobs_mode
        at_least = lp.at_least_as_likely(x, token_x, lp.rank_inverse_t(temperature), mode)
        count = reductions.sum(jnp.where(at_least, jnp.float32(1), jnp.float32(0)))  # exact: V < 2**24
        rank = lp.finish_rank(count, token_x, temperature, vocab, mode).astype(jnp.float32)
        if top_n:
            values, ids = top_entry_columns(x, iota, top_n, reductions)
            top_x_ref, top_ids_ref = top_refs
            top_x_ref[...] = jnp.concatenate(values, axis=1)
            top_ids_ref[...] = jnp.concatenate(ids, axis=1)

    token_ref[...], finished_ref[...] = finished_rows(token, x_max, rows, eos, pad_id=config.pad_id)
    values = {THRESHOLD: threshold, S_MAX: s_max, KEPT_MASS: kept_mass, LOG_Z_RAW: log_z_raw, TOKEN_X: token_x}
    values[X_MAX], values[RANK] = x_max, rank
    site_trips = {**fast_trips, **{n: taken * (1 + t) for n, t in zip(WHOLE_ROW_LOOPS, whole_trips, strict=True)}}
    stats_ref[...] = stats_block(values, {site.column: site_trips.get(site.loop, jnp.int32(0)) for site in SITES})


@functools.partial(jax.jit, static_argnames=("config", "plan", "interpret"))
def fused_sample(
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None = None,
    *,
    config: KernelConfig,
    plan: block_sizes.BlockPlan,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """Launches the kernel over row blocks: logits (B, V) with B a multiple of `plan.block_rows` (or
    equal to it), rows (B, ROW_COLUMNS) float32 packed parameters (`config.ROW_FIELDS`), eos (1, E)
    int32, allowed (B, ceil(V / 32)) int32 packed mask words or None. `config`: the stages compiled in,
    the log-prob entries (`top_n`) and, for the static estimate only, fixed loop trips.
    Returns tokens (B, 1) int32, finished (B, 1) int32, stats (B, STAT_COLUMNS) float32[, top_x (B, n)
    float32, top_ids (B, n) int32]."""
    filters = {**config.filters, "random": config.random, "allowed": allowed is not None}
    kernel = functools.partial(fused_sampler_kernel, vocab=logits.shape[1], config=config, interpret=interpret)
    return row_block_call(
        kernel,
        logits,
        rows,
        eos,
        allowed,
        block_rows=plan.block_rows,
        lanes=logits.shape[1],
        top_n=config.top_n,
        vmem_limit_bytes=None if interpret else plan.vmem_limit_bytes,
        interpret=interpret,
        scratch_shapes=scratch_shapes(plan.block_rows, logits.shape[1], logits.dtype, **filters),
    )


def row_block_call(
    kernel: Callable[..., None],
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None,
    *,
    block_rows: int,
    lanes: int,
    top_n: int | None,
    vmem_limit_bytes: int | None,
    interpret: bool,
    buffers: int = 2,
    scratch_shapes: Sequence[Any] = (),
) -> tuple[jax.Array, ...]:
    """The launch both TPU variants share: a grid over blocks of `block_rows` rows, the logits block
    `lanes` wide (V, or V rounded up to the chunked variant's CHUNK) held in `buffers` VMEM copies, the
    mask words block `lanes / 32` wide (all of them when `lanes` is V). `kernel` takes the refs, with
    `allowed` still to bind."""
    batch = logits.shape[0]
    kernel = functools.partial(kernel, allowed=allowed is not None)
    row_block = lambda i: (i, 0)  # noqa: E731
    pipeline = {} if interpret or buffers == 2 else {"pipeline_mode": pl.Buffered(buffers)}
    in_specs = [
        pl.BlockSpec((block_rows, lanes), row_block, **pipeline),
        pl.BlockSpec((block_rows, ROW_COLUMNS), row_block),
        pl.BlockSpec(eos.shape, lambda i: (0, 0)),
    ]
    inputs = [logits, rows, eos]
    if allowed is not None:
        words = allowed.shape[1] if lanes == logits.shape[1] else lanes // 32
        in_specs.append(pl.BlockSpec((block_rows, words), row_block, **pipeline))
        inputs.append(allowed)
    out_specs = [
        pl.BlockSpec((block_rows, 1), row_block),
        pl.BlockSpec((block_rows, 1), row_block),
        pl.BlockSpec((block_rows, STAT_COLUMNS), row_block),
    ]
    if top_n:
        out_specs += [pl.BlockSpec((block_rows, top_n), row_block)] * 2
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import tpu as pltpu

        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit_bytes)
    return pl.pallas_call(
        kernel,
        grid=(batch // block_rows,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=output_shapes(batch, top_n),
        compiler_params=compiler_params,
        interpret=interpret,
        scratch_shapes=tuple(scratch_shapes),
    )(*inputs)
