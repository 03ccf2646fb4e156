"""The sampler's stages as passes over a row in vocabulary chunks: the one body behind the GPU (Triton)
variant (`sampler_triton.py`) and the TPU chunked variant (`sampler_chunked.py`).

A variant describes how it reads its rows with a `RowChunks`: how many chunks, how to load chunk `c`
(token ids and float32 values, -inf past the vocabulary), the per-row reductions over a chunk, and a
`column` shape for per-row values: `()` when a program owns one row (Triton), `(R, 1)` when it owns a
block of R rows (TPU). Every pass is a loop over the chunks that reduces to per-row columns, so the
temporaries are chunk-sized whatever the vocabulary: values such as `s = x * (1 / T)` and
`e = exp(s - max)` are recomputed per chunk rather than stored.

The stages, the searches and the per-row outputs are those of the resident TPU kernel (`sampler.py`):
value bisection whose ends snap to the row's own values, so thresholds are exact token values and the
kept sets equal the reference's (`vsampler.core.reference`). Two things the chunk structure makes cheap:
top-k starts from the k-th largest column maximum (`column_bound`: usually the k-th value itself, so
one count pass settles the row), and the draw finds its chunk in one pass and its index inside that
chunk alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from vsampler.kernels.config import KernelConfig

from vsampler.core import logprobs as lp
from vsampler.core import trips as loop_trips
from vsampler.core.numerics import (
    NEG_INF,
    any_set,
    inverse_temperature,
    largest_value_with_trips,
    snapping_search,
    weight,
)

Reduction = Callable[[jax.Array], jax.Array]
# the data-dependent loops (`vsampler.core.trips`): top-k's search over the column maxima and its search
# over the row, each run only where some row needs it (a cond), and top-p's search; the TPU chunked
# variant writes their trips to these statistics columns
SITES = (
    loop_trips.Site("top_k_bound", 5, guard="top_k_bound_search"),
    loop_trips.Site("top_k", 6, guard="top_k_search"),
    loop_trips.Site("top_p", 7),
)


@dataclasses.dataclass(frozen=True)
class RowChunks:
    """How a kernel variant reads its row(s) of logits.

    load(c) -> (index, values): chunk c's token ids (int32) and raw values as float32 (-inf past the
    vocabulary, the allowed-token mask already applied); both shaped like a chunk.
    row_sum / row_max / row_min: a chunk-shaped array -> a `column`-shaped per-row value.
    """

    vocab: int
    chunk: int
    n_chunks: int
    column: tuple[int, ...]
    load: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    row_sum: Reduction
    row_max: Reduction
    row_min: Reduction
    one_row: bool  # a program owns one row: chunk `c` can be re-read for it alone

    def full(self, value: float | int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.full(self.column, value, dtype)

    def full_chunk(self, value: float) -> jax.Array:
        """A chunk-shaped float32 array per row (a trailing `chunk` axis on `column`)."""
        return jnp.full(jnp.broadcast_shapes(self.column, (1, self.chunk)), value, jnp.float32)

    def reduce(self, step: Callable, init: tuple, load: Callable | None = None) -> tuple:
        """Folds `step(acc, *load(c))` over the chunks."""
        load = load or self.load
        return lax.fori_loop(0, self.n_chunks, lambda c, acc: step(acc, *load(c)), init)


@dataclasses.dataclass(frozen=True)
class RowColumns:
    """The per-row parameters, each `column`-shaped."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    u: jax.Array
    too_early: jax.Array  # the min_tokens EOS mask is on
    empty_token: jax.Array  # the token of a row with no finite value left


@dataclasses.dataclass(frozen=True)
class RowResult:
    """Per-row outputs, `column`-shaped (top entries: n columns each)."""

    token: jax.Array  # before EOS / pad handling
    threshold: jax.Array
    s_max: jax.Array
    kept_mass: jax.Array
    log_z_raw: jax.Array
    token_x: jax.Array
    rank: jax.Array  # with log-probs: the sampled token's rank (`vsampler.core.logprobs.token_rank`), as float32
    top_x: list[jax.Array]
    top_ids: list[jax.Array]
    loop_trips: tuple[jax.Array, ...]  # int32 scalars, one per `SITES` entry (as its column holds them)
    x_max: jax.Array  # the largest penalised logit (stage 6's `numerics.inverse_temperature` reads it)


def _traced_zero(flag: jax.Array) -> jax.Array:
    """An int32 0 computed from a traced value: a cond branch's "no trips" output (Pallas's Triton
    lowering cannot yield a literal constant from a branch)."""
    return flag.astype(jnp.int32) * 0


