"""Log-probabilities of the sampled token and of the top-n tokens, as `sample(..., logprobs=n)` returns them.

Semantics (the spec is `vsampler.core.reference`): `top_ids` are the n tokens with the largest penalised logits
(after the allowed-token mask, bias, penalties and the min_tokens mask; ties: lower id first), in that
order, whatever the mode; their log-probabilities and the sampled token's are taken in one of two
distributions:

* "raw" (default, as vLLM's `raw_logprobs`): `log_softmax` of the penalised logits, before temperature
  and filtering;
* "processed": `log_softmax` of `process_logits`, the distribution the token was drawn from: tokens
  top-k / top-p / min-p dropped get -inf, a greedy row's argmax gets 0.

`rank` (vLLM's `selected_token_ranks`) is the sampled token's rank in the same distribution: the number
of tokens whose log-probability is >= the token's (1 = the most likely; ties count against it, as
vLLM's). It compares the values the log-probabilities are taken from (penalised logits for "raw", the
kept scaled logits for "processed"), so it never depends on how a log-normaliser rounds; a greedy row's
processed rank is 1, and a row with no finite logit has rank V. One counting pass over the row, no sort.

A row with no finite logit gets -inf everywhere. In `sample_step`, a finished row (it emits the pad id)
reports 0 for its token, rank 1, and -inf for its top entries, whose ids are the pad id.

The fast paths never build a `(B, V)` array of log-probabilities: they return per-row values (the raw
log-normaliser, the kept threshold, the scaled maximum, the kept mass, the token's logit and the top-n
logits) and `from_row_values` finishes the arithmetic on `(B, n)` values.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core.numerics import NEG_INF, inverse_temperature, weight

Mode = Literal["raw", "processed"]
MODES: tuple[str, ...] = ("raw", "processed")
MAX_LOGPROBS = 64  # the kernels unroll one reduction pair per requested entry


class LogProbs(NamedTuple):
    """Log-probabilities returned beside the tokens (a pytree)."""

    token: jax.Array  # (B,) float32: the sampled token's log-probability
    top_ids: jax.Array  # (B, n) int32: the n most likely tokens by penalised logit, best first
    top: jax.Array  # (B, n) float32: their log-probabilities
    rank: jax.Array  # (B,) int32: the sampled token's rank, 1 = most likely (module docstring)


class LogprobsRequest(NamedTuple):
    """What was asked for (static): n top entries, in `mode`."""

    n: int
    mode: str


def request(n: int | None, mode: str, vocab: int | None = None) -> LogprobsRequest | None:
    """Checks `logprobs=n, logprobs_mode=mode` (at trace time) and returns the static request."""
    if mode not in MODES:
        raise ValueError(f"logprobs_mode must be one of {MODES}, got {mode!r}")
    if n is None:
        return None
    if isinstance(n, np.ndarray) and n.ndim == 0:
        n = n[()]
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}] (top entries per row), got {n!r}")
    n = int(n)  # numpy integers too: the request is static, a plain int
    if vocab is not None and n > vocab:
        raise ValueError(f"logprobs={n} asks for more top entries than the vocabulary has ({vocab})")
    return LogprobsRequest(n, mode)


class RowValues(NamedTuple):
    """What a fast path computes per row so that `from_row_values` can finish the log-probabilities."""

    token_x: jax.Array  # (B,) penalised logit of the sampled token
    top_x: jax.Array  # (B, n) penalised logits of top_ids
    top_ids: jax.Array  # (B, n) int32
    log_z_raw: jax.Array  # (B,) log(sum(exp(x))) over the penalised row, -inf for an empty row
    threshold: jax.Array  # (B,) kept threshold in scaled units (-inf: none)
    s_max: jax.Array  # (B,) the row's scaled maximum
    kept_mass: jax.Array  # (B,) sum of exp(s - s_max) over the kept tokens
    rank: jax.Array  # (B,) int32, `token_rank`'s
    x_max: jax.Array  # (B,) the largest penalised logit (stage 6's factor reads it)


def rank_inverse_t(temperature: jax.Array) -> jax.Array:
    """The factor the processed rank compares scaled values with: `1 / T` (1 for a greedy row)."""
    return 1.0 / jnp.where(temperature == 0.0, 1.0, temperature)


def at_least_as_likely(x: jax.Array, token_x: jax.Array, inverse_t: jax.Array, mode: str) -> jax.Array:
    """Elementwise: the penalised values `x` whose token is at least as likely as the sampled one (its
    penalised logit `token_x`, broadcast against `x`) in `mode`'s distribution; `token_rank` counts them.
    Every filter keeps an upper set of scaled values, so the kept tokens at least as likely as the (kept)
    sampled token are all tokens with `s >= s_token`, and no kept-set test is needed."""
    if mode == "raw":
        return x >= token_x
    return x * inverse_t >= token_x * inverse_t


def finish_rank(count: jax.Array, token_x: jax.Array, temperature: jax.Array, vocab: int, mode: str) -> jax.Array:
    """The rank from the count of `at_least_as_likely` values: V for a row with no finite logit, 1 for a
    greedy row's processed rank (its one kept token)."""
    count = count.astype(jnp.int32)
    empty = ~(token_x > NEG_INF)
    if mode != "raw":
        count = jnp.where(temperature == 0.0, jnp.int32(1), count)
    return jnp.where(empty, jnp.int32(vocab), count)


