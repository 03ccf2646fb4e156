"""The executable spec: plain jnp, sort-based, written to be obviously correct rather than fast.

For logits `(B, V)` (math in float32) and per-row parameters, each row goes through, in order
(stages 1-4 live in `vsampler.core.penalties`, shared by every implementation):

 0. allowed tokens (structured output, optional): tokens the packed bitmask `allowed_tokens` does not
    allow get -inf before anything else (no later stage can bring a -inf back: a +inf bias on it makes
    NaN, which stage 5 turns into -inf; so implementations may apply the mask anywhere before stage 5).
 1. logit bias: `x += bias` (a mapping adds at its ids; an array adds elementwise; -inf bans).
 2. repetition penalty `r`, once per distinct token in the row's history (prompt + generated; the
    row's first `prompt_ignore_length` real prompt tokens left out, HF's `prompt_ignore_length`):
    `x = x / r` where `x > 0`, else `x * r` (a division: a reciprocal multiply could fuse with the next
    stage's subtraction into one rounding on CPU).
 3. presence penalty: `x -= presence` once per distinct *generated* token (history positions
    >= prompt_len); frequency penalty: `x -= frequency * count` per occurrence of a generated token.
 4. min_tokens: EOS ids get -inf while the row has generated fewer than `min_tokens` tokens (its count of
    real history slots at positions >= prompt_len).
 5. sanitising (run-time facts, no error possible): NaN -> -inf. If a row holds +inf, its +inf tokens
    share all the mass equally (they become 0, every other token -inf).
 6. temperature: `x *= 1 / T` (the reciprocal, then one multiply: the same rounding in every
    implementation and under every XLA lowering). A row with `T == 0` is greedy: its token is the
    lowest index of its maximum, and stages 7-9 do not apply to it. Overflow: `1 / T` is capped at
    `FLT_MAX / 2 / max(|x_max|, 1)` (`x_max`: the row's largest penalised logit), so `x / T` never
    leaves the float32 range; the cap acts only where `|x_max| / T > FLT_MAX / 2`, and there it changes no
    token: every token below the maximum has weight exactly 0 either way, so the row samples among its
    maxima, uniformly over ties (the argmax-like limit), and no log-prob is NaN
    (`vsampler.core.numerics.inverse_temperature`, shared by every implementation).
 7. top-k: keep tokens whose value is >= the k-th largest value (ties at the boundary all kept);
    `k == 0` or `k >= V` keeps everything.
 8. top-p over what top-k kept: with `e_i = exp(x_i - max)` over the kept tokens, keep token i when the
    mass strictly above it, `sum(e_j for e_j > e_i)`, is `< p' * sum(e)`, where `p' = top_p - 2^-20`
    (`vsampler.core.inputs.TOP_P_SLACK`): a mass within 2^-20 of p counts as reaching it, so boundaries a
    person computes by hand come out as exact arithmetic says ({0.3, 0.1, 0.1, 0.5} at top_p 0.8: the
    mass above the 0.1 pair is 0.8, not < 0.8, so they are dropped; float32 sums say 0.79999995 or
    0.8000001 by luck). Here the sums are compensated (double-float, `exact_cumsum`), so they are right
    to one float32 rounding at any V; the fast paths sum in float32 in their own order, so they can
    differ from this only for a token whose mass above lies within their rounding of `p' * sum(e)`.
    The most probable tokens are always kept; ties are kept or dropped together; `top_p == 1` keeps
    everything.
 9. min-p: keep tokens with `p_i >= min_p * p_max`, i.e. `exp(x_i - max) >= min_p`.
10. draw: `u` is one uniform per row (see `vsampler.core.inputs.draw_uniforms`); the token is the smallest
    index whose inclusive cumulative kept mass, summed in vocabulary order, exceeds `u * total`
    (where rounding leaves the total at or below `u * total`: the last kept token).

Edge cases: a row with no finite value left after stages 0-5 ("empty") returns token 0 (with
`allowed_tokens`: the first EOS id, so a request its grammar has left without a token ends) and its
`process_logits` row is all -inf. A token id outside `[0, V)` is never returned.

Log-probabilities (`logprobs`), for the sampled token and for the n tokens with the largest penalised
logits (stages 0-5; ties: lower id first), in one of two distributions:
  "raw":       `log_softmax` of the penalised logits (after stages 0-5, before temperature and filtering);
  "processed": `log_softmax` of `process_logits`: the distribution the token was drawn from (tokens the
               filters dropped have -inf; a greedy row's argmax has 0).
An empty row's log-probabilities are all -inf. The token's rank is the count of tokens whose value in
that distribution is >= the token's (1 = most likely; an empty row: V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsampler.core import penalties, registry
from vsampler.core.inputs import SamplerInputs, unpack_allowed
from vsampler.core.logprobs import LogProbs, LogprobsRequest
from vsampler.core.numerics import NEG_INF, inverse_temperature, weight

# ---------------------------------------------------------------------------- stages 1-5: penalties


def penalised_logits(inp: SamplerInputs) -> jax.Array:
    """Stages 0-5 as float32 `(B, V)`: stages 1-4 (`vsampler.core.penalties`, shared by every implementation,
    see there), the allowed-token mask, then sanitising. The mask comes after stages 1-4 so that they
    run on exactly the arrays every implementation gives them (XLA fuses, and so rounds, a program
    by its inputs); stage 0's "first" is a statement about results, and they are the same."""
    x = penalties.penalised_logits(inp).astype(jnp.float32)
    if inp.allowed is not None:  # 0. allowed tokens (after stages 1-4 here: the same result, see above)
        x = jnp.where(unpack_allowed(inp.allowed, x.shape[1]), x, NEG_INF)
    # 5. sanitising: NaN never wins; +inf tokens share the row's mass
    x = jnp.where(jnp.isnan(x), NEG_INF, x)
    has_pos_inf = jnp.any(x == jnp.inf, axis=1, keepdims=True)
    return jnp.where(has_pos_inf, jnp.where(x == jnp.inf, 0.0, NEG_INF), x)