def column_bound(
    rows: RowChunks,
    col_max: jax.Array,
    k: jax.Array,
    on: jax.Array,
    s_max: jax.Array,
    lowest: jax.Array,
    fixed: loop_trips.FixedTrips | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A lower bound on each row's k-th largest value from its column maxima (chunk-shaped, -inf where a
    column is empty): the k-th largest column maximum M, since k disjoint columns each hold a value
    >= M. M is a row value, and with `chunk` columns of V / chunk values the k largest values rarely
    share a column, so the bound is usually the k-th value itself. Rows with fewer than k finite
    columns (or off) get `lowest`. The search runs on the `chunk`-wide maxima only. Also returns the
    search's trips as its `SITES` column holds them (0: not run; else 1 + its snapping passes)."""
    finite_cols = rows.row_sum(jnp.where(col_max > NEG_INF, jnp.float32(1), jnp.float32(0)))
    use = on & (finite_cols >= k)

    def kth_column_max() -> jax.Array:
        lowest_col = rows.row_min(jnp.where(col_max > NEG_INF, col_max, jnp.inf))
        return largest_value_with_trips(
            lambda t: rows.row_sum(jnp.where(col_max >= t, jnp.float32(1), jnp.float32(0))),
            k,
            col_max,
            jnp.where(use, lowest_col, s_max),
            s_max,
            use,
            column_min=rows.row_min,
            column_max=rows.row_max,
            site="top_k_bound",
            fixed=fixed,
        )

    run = any_set(use)
    idle = _traced_zero(run)
    (bound, snaps), taken = loop_trips.cond("top_k_bound_search", fixed, run, kth_column_max, lambda: (s_max, idle))
    return jnp.where(use, bound, lowest), taken * (1 + snaps)


