"""The fused sampling kernel, GPU (Triton) variant. Same stages, same searches and the same outputs as the
TPU variant (`sampler.py`), laid out for Triton:

* one program per row (grid = B), the row read through masked loads of power-of-two chunks
  (`CHUNK` values: Triton arrays must have power-of-two shapes and the vocabulary rarely is one);
* every pass is a loop over the chunks that reduces to scalars: the row is re-read from global memory
  (in practice L2) on each pass instead of staying resident, and values such as `s = x * (1 / T)` and
  `e = exp(s - max)` are recomputed per chunk rather than stored;
* the draw finds the chunk where the prefix of kept mass crosses `u * total` (one pass), then the index
  inside that chunk by bisection over masked sums of the one chunk;
* the allowed-token mask is read with each chunk (`CHUNK / 32` words, unpacked in registers);
* log-probs (when asked): the raw log-normaliser inside the first-maximum pass, the token's logit from
  its one chunk, and one pass per top-n entry (n is small; the row is in L2 by then).

Thresholds are exact row values (value bisection that snaps to the row's values), so the kept sets equal
the reference's, as on TPU. Runs in Pallas interpret mode on CPU (verification) and lowers to Triton for
CUDA (`jax.export` checks the lowering without a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from vsampler.kernels.sampler import (
    EMPTY_TOKEN,
    EOS_TOO_EARLY,
    FINISHED,
    KEPT_MASS,
    LOG_Z_RAW,
    MAX_PASSES,
    MIN_P,
    PLAIN_PASSES,
    ROW_COLUMNS,
    S_MAX,
    STAT_COLUMNS,
    THRESHOLD,
    TOKEN_X,
    TOP_K,
    TOP_P,
    T,
    U,
    output_shapes,
    relative_weight,
)

NEG_INF = float("-inf")


def triton_sampler_kernel(
    *refs: jax.Array,
    vocab: int,
    chunk: int,
    pad_id: int,
    top_k: bool,
    top_p: bool,
    min_p: bool,
    random: bool,
    min_tokens: bool,
    allowed: bool = False,
    top_n: int | None = None,
) -> None:
    """One row: x (V,), rows (8,) packed parameters, eos (E,)[, allowed (ceil(V/32),)] -> token (1,),
    finished (1,), stats (8,)[, top_x (n',), top_ids (n',) with n' = n rounded up to a power of two]."""
    x_ref, rows_ref, eos_ref, *refs = refs
    allowed_ref = refs.pop(0) if allowed else None
    token_ref, finished_ref, stats_ref, *top_refs = refs
    n_chunks = pl.cdiv(vocab, chunk)
    lane = jnp.arange(chunk, dtype=jnp.int32)
    eos_ids = [eos_ref[e] for e in range(eos_ref.shape[0])] if min_tokens else []
    too_early = rows_ref[EOS_TOO_EARLY] > 0 if min_tokens else False
    words_per_chunk = chunk // 32
    n_words = pl.cdiv(vocab, 32)

    def allowed_in(c: jax.Array) -> jax.Array:
        """The chunk's allowed flags: its `chunk / 32` mask words, one bit per token."""
        word = c * words_per_chunk + jnp.arange(words_per_chunk, dtype=jnp.int32)
        words = plgpu.load(allowed_ref.at[pl.ds(c * words_per_chunk, words_per_chunk)], mask=word < n_words, other=0)
        bit = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32)[None, :], (words_per_chunk, 32))
        bits = lax.shift_right_logical(jnp.broadcast_to(words[:, None], (words_per_chunk, 32)), bit) & 1
        return bits.reshape(chunk) > 0

    def raw_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        index = c * chunk + lane
        v = plgpu.load(x_ref.at[pl.ds(c * chunk, chunk)], mask=index < vocab, other=NEG_INF)
        v = v.astype(jnp.float32)
        if allowed:  # stage 0: the allowed-token mask
            v = jnp.where(allowed_in(c), v, NEG_INF)
        if min_tokens:  # stage 4: the min_tokens EOS mask
            is_eos_id = functools.reduce(jnp.logical_or, [index == e for e in eos_ids])
            v = jnp.where(too_early & is_eos_id, NEG_INF, v)
        return index, jnp.where(jnp.isnan(v), NEG_INF, v)

    def reduce(step: Callable, init: tuple, load: Callable) -> tuple:
        return lax.fori_loop(0, n_chunks, lambda c, acc: step(acc, *load(c)), init)

    # stage 5: sanitising (a row holding +inf keeps its +inf tokens as 0, drops the rest)
    (raw_max,) = reduce(lambda acc, i, v: (jnp.maximum(acc[0], jnp.max(v)),), (jnp.float32(NEG_INF),), raw_chunk)
    pos_inf = raw_max == jnp.inf
    x_max = jnp.where(pos_inf, 0.0, raw_max)

    def clean_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        index, v = raw_chunk(c)
        return index, jnp.where(pos_inf, jnp.where(v == jnp.inf, 0.0, NEG_INF), v)

    # the first index of the maximum; with log-probs, the raw normaliser sum(exp(x - max)) in the same pass
    finite = x_max > NEG_INF
    shift = jnp.where(finite, x_max, 0.0)
    first_max, exp_total = reduce(
        lambda acc, i, v: (
            jnp.minimum(acc[0], jnp.min(jnp.where(v == x_max, i, vocab))),
            acc[1] + (jnp.sum(jnp.exp(v - shift)) if top_n is not None else 0.0),
        ),
        (jnp.int32(vocab), jnp.float32(0.0)),
        clean_chunk,
    )
    first_max = jnp.where(first_max == vocab, 0, first_max)
    temperature = rows_ref[T]
    threshold = jnp.float32(NEG_INF)
    s_max = x_max
    kept_mass = jnp.float32(0.0)
    token = first_max
    if random:
        greedy = temperature == 0.0
        inverse_t = 1.0 / jnp.where(greedy, 1.0, temperature)
        s_max = x_max * inverse_t

        def scaled_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            index, v = clean_chunk(c)
            s = v * inverse_t
            return index, s, relative_weight(s, s_max)

        def search(statistic: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], target, lo, active):
            """The largest value v with statistic(v) >= target (see `vsampler.xla.largest_value_with`)."""

            def total(t: jax.Array) -> jax.Array:
                (acc,) = reduce(
                    lambda a, i, s, e: (a[0] + jnp.sum(statistic(t, s, e)),), (jnp.float32(0.0),), scaled_chunk
                )
                return acc

            def plain(_: int, bracket: tuple) -> tuple:
                lo_, hi_ = bracket
                mid = lo_ + (hi_ - lo_) * 0.5
                reaches = total(mid) >= target
                return jnp.where(reaches, mid, lo_), jnp.where(reaches, hi_, mid)

            lo, hi_open = lax.fori_loop(0, PLAIN_PASSES, plain, (lo, s_max))
            below_open, snapped = reduce(
                lambda a, i, s, e: (
                    jnp.maximum(a[0], jnp.max(jnp.where(s < hi_open, s, NEG_INF))),
                    jnp.minimum(a[1], jnp.min(jnp.where(s >= lo, s, jnp.inf))),
                ),
                (jnp.float32(NEG_INF), jnp.float32(jnp.inf)),
                scaled_chunk,
            )
            hi = jnp.where(hi_open < s_max, below_open, s_max)
            lo = jnp.where(active, snapped, lo)

            def body(state: tuple) -> tuple:
                lo_, hi_, passes = state
                mid = lo_ + (hi_ - lo_) * 0.5
                mid = jnp.where(mid <= lo_, hi_, mid)
                value, above, below = reduce(
                    lambda a, i, s, e: (
                        a[0] + jnp.sum(statistic(mid, s, e)),
                        jnp.minimum(a[1], jnp.min(jnp.where(s >= mid, s, jnp.inf))),
                        jnp.maximum(a[2], jnp.max(jnp.where(s < mid, s, NEG_INF))),
                    ),
                    (jnp.float32(0.0), jnp.float32(jnp.inf), jnp.float32(NEG_INF)),
                    scaled_chunk,
                )
                reaches = value >= target
                return jnp.where(reaches, above, lo_), jnp.where(reaches, hi_, below), passes + 1

            lo, _, _ = lax.while_loop(
                lambda st: active & (st[0] < st[1]) & (st[2] < MAX_PASSES), body, (lo, hi, jnp.int32(0))
            )
            return lo

        has_values = s_max > NEG_INF
        if top_k:  # stage 7: the k-th largest value
            k = rows_ref[TOP_K]
            lowest, n_finite = reduce(
                lambda a, i, s, e: (
                    jnp.minimum(a[0], jnp.min(jnp.where(s > NEG_INF, s, jnp.inf))),
                    a[1] + jnp.sum(jnp.where(s > NEG_INF, 1.0, 0.0)),
                ),
                (jnp.float32(jnp.inf), jnp.float32(0.0)),
                scaled_chunk,
            )
            on = (k > 0) & has_values & (n_finite > k)
            kth = search(lambda t, s, e: jnp.where(s >= t, 1.0, 0.0), k, jnp.where(on, lowest, s_max), on)
            threshold = jnp.where(on, kth, threshold)

        if top_p:  # stage 8: the largest value whose inclusive kept mass reaches p * total
            p = rows_ref[TOP_P]
            kth = threshold
            (kept_total,) = reduce(
                lambda a, i, s, e: (a[0] + jnp.sum(jnp.where(s >= kth, e, 0.0)),),
                (jnp.float32(0.0),),
                scaled_chunk,
            )
            on = (p < 1.0) & has_values
            bound = s_max + jnp.log(jnp.maximum(1.0 - p, 0.0) / (2.0 * vocab))
            lo = jnp.where(on, jnp.maximum(kth, bound), s_max)
            v_star = search(lambda t, s, e: jnp.where(s >= jnp.maximum(t, kth), e, 0.0), p * kept_total, lo, on)
            threshold = jnp.where(on, jnp.maximum(threshold, v_star), threshold)

        floor_p = rows_ref[MIN_P] if min_p else jnp.float32(0.0)

        def kept_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
            index, s, e = scaled_chunk(c)
            kept = (s > NEG_INF) & (s >= threshold) & (e >= floor_p)
            return index, jnp.where(kept, e, 0.0)

        # stage 10: the chunk where the prefix of kept mass crosses u * total, then the index inside it
        (kept_mass, last_kept) = reduce(
            lambda a, i, ke: (a[0] + jnp.sum(ke), jnp.maximum(a[1], jnp.max(jnp.where(ke > 0, i, -1)))),
            (jnp.float32(0.0), jnp.int32(-1)),
            kept_chunk,
        )
        target = rows_ref[U] * kept_mass

        def find_chunk(c: jax.Array, acc: tuple) -> tuple:
            prefix, found, where_c, before = acc
            _, ke = kept_chunk(c)
            chunk_sum = jnp.sum(ke)
            crossing = ~found & (prefix + chunk_sum > target)
            return (
                prefix + chunk_sum,
                found | crossing,
                jnp.where(crossing, c, where_c),
                jnp.where(crossing, prefix, before),
            )

        _, found, crossing_chunk, before = lax.fori_loop(
            0, n_chunks, find_chunk, (jnp.float32(0.0), False, jnp.int32(0), jnp.float32(0.0))
        )
        _, ke = kept_chunk(crossing_chunk)

        def narrow(_: int, bracket: tuple) -> tuple:
            lo_, hi_ = bracket  # prefix through lo <= target < prefix through hi
            mid = (lo_ + hi_) // 2
            over = before + jnp.sum(jnp.where(lane <= mid, ke, 0.0)) > target
            return jnp.where(over, lo_, mid), jnp.where(over, mid, hi_)

        _, offset = lax.fori_loop(0, chunk.bit_length(), narrow, (jnp.int32(-1), jnp.int32(chunk - 1)))
        is_kept = jnp.sum(jnp.where(lane == offset, ke, 0.0)) > 0
        sampled = jnp.where(found & is_kept, crossing_chunk * chunk + offset, last_kept)
        sampled = jnp.where(kept_mass > 0, sampled, 0)
        token = jnp.where(greedy, first_max, sampled)

    # a row with no finite value left: its empty-row token
    token = jnp.where(x_max > NEG_INF, token, rows_ref[EMPTY_TOKEN].astype(jnp.int32))

    log_z_raw = token_x = jnp.float32(0.0)
    if top_n is not None:  # log-probs: the normaliser from the first pass, the token's logit from its chunk
        log_z_raw = jnp.where(finite, shift + jnp.log(exp_total), NEG_INF)
        index, v = clean_chunk(jnp.clip(token, 0, vocab - 1) // chunk)
        token_x = jnp.max(jnp.where(index == token, v, NEG_INF))
        if top_n:  # entry j: the largest value after entry j-1 (ties: lower index first), one pass each
            top_x_ref, top_ids_ref = top_refs
            slot = jnp.arange(top_x_ref.shape[0], dtype=jnp.int32)
            top_x = jnp.full(slot.shape, NEG_INF, jnp.float32)
            top_ids = jnp.zeros(slot.shape, jnp.int32)
            prev_v, prev_i = jnp.float32(jnp.inf), jnp.int32(-1)
            for j in range(top_n):

                def best_after(a: tuple, i: jax.Array, v: jax.Array, pv=prev_v, pi=prev_i) -> tuple:
                    after = (v < pv) | ((v == pv) & (i > pi))
                    m = jnp.max(jnp.where(after, v, NEG_INF))
                    first = jnp.min(jnp.where(after & (v == m), i, vocab))
                    better = m > a[0]
                    return jnp.where(better, m, a[0]), jnp.where(better, first, jnp.minimum(a[1], first))

                prev_v, prev_i = reduce(
                    lambda a, i, v, f=best_after: f(a, i, v), (jnp.float32(NEG_INF), jnp.int32(vocab)), clean_chunk
                )
                top_x = jnp.where(slot == j, prev_v, top_x)
                top_ids = jnp.where(slot == j, prev_i, top_ids)
            top_x_ref[...] = top_x
            top_ids_ref[...] = top_ids

    finished = rows_ref[FINISHED] > 0
    is_eos = jnp.max(jnp.where(eos_ref[...] == token, 1, 0)) > 0
    token_ref[...] = jnp.full((1,), jnp.where(finished, pad_id, token), jnp.int32)
    finished_ref[...] = jnp.full((1,), jnp.where(finished | is_eos, 1, 0), jnp.int32)
    column = jnp.arange(STAT_COLUMNS)
    stats = jnp.where(column == THRESHOLD, threshold, 0.0)
    for where, value in ((S_MAX, s_max), (KEPT_MASS, kept_mass), (LOG_Z_RAW, log_z_raw), (TOKEN_X, token_x)):
        stats = jnp.where(column == where, value, stats)
    stats_ref[...] = stats


@functools.partial(
    jax.jit,
    static_argnames=(
        "pad_id",
        "top_k",
        "top_p",
        "min_p",
        "random",
        "min_tokens",
        "chunk",
        "num_warps",
        "interpret",
        "top_n",
    ),
)
def fused_sample_triton(
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None = None,
    *,
    pad_id: int,
    top_k: bool,
    top_p: bool,
    min_p: bool,
    random: bool,
    chunk: int,
    num_warps: int,
    interpret: bool,
    min_tokens: bool = False,
    top_n: int | None = None,
) -> tuple[jax.Array, ...]:
    """One program per row: logits (B, V), rows (B, 8) float32, eos (E,) int32 with E a power of two,
    allowed (B, ceil(V / 32)) int32 packed mask words or None; `top_n`: None (no log-prob values) or the
    top entries to return. Returns tokens (B, 1) int32, finished (B, 1) int32, stats (B, 8) float32
    [, top_x (B, n') float32, top_ids (B, n') int32, n' = n rounded up to a power of two]."""
    batch, vocab = logits.shape
    top_width = 1 << (top_n - 1).bit_length() if top_n else 0
    kernel = functools.partial(
        triton_sampler_kernel,
        vocab=vocab,
        chunk=chunk,
        pad_id=pad_id,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        random=random,
        min_tokens=min_tokens,
        allowed=allowed is not None,
        top_n=top_n,
    )
    row = lambda i: (i, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, vocab), row),
        pl.BlockSpec((None, ROW_COLUMNS), row),
        pl.BlockSpec(eos.shape, lambda i: (0,)),
    ]
    inputs = [logits, rows, eos]
    if allowed is not None:
        in_specs.append(pl.BlockSpec((None, allowed.shape[1]), row))
        inputs.append(allowed)
    out_specs = [
        pl.BlockSpec((None, 1), row),
        pl.BlockSpec((None, 1), row),
        pl.BlockSpec((None, STAT_COLUMNS), row),
    ]
    if top_n:
        out_specs += [pl.BlockSpec((None, top_width), row)] * 2
    return pl.pallas_call(
        kernel,
        grid=(batch,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=output_shapes(batch, top_width or None),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*inputs)