# ----------------------------------------------------------------------------- stages 6-9: warping


def first_argmax(x: jax.Array) -> jax.Array:
    """The lowest index of each row's maximum (0 for a row that is all -inf)."""
    return jnp.argmax(x, axis=1).astype(jnp.int32)


def empty_rows(x: jax.Array) -> jax.Array:
    """(B,) bool: rows of penalised logits with no finite value left."""
    return ~jnp.any(x > NEG_INF, axis=1)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`a + b` as a float32 sum and its exact rounding error (Knuth's TwoSum; additions only)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def exact_cumsum(e: jax.Array) -> jax.Array:
    """Inclusive cumulative sums along the last axis, compensated: each prefix is carried as a
    double-float pair (hi, lo) and rounded once to float32 at the end, so the result is the exact prefix
    sum to within about one float32 rounding whatever the length (float32 `cumsum` drifts by up to
    length x 6e-8). Works with `jax_enable_x64` off.

    A Hillis-Steele scan: step d adds to each position the pair 2**d places before it, so after
    ceil(log2 n) steps position i holds the sum of positions 0..i. The steps are one loop body (an
    unrolled `lax.associative_scan` is ~2,000 HLO operations that XLA's CPU compiler takes 1-3 s over)."""
    n = e.shape[-1]
    front = [(0, 0)] * (e.ndim - 1) + [(n, 0)]  # n zeros before the values: what lies before position 0

    def step(d: jax.Array, pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        hi, lo = pair
        back = jnp.left_shift(1, d)  # add the pair `back` positions earlier
        earlier_hi = jax.lax.dynamic_slice_in_dim(jnp.pad(hi, front), n - back, n, axis=-1)
        earlier_lo = jax.lax.dynamic_slice_in_dim(jnp.pad(lo, front), n - back, n, axis=-1)
        total, err = _two_sum(earlier_hi, hi)
        return _two_sum(total, err + (earlier_lo + lo))

    hi, lo = jax.lax.fori_loop(0, max(1, (n - 1).bit_length()), step, (e, jnp.zeros_like(e)))
    return hi + lo


def sort_descending(a: jax.Array) -> jax.Array:
    """Each row of float32 `a` (no NaN) sorted largest first. Sorted as int32 keys in the floats' order
    (the bits, with a negative float's magnitude bits flipped: -inf < ... < -0.0 < 0.0 < ... < inf), the
    same values as `-jnp.sort(-a)` (0.0 before -0.0, which it equals) and about 5x faster on CPU, where
    a float sort's comparator canonicalises zeros and NaNs on every comparison."""
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.where(bits < 0, bits ^ flip, bits)  # increasing with the float
    descending = ~jnp.sort(~keys, axis=1)  # ~k = -k - 1 reverses the order
    return jax.lax.bitcast_convert_type(jnp.where(descending < 0, descending ^ flip, descending), jnp.float32)


def kept_mask(inp: SamplerInputs, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stages 6-9 on penalised logits `x`: `(kept (B, V) bool, scaled (B, V) float32)`.

    `scaled` is `x * (1 / T)` for sampled rows and `x` itself for greedy rows.
    """
    vocab = x.shape[1]
    p = inp.params
    greedy = p.temperature == 0.0
    scaled = x * inverse_temperature(p.temperature, jnp.max(x, axis=1))[:, None]
    kept = scaled > NEG_INF

    # 7. top-k: values >= the k-th largest
    if inp.stages.top_k:
        descending = sort_descending(scaled)
        k = p.top_k
        kth = jnp.take_along_axis(descending, jnp.maximum(k - 1, 0)[:, None], axis=1)
        kept &= (k[:, None] == 0) | (scaled >= kth)

    # 8. top-p: mass strictly above the token < top_p * total, over what top-k kept
    if inp.stages.top_p:
        row_max = jnp.max(jnp.where(kept, scaled, NEG_INF), axis=1, keepdims=True)
        e = jnp.where(kept, weight(scaled, row_max), 0.0)
        e_desc = sort_descending(e)
        inclusive = exact_cumsum(e_desc)
        exclusive = jnp.pad(inclusive[:, :-1], ((0, 0), (1, 0)))  # the exact sum before each position
        # the mass strictly above a value is the exclusive sum at the first position holding that value:
        # the latest position, up to each one, where a new value starts (a running maximum)
        position = jnp.arange(vocab, dtype=jnp.int32)[None, :]
        starts = jnp.pad(e_desc[:, 1:] != e_desc[:, :-1], ((0, 0), (1, 0)), constant_values=True)
        first_of_value = jax.lax.cummax(jnp.where(starts, position, 0), axis=1)
        above = jnp.take_along_axis(exclusive, first_of_value, axis=1)
        total = inclusive[:, -1:]
        keep_sorted = above < p.top_p[:, None] * total
        smallest_kept = jnp.min(jnp.where(keep_sorted, e_desc, jnp.inf), axis=1, keepdims=True)
        kept &= (e >= smallest_kept) | (p.top_p[:, None] >= 1.0)

    # 9. min-p: p_i >= min_p * p_max  <=>  exp(x_i - max) >= min_p
    if inp.stages.min_p:
        row_max = jnp.max(jnp.where(kept, scaled, NEG_INF), axis=1, keepdims=True)
        kept &= weight(scaled, row_max) >= p.min_p[:, None]

    # 6. greedy rows keep only their first maximum
    if inp.stages.greedy:
        only_argmax = jnp.arange(vocab)[None, :] == first_argmax(x)[:, None]
        kept = jnp.where(greedy[:, None], only_argmax & (x > NEG_INF), kept)
    return kept, scaled


# ------------------------------------------------------------------------------------ stage 10: draw


def draw(kept: jax.Array, scaled: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draw in vocabulary order: smallest index with cumulative mass > u * total."""
    vocab = kept.shape[1]
    row_max = jnp.max(jnp.where(kept, scaled, NEG_INF), axis=1, keepdims=True)
    e = jnp.where(kept, weight(scaled, row_max), 0.0)
    cumulative = jnp.cumsum(e, axis=1)
    total = cumulative[:, -1:]
    crossed = cumulative > u[:, None] * total
    last_kept = vocab - 1 - jnp.argmax(kept[:, ::-1], axis=1)
    token = jnp.where(jnp.any(crossed, axis=1), jnp.argmax(crossed, axis=1), last_kept)
    return jnp.where(jnp.any(kept, axis=1), token, 0).astype(jnp.int32)


# -------------------------------------------------------------------------------------- public API


def process_logits(inp: SamplerInputs) -> jax.Array:
    """The warped logits: dropped tokens -inf, kept ones `x * (1 / T)` (greedy rows: the penalised argmax)."""
    kept, scaled = kept_mask(inp, penalised_logits(inp))
    return jnp.where(kept, scaled, NEG_INF)


def sample(inp: SamplerInputs) -> jax.Array:
    """The token per row, `(B,)` int32."""
    return sample_with_logprobs(inp, None)[0]


def sample_with_logprobs(inp: SamplerInputs, logprobs: LogprobsRequest | None) -> tuple[jax.Array, LogProbs | None]:
    """The token per row and, when asked, its log-probabilities (module docstring)."""
    x = penalised_logits(inp)
    kept, scaled = kept_mask(inp, x)
    token = first_argmax(x)
    if inp.stages.random:
        token = jnp.where(inp.params.temperature == 0.0, token, draw(kept, scaled, inp.u))
    token = jnp.where(empty_rows(x), jnp.int32(inp.empty_token), token)
    if logprobs is None:
        return token, None
    if logprobs.mode == "raw":
        distribution = x
    else:
        distribution = jnp.where(kept, scaled, NEG_INF)
    log_z = jax.nn.logsumexp(distribution, axis=1, keepdims=True)
    logp = jnp.where(distribution > NEG_INF, distribution - log_z, NEG_INF)
    # the n largest penalised logits, ties lower id first (`lax.top_k`'s order; -0.0 is made 0.0, which it
    # equals, first): a stable descending sort's first n, without sorting V values per row
    top_ids = jax.lax.top_k(jnp.where(x == 0.0, 0.0, x), logprobs.n)[1].astype(jnp.int32)
    token_value = jnp.take_along_axis(distribution, token[:, None], axis=1)
    return token, LogProbs(
        token=jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0],
        top_ids=top_ids,
        top=jnp.take_along_axis(logp, top_ids, axis=1),
        rank=jnp.sum(distribution >= token_value, axis=1, dtype=jnp.int32),
    )


registry.register(
    registry.Implementation(
        name="reference",
        sample=sample_with_logprobs,
        process_logits=process_logits,
        description="the executable spec: plain jnp, sort-based, obviously correct (slow: it sorts)",
    )
)
