"""The numeric helpers every implementation shares, one copy each: the relative weight `exp(s - max)`,
the value-snapping threshold search, the bracket cut of a multi-point pass, and the prefix crossing of
the two-level draw.

They are plain jnp on arrays, so the same code runs in the XLA path, inside the Pallas kernels (Mosaic,
Triton, interpret mode) and per shard in the vocabulary-parallel sampler. The search's data-dependent
loop goes through `vsampler.core.trips`, which lets the static TPU estimate fix its trips.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from vsampler.core import trips as loop_trips

NEG_INF = float("-inf")
PLAIN_PASSES = 12  # plain bisection passes before the snapping ones
MAX_PASSES = 64  # a bound on the snapping passes (the ends meet long before on real data)
INTERPOLATION_MARGIN = 1.0 / 16  # an interpolated probe's least distance from the bracket's ends, as a share
DRAW_CHUNK = 128  # vocabulary chunk of the two-level draw
DRAW_GROUP = 32  # chunks per group in the draw's prefix search


def weight(s: jax.Array, s_max: jax.Array) -> jax.Array:
    """`exp(s - s_max)`, a token's probability relative to the row's largest, pinned to exactly 1 at the
    maximum: compilers may fuse `x * (1 / T) - s_max` into one multiply-add whose result at the maximum is
    the product's rounding error, not 0, and `min_p = 1` must keep the maximum."""
    return jnp.where(s >= s_max, 1.0, jnp.exp(s - s_max))


# 1/T's cap: half the float32 maximum, so that x_max * (1/T) stays finite with room to spare
SCALE_CAP = float(jnp.finfo(jnp.float32).max) / 2


def inverse_temperature(temperature: jax.Array, x_max: jax.Array) -> jax.Array:
    """Stage 6's factor, `1 / T` (1 for a greedy row), the same arithmetic on every implementation.

    For a sampled row it is capped at `SCALE_CAP / max(|x_max|, 1)` (`x_max`: the row's largest penalised
    logit), so that `x * (1 / T)` never overflows: without the cap, tokens whose `x / T` passed the float32
    range became +inf and shared the mass equally (a row [2.5e38, 2e38, 0] at T = 0.5 alternated between
    tokens 0 and 1), and processed log-probs were NaN. The cap changes no token anywhere it acts: it acts
    only where `|x_max| / T > SCALE_CAP`, and there every token below the maximum has weight
    `exp((x - x_max) / T)` and `exp((x - x_max) * cap)` both exactly 0 in float32 (the gap to the maximum
    is at least one float32 step, `|x_max| * 2**-24`, and the capped factor makes it >= 1e31). So such a
    row samples among its maxima, uniformly over ties: the argmax-like limit of the exact distribution.
    It also keeps `1 / T` finite for a subnormal T (where the reciprocal overflows)."""
    greedy = temperature == 0.0
    inverse_t = 1.0 / jnp.where(greedy, 1.0, temperature)
    cap = jnp.float32(SCALE_CAP) / jnp.maximum(jnp.where(x_max > NEG_INF, jnp.abs(x_max), 1.0), 1.0)
    return jnp.where(greedy, inverse_t, jnp.minimum(inverse_t, cap))


def any_set(flags: jax.Array) -> jax.Array:
    """Whether any of `flags` is set; a scalar flag is itself (Triton lowers no `reduce_or`)."""
    return flags if flags.ndim == 0 else jnp.any(flags)


def narrow(lo: jax.Array, hi: jax.Array, points: list[jax.Array], below: list[jax.Array]) -> tuple:
    """A bracket (lo, hi) cut at increasing `points` inside it, `below[j]` saying point j keeps the
    bracket's lower-end property (monotone: True up to some point): the last such point, the first
    other one."""
    new_lo, new_hi = lo, hi
    for t, keeps in zip(points, below, strict=True):
        new_lo = jnp.where(keeps, t, new_lo)
    for t, keeps in zip(reversed(points), reversed(below), strict=True):
        new_hi = jnp.where(keeps, new_hi, t)
    return new_lo, new_hi