def sample_rows(rows: RowChunks, params: RowColumns, eos_ids: Sequence[jax.Array], config: KernelConfig) -> RowResult:
    """Stages 4-10 (and the log-prob values when `config.top_n` is not None) over `rows`, chunk by chunk,
    for the stages `config` compiles in. `eos_ids`: the EOS ids, each broadcastable against a chunk (-1:
    none). `config.trips`: fixed trip counts for the data-dependent loops (`SITES`), for the static
    estimate's compiles only."""
    top_k, top_p, min_p, random = config.top_k, config.top_p, config.min_p, config.random
    min_tokens, top_n, logprobs_mode, trips = config.min_tokens, config.top_n, config.logprobs_mode, config.trips
    vocab, chunk = rows.vocab, rows.chunk

    def raw_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        index, v = rows.load(c)
        if min_tokens:  # stage 4: the min_tokens EOS mask
            is_eos_id = functools.reduce(jnp.logical_or, [index == e for e in eos_ids])
            v = jnp.where(params.too_early & is_eos_id, NEG_INF, v)
        return index, jnp.where(jnp.isnan(v), NEG_INF, v)

    # stage 5: sanitising (a row holding +inf keeps its +inf tokens as 0, drops the rest)
    (raw_max,) = rows.reduce(
        lambda acc, i, v: (jnp.maximum(acc[0], rows.row_max(v)),), (rows.full(NEG_INF),), raw_chunk
    )
    pos_inf = raw_max == jnp.inf
    x_max = jnp.where(pos_inf, 0.0, raw_max)

    def clean_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        index, v = raw_chunk(c)
        return index, jnp.where(pos_inf, jnp.where(v == jnp.inf, 0.0, NEG_INF), v)

    # the first index of the maximum; with log-probs, the raw normaliser sum(exp(x - max)) in the same pass
    finite = x_max > NEG_INF
    shift = jnp.where(finite, x_max, 0.0)
    first_max, exp_total = rows.reduce(
        lambda acc, i, v: (
            jnp.minimum(acc[0], rows.row_min(jnp.where(v == x_max, i, vocab))),
            acc[1] + (rows.row_sum(jnp.exp(v - shift)) if top_n is not None else 0.0),
        ),
        (rows.full(vocab, jnp.int32), rows.full(0.0)),
        clean_chunk,
    )
    first_max = jnp.where(first_max == vocab, 0, first_max)
    threshold = rows.full(NEG_INF)
    s_max = x_max
    kept_mass = rows.full(0.0)
    token = first_max
    site_trips = {site.loop: jnp.int32(0) for site in SITES}
    if random:
        greedy = params.temperature == 0.0
        inverse_t = inverse_temperature(params.temperature, x_max)
        s_max = x_max * inverse_t

        def scaled_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            index, v = clean_chunk(c)
            s = v * inverse_t
            return index, s, weight(s, s_max)

        def search(
            statistic: Callable, target: jax.Array, lo: jax.Array, active: jax.Array, site: str
        ) -> tuple[jax.Array, jax.Array]:
            """The largest row value v with statistic(v) >= target, and its snapping passes (the
            data-dependent loop `site`): `vsampler.core.numerics.snapping_search` over the chunks."""

            def total(t: jax.Array) -> jax.Array:
                (acc,) = rows.reduce(
                    lambda a, i, s, e: (a[0] + rows.row_sum(statistic(t, s, e)),), (rows.full(0.0),), scaled_chunk
                )
                return acc

            def ends(lo_: jax.Array, hi_open: jax.Array) -> tuple[jax.Array, jax.Array]:
                return rows.reduce(
                    lambda a, i, s, e: (
                        jnp.maximum(a[0], rows.row_max(jnp.where(s < hi_open, s, NEG_INF))),
                        jnp.minimum(a[1], rows.row_min(jnp.where(s >= lo_, s, jnp.inf))),
                    ),
                    (rows.full(NEG_INF), rows.full(jnp.inf)),
                    scaled_chunk,
                )

            def probe(mid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
                return rows.reduce(
                    lambda a, i, s, e: (
                        a[0] + rows.row_sum(statistic(mid, s, e)),
                        jnp.minimum(a[1], rows.row_min(jnp.where(s >= mid, s, jnp.inf))),
                        jnp.maximum(a[2], rows.row_max(jnp.where(s < mid, s, NEG_INF))),
                    ),
                    (rows.full(0.0), rows.full(jnp.inf), rows.full(NEG_INF)),
                    scaled_chunk,
                )

            # one fused pass over the chunks per probe: the statistic and both snaps together
            return snapping_search(total, target, lo, s_max, active, probe=probe, ends=ends, site=site, fixed=trips)

        has_values = s_max > NEG_INF
        if top_k:  # stage 7: the k-th largest value
            k = params.top_k
            # one pass: the lowest finite value, the finite count, and the column maxima (each lane's
            # maximum over the chunks: `chunk` disjoint columns of the row)
            lowest, n_finite, col_max = rows.reduce(
                lambda a, i, s, e: (
                    jnp.minimum(a[0], rows.row_min(jnp.where(s > NEG_INF, s, jnp.inf))),
                    a[1] + rows.row_sum(jnp.where(s > NEG_INF, jnp.float32(1), jnp.float32(0))),
                    jnp.maximum(a[2], s),
                ),
                (rows.full(jnp.inf), rows.full(0.0), rows.full_chunk(NEG_INF)),
                scaled_chunk,
            )
            on = (k > 0) & has_values & (n_finite > k)
            bound, site_trips["top_k_bound"] = column_bound(rows, col_max, k, on, s_max, lowest, trips)
            lo = jnp.where(on, bound, s_max)
            # the values >= lo number at least k; exactly k (the common case), and lo is the k-th
            count = lambda t, s, e: jnp.where(s >= t, jnp.float32(1), jnp.float32(0))  # noqa: E731
            (at_lo,) = rows.reduce(
                lambda a, i, s, e: (a[0] + rows.row_sum(count(lo, s, e)),), (rows.full(0.0),), scaled_chunk
            )
            searching = on & (at_lo > k)
            run = any_set(searching)
            idle = _traced_zero(run)
            (kth, passes), taken = loop_trips.cond(
                "top_k_search", trips, run, lambda: search(count, k, lo, searching, "top_k"), lambda: (lo, idle)
            )
            site_trips["top_k"] = taken * (1 + passes)
            threshold = jnp.where(on, kth, threshold)

        if top_p:  # stage 8: the largest value whose inclusive kept mass reaches p * total
            p = params.top_p
            kth = threshold
            (kept_total,) = rows.reduce(
                lambda a, i, s, e: (a[0] + rows.row_sum(jnp.where(s >= kth, e, 0.0)),), (rows.full(0.0),), scaled_chunk
            )
            on = (p < 1.0) & has_values
            bound = s_max + jnp.log(jnp.maximum(1.0 - p, 0.0) / (2.0 * vocab))
            lo = jnp.where(on, jnp.maximum(kth, bound), s_max)
            v_star, site_trips["top_p"] = search(
                lambda t, s, e: jnp.where(s >= jnp.maximum(t, kth), e, 0.0), p * kept_total, lo, on, "top_p"
            )
            threshold = jnp.where(on, jnp.maximum(threshold, v_star), threshold)

        floor_p = params.min_p if min_p else 0.0

        def kept_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
            index, s, e = scaled_chunk(c)
            kept = (s > NEG_INF) & (s >= threshold) & (e >= floor_p)
            return index, jnp.where(kept, e, 0.0)

        # stage 10: the chunk where the prefix of kept mass crosses u * total, then the index inside it
        kept_mass, last_kept = rows.reduce(
            lambda a, i, ke: (a[0] + rows.row_sum(ke), jnp.maximum(a[1], rows.row_max(jnp.where(ke > 0, i, -1)))),
            (rows.full(0.0), rows.full(-1, jnp.int32)),
            kept_chunk,
        )
        target = params.u * kept_mass

        def find_chunk(c: jax.Array, acc: tuple) -> tuple:
            prefix, found, where_c, before, *held = acc
            _, ke = kept_chunk(c)
            chunk_sum = rows.row_sum(ke)
            crossing = (found == 0) & (prefix + chunk_sum > target)
            if held:  # rows of a block cross in different chunks: each keeps its crossing chunk's mass
                held = [jnp.where(crossing, ke, held[0])]
            return (
                prefix + chunk_sum,
                jnp.where(crossing, 1, found),  # int32: Mosaic cannot carry a bool vector through a loop
                jnp.where(crossing, c, where_c),
                jnp.where(crossing, prefix, before),
                *held,
            )

        held = [] if rows.one_row else [rows.full_chunk(0.0)]
        init = (rows.full(0.0), rows.full(0, jnp.int32), rows.full(0, jnp.int32), rows.full(0.0), *held)
        _, found, crossing_chunk, before, *held = lax.fori_loop(0, rows.n_chunks, find_chunk, init)
        ke = held[0] if held else kept_chunk(crossing_chunk)[1]
        lane = lax.broadcasted_iota(jnp.int32, ke.shape, ke.ndim - 1)

        def narrow(_: int, bracket: tuple) -> tuple:
            lo_, hi_ = bracket  # prefix through lo <= target < prefix through hi
            mid = (lo_ + hi_) // 2
            over = before + rows.row_sum(jnp.where(lane <= mid, ke, 0.0)) > target
            return jnp.where(over, lo_, mid), jnp.where(over, mid, hi_)

        _, offset = lax.fori_loop(
            0, chunk.bit_length(), narrow, (rows.full(-1, jnp.int32), rows.full(chunk - 1, jnp.int32))
        )
        is_kept = rows.row_sum(jnp.where(lane == offset, ke, 0.0)) > 0
        sampled = jnp.where((found > 0) & is_kept, crossing_chunk * chunk + offset, last_kept)
        sampled = jnp.where(kept_mass > 0, sampled, 0)
        token = jnp.where(greedy, first_max, sampled)

    # a row with no finite value left: its empty-row token
    token = jnp.where(x_max > NEG_INF, token, params.empty_token.astype(jnp.int32))

    log_z_raw = token_x = rank = rows.full(0.0)
    top_x: list[jax.Array] = []
    top_ids: list[jax.Array] = []
    if top_n is not None:  # log-probs: the normaliser from the first pass, the token's logit
        log_z_raw = jnp.where(finite, shift + jnp.log(exp_total), NEG_INF)
        if rows.one_row:  # from its one chunk
            index, v = clean_chunk(jnp.clip(token, 0, vocab - 1) // chunk)
            token_x = rows.row_max(jnp.where(index == token, v, NEG_INF))
        else:  # one pass
            (token_x,) = rows.reduce(
                lambda a, i, v: (jnp.maximum(a[0], rows.row_max(jnp.where(i == token, v, NEG_INF))),),
                (rows.full(NEG_INF),),
                clean_chunk,
            )
        # the token's rank: the values at least as likely, counted in one pass (padding lanes left out)
        inverse_t = lp.rank_inverse_t(params.temperature)
        (count,) = rows.reduce(
            lambda a, i, v: (
                a[0]
                + rows.row_sum(
                    jnp.where((i < vocab) & lp.at_least_as_likely(v, token_x, inverse_t, logprobs_mode), 1.0, 0.0)
                ),
            ),
            (rows.full(0.0),),
            clean_chunk,
        )
        rank = lp.finish_rank(count, token_x, params.temperature, vocab, logprobs_mode).astype(jnp.float32)
        # entry j: the largest value after entry j-1 (ties: lower index first), one pass each
        prev_v, prev_i = rows.full(jnp.inf), rows.full(-1, jnp.int32)
        for _ in range(top_n or 0):

            def best_after(a: tuple, i: jax.Array, v: jax.Array, pv=prev_v, pi=prev_i) -> tuple:
                after = (v < pv) | ((v == pv) & (i > pi))
                m = rows.row_max(jnp.where(after, v, NEG_INF))
                first = rows.row_min(jnp.where(after & (v == m), i, vocab))
                better = m > a[0]
                return jnp.where(better, m, a[0]), jnp.where(better, first, jnp.minimum(a[1], first))

            prev_v, prev_i = rows.reduce(best_after, (rows.full(NEG_INF), rows.full(vocab, jnp.int32)), clean_chunk)
            top_x.append(prev_v)
            top_ids.append(prev_i)

    loops = tuple(site_trips[site.loop] for site in SITES)
    return RowResult(token, threshold, s_max, kept_mass, log_z_raw, token_x, rank, top_x, top_ids, loops, x_max)
