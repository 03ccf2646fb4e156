"""The sort-free XLA sampler: the CPU fast path and the fallback everywhere. Same spec as
`vsampler.core.reference`, never sorting the vocabulary and drawing one uniform per row.

How each stage avoids a sort (shapes: B rows, V vocabulary, L history, C = `CHUNK`):

* penalties: `vsampler.core.penalties`, shared with every implementation: gather the logits at the
  history's L ids, update them, scatter them back; never a (B, V) table.
* allowed tokens: each row unpacks its own `ceil(V / 32)` mask words inside its first pass.
* greedy: one `max` pass, then the first index equal to it (`jnp.argmax` is ~13x slower on CPU).
* top-k, k <= `K_CANDIDATES`: exact top values from the chunks with the largest maxima (the top-K
  values of a row all lie in the K chunks whose maxima are largest); the k-th value is the threshold,
  ties at the boundary are kept by the `>=` compare. Larger k: `largest_value_with` on counts.
* top-p: the kept set is `{s >= v*}` where v* is the largest token value whose inclusive mass
  `A(v) = sum(e_j for s_j >= v)` still reaches `top_p * total`. When top-k is small, v* comes from the
  sorted candidates (ties at the k-th value that fell outside the candidates are counted in), and
  when the whole kept set lies among the candidates the draw runs on them too: no vocabulary pass
  after the candidate search. Else `largest_value_with` bisects on values between a proven lower bound
  and the maximum, snapping both ends to the row's own values in the same pass, so it takes about
  log2(#distinct values in the bracket) passes, not 32.
* min-p: `exp(s - max) >= min_p`, one compare.
* draw: per-chunk sums of the kept mass, the chunk where the cumulative sum crosses `u * total`, then
  the prefix inside that chunk: the spec's inverse-CDF rule in one pass plus one chunk.
* log-probs: one more pass for the chunk maxima and the raw log-normaliser together, the top-n entries
  from the n best chunks (the top-k candidates' rule), and the kept mass (`vsampler.core.logprobs`); the
  token's rank is one compare-and-count pass over the row while it is in cache.

Rows are mapped one at a time (`lax.map`): a row stays in cache across its passes, each pass is one
fused loop, and `lax.cond` runs only the searches a row needs.

The arithmetic that decides membership (`x * (1 / T)`, `exp(s - max)`, the compares) is the reference's,
operation for operation; only sums are taken in another order, so kept sets and tokens can differ
only where a sum lies within rounding of a threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vsampler.core import logprobs as lp
from vsampler.core import numerics, penalties, registry
from vsampler.core.inputs import SamplerInputs, unpack_allowed
from vsampler.core.numerics import NEG_INF, draw, inverse_temperature, weight
from vsampler.core.params import Stages

K_CANDIDATES = 64  # static width of the exact top-k candidate path
CHUNK = 128  # vocabulary chunk for candidate selection (the draw's: `numerics.DRAW_CHUNK`)


# ------------------------------------------------------------------------------- stage 5, per row


def sanitise_row(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage 5 on one row, as float32: NaN -> -inf; a row holding +inf keeps its +inf tokens as 0 and
    drops the rest. Returns the row and its maximum."""
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), NEG_INF, x)
    row_max = jnp.max(x)
    return lax.cond(
        row_max == jnp.inf,
        lambda: (jnp.where(x == jnp.inf, jnp.float32(0.0), jnp.float32(NEG_INF)), jnp.float32(0.0)),
        lambda: (x, row_max),
    )


# ---------------------------------------------------------------- one row: threshold searches, draw
#
# Everything below works on ONE row, mapped over the batch with `lax.map`: a row (<= 1 MiB for
# V = 256000) stays in cache across the passes, XLA fuses each pass into one loop, and `lax.cond`
# lets each row run only the searches it needs.


def _chunked(row: jax.Array, fill: float) -> jax.Array:
    pad = (-row.shape[0]) % CHUNK
    return jnp.pad(row, (0, pad), constant_values=fill).reshape(-1, CHUNK)