def _column_min(a: jax.Array) -> jax.Array:
    return jnp.min(a, axis=-1, keepdims=True)


def _column_max(a: jax.Array) -> jax.Array:
    return jnp.max(a, axis=-1, keepdims=True)


# probe(t) -> (statistic(t), the smallest row value >= t, the largest row value < t), per row
Probe = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
# ends(lo, hi_open) -> (the largest row value < hi_open, the smallest row value >= lo), per row
Ends = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def row_probes(
    statistic: Callable[[jax.Array], jax.Array],
    s: jax.Array,
    column_min: Callable[[jax.Array], jax.Array] = _column_min,
    column_max: Callable[[jax.Array], jax.Array] = _column_max,
) -> tuple[Probe, Ends]:
    """`snapping_search`'s probes over a resident row block `s` ((R, V), or one (V,) row), with the row
    reductions `column_min` / `column_max` (default: over the last axis)."""

    def above(t: jax.Array) -> jax.Array:
        return column_min(jnp.where(s >= t, s, jnp.inf))

    def below(t: jax.Array) -> jax.Array:
        return column_max(jnp.where(s < t, s, NEG_INF))

    return (lambda t: (statistic(t), above(t), below(t))), (lambda lo, hi_open: (below(hi_open), above(lo)))


def snapping_search(
    statistic: Callable[[jax.Array], jax.Array],
    target: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    active: jax.Array,
    *,
    probe: Probe,
    ends: Ends,
    site: str = "search",
    fixed: loop_trips.FixedTrips | None = None,
    splits: int = 1,
    plain_passes: int = PLAIN_PASSES,
    interpolate: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per row: the largest row value v with `statistic(v) >= target`. The one threshold search every
    sampler here uses (the XLA path, the kernels, the vocabulary-parallel sampler), written once; the
    row is seen only through `statistic` and the probes, so a kernel that cannot hold the row (the
    chunked variant) fuses each probe into one pass over its chunks.

    `statistic(t)` must be non-increasing in t and change only at the row's values (a count or a mass of
    the values >= t), with `statistic(lo) >= target` on active rows; `hi` is the row maximum. Inactive
    rows return lo. `plain_passes` plain passes narrow the bracket, each evaluating `statistic` at
    `splits` evenly spaced points at once (1: bisection; more cut the bracket by splits + 1 per pass,
    for small rows whose passes are bound by a reduction's latency, not its operations); then each pass
    also snaps both ends to the row's own values (`probe`: the smallest value >= the split, the largest
    below it) in the same fused loop, and the search ends when the ends meet: about log2 of the number
    of distinct values in the bracket passes in all, never 32 regardless of the data. `ends` snaps the
    bracket the plain passes leave.

    When the row is one shard of a row split over devices, the probes and `statistic` must also reduce
    across the shards, so every shard sees the same bracket and runs the same passes.

    `interpolate`: the statistic's total (its value below every row value), for a statistic that is a
    mass of weights `exp(s - s_max)`: the mass below t then falls about exponentially as t falls, and
    the plain passes probe, once both ends of the bracket have been probed (the first passes halve it),
    where the line through the ends in `log(total - statistic)` crosses `log(total - target)`: regula
    falsi with the Illinois rule (an end kept twice in a row has its distance to the root halved, so the
    line does not creep from one side), at least `INTERPOLATION_MARGIN` of the bracket from either end.
    On smooth rows the bracket narrows much faster than by halving; a row it does not fit leaves a
    wider bracket and more snapping passes. Only the probe points move: the result is the same. (With
    `splits` > 1 the passes cut at even points as above.)

    Returns the value and the number of snapping passes (int32), the search's data-dependent loop: the
    `vsampler.core.trips` site `site`, which `fixed` (the static estimate's compiles) can fix.
    """

    if interpolate is not None and splits == 1:
        log_gap = jnp.log(interpolate - target)  # the root of h(t) = log(total - statistic(t)) - log_gap

        def plain_interpolated(_: int, bracket: tuple) -> tuple:
            # g: log(total - statistic) at each end (NaN: not probed yet); streak: how many passes in a
            # row moved the same end (+ lo, - hi)
            lo_, hi_, g_lo, g_hi, streak = bracket
            frac = jnp.clip((log_gap - g_lo) / (g_hi - g_lo), INTERPOLATION_MARGIN, 1.0 - INTERPOLATION_MARGIN)
            mid = lo_ + (hi_ - lo_) * jnp.where(jnp.isnan(frac), 0.5, frac)
            value = statistic(mid)
            reaches = value >= target
            g = jnp.log(interpolate - value)
            streak = jnp.where(reaches, jnp.maximum(streak, 0) + 1, jnp.minimum(streak, 0) - 1)
            # Illinois: an end kept a second time in a row has its h halved, so the next line moves it
            g_lo = jnp.where(streak <= -2, log_gap + (g_lo - log_gap) * 0.5, g_lo)
            g_hi = jnp.where(streak >= 2, log_gap + (g_hi - log_gap) * 0.5, g_hi)
            return (
                jnp.where(reaches, mid, lo_),
                jnp.where(reaches, hi_, mid),
                jnp.where(reaches, g, g_lo),
                jnp.where(reaches, g_hi, g),
                streak,
            )

        unknown = jnp.full_like(lo, jnp.nan)
        start = (lo, hi, unknown, unknown, jnp.zeros(lo.shape, jnp.int32))
        lo, hi_open, _, _, _ = lax.fori_loop(0, plain_passes, plain_interpolated, start)
        return _snap(lo, hi, hi_open, target, active, probe=probe, ends=ends, site=site, fixed=fixed)

    def plain(_: int, bracket: tuple) -> tuple:
        lo_, hi_ = bracket
        if splits == 1:
            mid = lo_ + (hi_ - lo_) * 0.5
            reaches = statistic(mid) >= target
            return jnp.where(reaches, mid, lo_), jnp.where(reaches, hi_, mid)
        points = [lo_ + (hi_ - lo_) * (j / (splits + 1)) for j in range(1, splits + 1)]
        return narrow(lo_, hi_, points, [statistic(t) >= target for t in points])

    lo, hi_open = lax.fori_loop(0, plain_passes, plain, (lo, hi))
    return _snap(lo, hi, hi_open, target, active, probe=probe, ends=ends, site=site, fixed=fixed)


def _snap(
    lo: jax.Array,
    hi: jax.Array,
    hi_open: jax.Array,
    target: jax.Array,
    active: jax.Array,
    *,
    probe: Probe,
    ends: Ends,
    site: str,
    fixed: loop_trips.FixedTrips | None,
) -> tuple[jax.Array, jax.Array]:
    """`snapping_search`'s snapping passes from the bracket [lo, hi_open) the plain passes left (`hi`:
    the row maximum)."""
    below_open, snapped = ends(lo, hi_open)
    hi = jnp.where(hi_open < hi, below_open, hi)
    lo = jnp.where(active, snapped, lo)

    def searching(state: tuple) -> jax.Array:
        lo_, hi_, passes = state
        return any_set(active & (lo_ < hi_)) & (passes < MAX_PASSES)

    def body(state: tuple) -> tuple:
        lo_, hi_, passes = state
        mid = lo_ + (hi_ - lo_) * 0.5
        mid = jnp.where(mid <= lo_, hi_, mid)
        value, above, below = probe(mid)
        reaches = value >= target
        moving = active & (lo_ < hi_)
        return (
            jnp.where(moving & reaches, above, lo_),
            jnp.where(moving & ~reaches, below, hi_),
            passes + 1,
        )

    (lo, _, _), trips = loop_trips.while_loop(site, fixed, searching, body, (lo, hi, jnp.int32(0)))
    return lo, trips


def largest_value_with_trips(
    statistic: Callable[[jax.Array], jax.Array],
    target: jax.Array,
    s: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    active: jax.Array,
    *,
    column_min: Callable[[jax.Array], jax.Array] = _column_min,
    column_max: Callable[[jax.Array], jax.Array] = _column_max,
    **search: object,
) -> tuple[jax.Array, jax.Array]:
    """`snapping_search` on a resident row block `s` ((R, V) with (R, 1) columns, or one (V,) row with
    (1,) values), its probes from `row_probes`; `search`: `snapping_search`'s `site`, `fixed`, `splits`,
    `plain_passes`."""
    probe, ends = row_probes(statistic, s, column_min, column_max)
    return snapping_search(statistic, target, lo, hi, active, probe=probe, ends=ends, **search)


def largest_value_with(*args: jax.Array, **kwargs: object) -> jax.Array:
    """The value of `largest_value_with_trips` (same arguments), without the trip count."""
    return largest_value_with_trips(*args, **kwargs)[0]


def first_crossing(sums: jax.Array, start: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Along the last axis of `sums` (..., N), `start` and `target` broadcasting against (..., 1): the
    first position whose prefix `start + cumsum(sums)` exceeds `target` (clipped to N - 1) and the prefix
    before it, both (..., 1). The draw's step from one level of sums to the next."""
    prefix = start + jnp.cumsum(sums, axis=-1)
    position = jnp.minimum(jnp.sum(prefix <= target, axis=-1, keepdims=True), sums.shape[-1] - 1)
    before = jnp.take_along_axis(prefix, jnp.maximum(position - 1, 0), axis=-1)
    return position, jnp.where(position > 0, before, start)