def token_rank(x: jax.Array, token_x: jax.Array, temperature: jax.Array, mode: str) -> jax.Array:
    """The sampled token's rank (module docstring) from the penalised row(s) `x` (..., V) (stages 0-5),
    the token's penalised logit and the row's temperature (...): one compare-and-count pass
    (`at_least_as_likely`, `finish_rank`; the kernels count the same values over their resident rows)."""
    inverse_t = rank_inverse_t(temperature)[..., None]
    at_least = at_least_as_likely(x, token_x[..., None], inverse_t, mode)
    return finish_rank(jnp.sum(at_least, axis=-1, dtype=jnp.int32), token_x, temperature, x.shape[-1], mode)


def from_row_values(
    v: RowValues,
    token: jax.Array,
    temperature: jax.Array,
    min_p: jax.Array | None,
    request: LogprobsRequest,
) -> LogProbs:
    """The log-probabilities from a fast path's per-row values, with the reference's arithmetic."""
    empty = ~(v.log_z_raw > NEG_INF)
    if request.mode == "raw":

        def logp(x: jax.Array, _: jax.Array) -> jax.Array:
            return jnp.where((x > NEG_INF) & ~empty[:, None], x - v.log_z_raw[:, None], NEG_INF)

    else:
        greedy = temperature == 0.0
        inverse_t = inverse_temperature(temperature, v.x_max)
        log_z = (v.s_max + jnp.log(v.kept_mass))[:, None]

        def logp(x: jax.Array, ids: jax.Array) -> jax.Array:
            s = x * inverse_t[:, None]
            kept = (s > NEG_INF) & (s >= v.threshold[:, None])
            if min_p is not None:
                kept &= weight(s, v.s_max[:, None]) >= min_p[:, None]
            sampled = jnp.where(kept, s - log_z, NEG_INF)
            argmax = jnp.where(ids == token[:, None], 0.0, NEG_INF)
            return jnp.where(empty[:, None], NEG_INF, jnp.where(greedy[:, None], argmax, sampled))

    return LogProbs(
        token=logp(v.token_x[:, None], token[:, None])[:, 0],
        top_ids=v.top_ids,
        top=logp(v.top_x, v.top_ids),
        rank=v.rank,
    )


def for_finished_rows(lp: LogProbs, finished: jax.Array, pad_token_id: int) -> LogProbs:
    """A finished row emits the pad id with certainty: token 0, top entries the pad id at -inf."""
    done = finished[:, None]
    return LogProbs(
        token=jnp.where(finished, 0.0, lp.token),
        top_ids=jnp.where(done, jnp.int32(pad_token_id), lp.top_ids),
        top=jnp.where(done, NEG_INF, lp.top),
        rank=jnp.where(finished, jnp.int32(1), lp.rank),
    )