def top_values(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The row's k largest values, sorted descending (exact), and their vocabulary indices, without
    sorting the row: the top-k values all lie in the k chunks whose maxima are largest."""
    chunks = _chunked(s, NEG_INF)
    if k >= chunks.shape[0]:
        return lax.top_k(s, min(k, s.shape[0]))
    _, best = lax.top_k(jnp.max(chunks, axis=1), k)
    values, where = lax.top_k(chunks[best].reshape(-1), k)
    return values, best[where // CHUNK] * CHUNK + where % CHUNK


def top_entries(x: jax.Array, n: int, chunk_max: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The row's n largest values and their indices, ties lower index first (the order of a stable sort),
    without sorting the row: the candidates are the n chunks with the largest maxima (ties: lower chunk
    first), taken in vocabulary order so that `lax.top_k`'s lower-index-first rule orders ties.
    `chunk_max`: the row's per-`CHUNK` maxima, when already computed."""
    if n == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
    chunks = _chunked(x, NEG_INF)
    if n >= chunks.shape[0]:
        values, index = lax.top_k(x, n)
        return values, index.astype(jnp.int32)
    _, best = lax.top_k(jnp.max(chunks, axis=1) if chunk_max is None else chunk_max, n)
    best = jnp.sort(best)
    values, where = lax.top_k(chunks[best].reshape(-1), n)
    return values, (best[where // CHUNK] * CHUNK + where % CHUNK).astype(jnp.int32)


def chunk_stats(x: jax.Array, x_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One pass over a sanitised row: its per-`CHUNK` maxima (for `top_entries`) and
    `log(sum(exp(x)))` (-inf for an empty row), both reductions of the same chunked view."""
    chunks = _chunked(x, NEG_INF)
    shift = jnp.where(x_max > NEG_INF, x_max, 0.0)
    chunk_max = jnp.max(chunks, axis=1)
    chunk_sum = jnp.sum(jnp.exp(chunks - shift), axis=1)
    return chunk_max, jnp.where(x_max > NEG_INF, shift + jnp.log(jnp.sum(chunk_sum)), NEG_INF)


def first_index_of_max(x: jax.Array, row_max: jax.Array) -> jax.Array:
    """The lowest index holding the row's maximum (0 for an all -inf row): chunk maxima, then one chunk."""
    chunks = _chunked(x, NEG_INF)
    chunk = jnp.argmax(jnp.max(chunks, axis=1) == row_max)
    offset = jnp.argmax(chunks[chunk] == row_max)
    return jnp.where(row_max > NEG_INF, chunk * CHUNK + offset, 0).astype(jnp.int32)


def largest_value_with(
    statistic: Callable[[jax.Array], jax.Array], target: jax.Array, s: jax.Array, lo: jax.Array, hi: jax.Array
) -> jax.Array:
    """The largest value v of the row `s` with `statistic(v) >= target`, given `statistic(lo) >= target`
    and `hi` the row's maximum: the shared search (`vsampler.core.numerics.largest_value_with`) on one row."""
    found = numerics.largest_value_with(
        statistic, target, s, jnp.reshape(lo, (1,)), jnp.reshape(hi, (1,)), jnp.ones((1,), bool)
    )
    return found[0]


class _Row(NamedTuple):
    s: jax.Array  # (V,) scaled logits
    k: jax.Array  # top_k, 0 = off
    top_p: jax.Array
    min_p: jax.Array
    u: jax.Array


def _top_k_threshold(r: _Row, s_max: jax.Array, top: jax.Array | None) -> jax.Array:
    """The k-th largest value (or -inf when top-k is off or keeps every finite value)."""
    if top is None:
        return jnp.float32(NEG_INF)
    width = top.shape[0]
    small = jnp.where((r.k > 0) & (r.k <= width), top[jnp.clip(r.k - 1, 0, width - 1)], NEG_INF)

    def search() -> jax.Array:
        def count_ge(t: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(r.s >= t, jnp.float32(1), jnp.float32(0)))

        n_finite = count_ge(jnp.float32(-jnp.finfo(jnp.float32).max))
        lowest = jnp.min(jnp.where(r.s > NEG_INF, r.s, jnp.inf))
        k = r.k.astype(jnp.float32)

        def find() -> jax.Array:
            return lax.cond(
                count_ge(s_max) >= k,
                lambda: s_max,
                lambda: largest_value_with(count_ge, k, r.s, lowest, s_max),
            )

        return lax.cond(n_finite > k, find, lambda: jnp.float32(NEG_INF))

    return lax.cond((r.k > width) & (s_max > NEG_INF), search, lambda: small)


def candidate_top_p(top: jax.Array, kth: jax.Array, s_max: jax.Array, top_p: jax.Array, extra: jax.Array) -> jax.Array:
    """v* when the top-k set is the candidates `top` >= kth plus `extra` values tied at kth outside them."""
    e_top = weight(top, s_max)  # the same arithmetic as e
    in_k = top >= kth
    e_kth = weight(kth, s_max)
    e_kept = jnp.where(in_k, e_top, 0.0)
    total = jnp.sum(e_kept) + extra * e_kth
    # inclusive mass A(v) at each candidate: everything >= its value (all ties), plus the extras at kth
    inclusive = jnp.sum(jnp.where(top[None, :] >= top[:, None], e_kept[None, :], 0.0), axis=1)
    inclusive = inclusive + jnp.where(top <= kth, extra * e_kth, 0.0)
    return jnp.max(jnp.where(in_k & (inclusive >= top_p * total), top, NEG_INF))


def _top_p_threshold(r: _Row, e: jax.Array, s_max: jax.Array, kth: jax.Array, top: jax.Array | None) -> jax.Array:
    """v*: the largest value whose inclusive kept mass `A(v)` reaches `top_p * total` (-inf: off)."""
    vocab = r.s.shape[0]

    def on_candidates() -> jax.Array:
        extra = jnp.sum(jnp.where(r.s >= kth, jnp.float32(1), jnp.float32(0))) - jnp.sum(top >= kth)
        return candidate_top_p(top, kth, s_max, r.top_p, extra)

    def on_vocabulary() -> jax.Array:
        kept_e = jnp.where(r.s >= kth, e, 0.0)
        target = r.top_p * jnp.sum(kept_e)

        def mass_ge(t: jax.Array) -> jax.Array:
            return jnp.sum(jnp.where(r.s >= t, kept_e, 0.0))

        # each kept token below `bound` has e < (1 - p) / (2V): together < (1 - p) * total (total >= 1)
        bound = s_max + jnp.log((1.0 - r.top_p) / (2.0 * vocab))
        lo = jnp.maximum(kth, bound)
        return lax.cond(
            mass_ge(s_max) >= target,
            lambda: s_max,
            lambda: largest_value_with(mass_ge, target, r.s, lo, s_max),
        )

    off = (r.top_p >= 1.0) | (s_max == NEG_INF)
    if top is None:
        return lax.cond(off, lambda: jnp.float32(NEG_INF), on_vocabulary)
    use_candidates = (r.k > 0) & (r.k <= top.shape[0])
    return lax.cond(off, lambda: jnp.float32(NEG_INF), lambda: lax.cond(use_candidates, on_candidates, on_vocabulary))


def _kept_row(
    r: _Row, s_max: jax.Array, stages: Stages, top: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(kept (V,) bool, e (V,), threshold) for a sampled row; `s_max` is the row's maximum, `top` its
    top-k candidates (when the top-k stage is on); kept = `s >= threshold` and the min-p test."""
    e = weight(r.s, s_max)
    threshold = _top_k_threshold(r, s_max, top)
    if stages.top_p:
        threshold = jnp.maximum(threshold, _top_p_threshold(r, e, s_max, threshold, top))
    kept = (r.s > NEG_INF) & (r.s >= threshold)
    if stages.min_p:
        kept &= e >= r.min_p
    return kept, e, threshold


# -------------------------------------------------------------------------------------- public API


class _RowInputs(NamedTuple):
    x: jax.Array  # (V,) penalised logits, before the allowed-token mask and sanitising
    allowed: jax.Array | None  # (ceil(V / 32),) int32 packed mask words
    temperature: jax.Array
    k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    u: jax.Array


class _Drawn(NamedTuple):
    """A row's token and what `vsampler.core.logprobs` needs of its sampling (scaled units)."""

    token: jax.Array
    threshold: jax.Array
    s_max: jax.Array
    kept_mass: jax.Array


def _row_inputs(inp: SamplerInputs) -> _RowInputs:
    p = inp.params
    u = inp.u if inp.u is not None else jnp.zeros_like(p.temperature)
    return _RowInputs(penalties.penalised_logits(inp), inp.allowed, p.temperature, p.top_k, p.top_p, p.min_p, u)


def _map_rows(
    inp: SamplerInputs,
    greedy_fn: Callable,
    sampled_fn: Callable,
    finish: Callable[[jax.Array, jax.Array, jax.Array, _RowInputs], object] | None = None,
) -> object:
    """Maps over rows: the allowed-token mask, sanitising, then the greedy or the sampled branch (only
    those the stages allow); `finish(x, x_max, result, row_inputs)` post-processes a row's result."""
    stages = inp.stages
    vocab = inp.logits.shape[1]

    def one(ri: _RowInputs) -> object:
        raw = ri.x if ri.allowed is None else jnp.where(unpack_allowed(ri.allowed, vocab), ri.x, NEG_INF)
        x, x_max = sanitise_row(raw)

        def sampled() -> object:
            inverse_t = inverse_temperature(ri.temperature, x_max)
            s = x * inverse_t
            return sampled_fn(_Row(s=s, k=ri.k, top_p=ri.top_p, min_p=ri.min_p, u=ri.u), x_max * inverse_t)

        if not stages.random:
            result = greedy_fn(x, x_max)
        elif not stages.greedy:
            result = sampled()
        else:
            result = lax.cond(ri.temperature == 0.0, lambda: greedy_fn(x, x_max), sampled)
        return result if finish is None else finish(x, x_max, result, ri)

    return lax.map(one, _row_inputs(inp))


def _candidate_token(r: _Row, s_max: jax.Array, stages: Stages, top: jax.Array, index: jax.Array) -> _Drawn:
    """The token of a row whose whole kept set lies among its top-k candidates (1 <= k <= K and no
    value tied at the k-th one outside them): every stage and the draw on K values, no vocabulary pass."""
    kth = top[r.k - 1]
    threshold = kth
    if stages.top_p:
        v_star = candidate_top_p(top, kth, s_max, r.top_p, jnp.float32(0.0))
        threshold = jnp.where(r.top_p < 1.0, jnp.maximum(kth, v_star), kth)
    e = weight(top, s_max)
    kept = (top > NEG_INF) & (top >= threshold)
    if stages.min_p:
        kept &= e >= r.min_p
    order = jnp.argsort(index)  # the draw runs in vocabulary order
    index, kept = index[order], kept[order]
    cumulative = jnp.cumsum(jnp.where(kept, e[order], 0.0))
    crossed = kept & (cumulative > r.u * cumulative[-1])
    last_kept = kept.shape[0] - 1 - jnp.argmax(kept[::-1])
    token = jnp.where(jnp.any(kept), index[jnp.where(jnp.any(crossed), jnp.argmax(crossed), last_kept)], 0)
    return _Drawn(token.astype(jnp.int32), threshold, s_max, cumulative[-1])


def _sampled_row(stages: Stages, kept_mass: bool) -> Callable[[_Row, jax.Array], _Drawn]:
    """A sampled row's token (and the values log-probs need; the kept mass only when `kept_mass`): the
    candidate path when the whole top-k set lies among the K candidates, else the vocabulary searches."""

    def _drawn(kept: jax.Array, e: jax.Array, threshold: jax.Array, s_max: jax.Array, u: jax.Array) -> _Drawn:
        mass = jnp.sum(jnp.where(kept, e, 0.0)) if kept_mass else jnp.float32(1.0)
        return _Drawn(draw(kept, e, u), threshold, s_max, mass)

    def sampled(r: _Row, s_max: jax.Array) -> _Drawn:
        if not stages.top_k:
            kept, e, threshold = _kept_row(r, s_max, stages, None)
            return _drawn(kept, e, threshold, s_max, r.u)
        top, index = top_values(r.s, min(K_CANDIDATES, r.s.shape[0]))

        def full() -> _Drawn:
            kept, e, threshold = _kept_row(r, s_max, stages, top)
            return _drawn(kept, e, threshold, s_max, r.u)

        small_k = (r.k >= 1) & (r.k <= top.shape[0])
        kth = top[jnp.clip(r.k - 1, 0, top.shape[0] - 1)]

        def no_ties_outside() -> jax.Array:  # a value above the last candidate cannot lie outside them
            at_or_above = jnp.sum(jnp.where(r.s >= kth, jnp.float32(1), jnp.float32(0)))
            return (kth > top[-1]) | (at_or_above == jnp.sum(top >= kth))

        on_candidates = lax.cond(small_k, no_ties_outside, lambda: jnp.bool_(False))
        return lax.cond(on_candidates, lambda: _candidate_token(r, s_max, stages, top, index), full)

    return sampled


def _greedy_row(x: jax.Array, x_max: jax.Array) -> _Drawn:
    one = jnp.float32(1.0)
    return _Drawn(first_index_of_max(x, x_max), jnp.float32(NEG_INF), x_max, one)


def sample_with_logprobs(
    inp: SamplerInputs, request: lp.LogprobsRequest | None
) -> tuple[jax.Array, lp.LogProbs | None]:
    """The token per row, `(B,)` int32 (`vsampler.core.reference.sample` without a sort, module docstring),
    and its log-probabilities when `request` asks for them."""
    empty_token = jnp.asarray(inp.empty_token, jnp.int32)
    per_row_empty = empty_token if empty_token.ndim == 1 else None  # per-request stop ids: set after the map

    def finish(x: jax.Array, x_max: jax.Array, d: _Drawn, ri: _RowInputs) -> tuple:
        token = jnp.where(x_max > NEG_INF, d.token, empty_token if per_row_empty is None else -1).astype(jnp.int32)
        if request is None:
            return token, None
        chunk_max, log_z_raw = chunk_stats(x, x_max)
        top_x, top_ids = top_entries(x, request.n, chunk_max)
        rank = lp.token_rank(x, x[token], ri.temperature, request.mode)
        values = lp.RowValues(
            token_x=x[token],
            top_x=top_x,
            top_ids=top_ids,
            log_z_raw=log_z_raw,
            threshold=d.threshold,
            s_max=d.s_max,
            kept_mass=d.kept_mass,
            rank=rank,
            x_max=x_max,
        )
        return token, values

    needs_mass = request is not None and request.mode == "processed"
    token, values = _map_rows(inp, _greedy_row, _sampled_row(inp.stages, needs_mass), finish)
    if per_row_empty is not None:
        token = jnp.where(token < 0, per_row_empty, token)
    if request is None:
        return token, None
    min_p = inp.params.min_p if inp.stages.min_p else None
    return token, lp.from_row_values(values, token, inp.params.temperature, min_p, request)


def sample(inp: SamplerInputs) -> jax.Array:
    """The token per row, `(B,)` int32: `vsampler.core.reference.sample` without a sort (module docstring)."""
    return sample_with_logprobs(inp, None)[0]


def process_logits(inp: SamplerInputs) -> jax.Array:
    """The warped logits, as `vsampler.core.reference.process_logits`."""
    stages = inp.stages

    def greedy(x: jax.Array, x_max: jax.Array) -> jax.Array:
        keep = (jnp.arange(x.shape[0]) == first_index_of_max(x, x_max)) & (x > NEG_INF)
        return jnp.where(keep, x, NEG_INF)

    def sampled(r: _Row, s_max: jax.Array) -> jax.Array:
        top = top_values(r.s, min(K_CANDIDATES, r.s.shape[0]))[0] if stages.top_k else None
        kept, _, _ = _kept_row(r, s_max, stages, top)
        return jnp.where(kept, r.s, NEG_INF)

    return _map_rows(inp, greedy, sampled)


registry.register(
    registry.Implementation(
        name="xla",
        sample=sample_with_logprobs,
        process_logits=process_logits,
        description="sort-free XLA: candidate top-k, value-snapping bisection, two-level draw",
        auto_backends=("*",),
        auto_rank=1,
    )
)