def _chunks(row: jax.Array) -> jax.Array:
    pad = (-row.shape[0]) % DRAW_CHUNK
    return jnp.pad(row, (0, pad)).reshape(-1, DRAW_CHUNK)


def draw(kept: jax.Array, e: jax.Array, u: jax.Array) -> jax.Array:
    """The spec's draw on one row (V,): the smallest index whose cumulative kept mass `e` exceeds
    `u * total` (rounding short of it: the last kept index; nothing kept: 0). Sums per chunk and per
    group of `DRAW_GROUP` chunks, then the group, the chunk and the index where the prefix crosses (short cumsums
    only: XLA's CPU cumsum is quadratic in its length)."""
    vocab = e.shape[0]
    mass = _chunks(jnp.where(kept, e, 0.0))  # (NC, C)
    chunk_sums = jnp.sum(mass, axis=1)
    n_chunks = chunk_sums.shape[0]
    groups = jnp.pad(chunk_sums, (0, (-n_chunks) % DRAW_GROUP)).reshape(-1, DRAW_GROUP)
    group_sums = jnp.sum(groups, axis=1)
    target = u * jnp.sum(group_sums)
    group, before = (a[0] for a in first_crossing(group_sums, jnp.float32(0.0), target))
    local, before = (a[0] for a in first_crossing(groups[group], before, target))
    chunk = jnp.minimum(group * DRAW_GROUP + local, n_chunks - 1)
    inside = mass[chunk]
    kept_inside = inside > 0
    crossed = (before + jnp.cumsum(inside) > target) & kept_inside
    last_inside = DRAW_CHUNK - 1 - jnp.argmax(kept_inside[::-1])
    token = chunk * DRAW_CHUNK + jnp.where(jnp.any(crossed), jnp.argmax(crossed), last_inside)
    last_kept = vocab - 1 - jnp.argmax(kept[::-1])
    token = jnp.where(jnp.any(kept_inside), token, last_kept)
    return jnp.where(jnp.any(kept), jnp.clip(token, 0, vocab - 1), 0).astype(jnp.int32)
