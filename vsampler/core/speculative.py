"""Speculative decoding: verify a draft model's K tokens against the target model in one call.

    accepted, num_accepted = verify_draft(target_logits, draft_tokens, draft_probs, params, key)

Shapes and dtypes:
  target_logits  (B, K + 1, V) float32 / bfloat16: the target's logits at the K draft positions and one
                 more (the bonus position after the last draft token).
  draft_tokens   (B, K) integer ids the draft proposed.
                 Concrete ids outside [0, V) and non-integer dtypes are refused; traced ids outside
                 [0, V) (vLLM pads ragged drafts with -1) have probability 0: always rejected, never
                 emitted, and the target draws that position's token from its own distribution p.
  draft_probs    (B, K, V) float, the draft's probabilities for those positions, or None for a
                 deterministic draft (probability 1 on its token). Concrete values must be finite,
                 >= 0 and sum to 1 per row within `DRAFT_PROBS_ATOL` (1e-3), else ValueError; traced
                 values are sanitised (`sanitise_draft_probs`): NaN / inf / negative entries count as 0,
                 each row is divided by its sum, and a row with no mass left counts as deterministic.
  params, key, history, prompt_len, eos_token_id, impl: as `vsampler.sample` (`eos_token_id` may be
                 per-request stop ids (B, S), -1 padded). `key` is one key or one
                 per row (per-request streams); None is allowed when every row is greedy.
  num_draft_tokens (B,) integer or None (every row K): ragged batches, as vLLM's rejection sampler
                 takes them. Row r's drafts are its first n_r entries (the rest is padding, never read:
                 treated as ids outside [0, V)), and when all n_r are kept its bonus token is drawn from
                 the target at position n_r (target_logits[r, n_r]). Concrete values must lie in [0, K];
                 traced ones are clipped to it.
  allowed_tokens (B, ceil(V / 32)) or (B, K + 1, ceil(V / 32)) packed int32 bitmask (`vsampler.sample`'s;
                 per position, as a grammar advances with each draft token), applied to the target at every
                 position, draft and bonus alike: a disallowed draft token has probability 0 and is
                 rejected, and no emitted token is one the mask disallows. Needs `eos_token_id`: a position
                 the mask leaves without a token emits the first EOS id.
  returns        accepted (B, K + 1) int32: the draft's tokens up to the first rejection, then one token
                 drawn by the target (the resampled or bonus token), then -1; and num_accepted (B,) int32,
                 the number of draft tokens kept (0..K). A row emits num_accepted + 1 tokens.

The target distribution at position j is the spec's: `softmax(process_logits(...))` with the same warping
(bias, penalties, temperature, top-k, top-p, min-p; greedy rows are one-hot on their argmax), the history
extended by the draft tokens before j (so penalties and min_tokens see them as generated). Exact rejection
sampling (Leviathan et al., 2023; Chen et al., 2023): draft token d at position j is kept when
`u * q(d) < p(d)` (probability min(1, p/q)); at the first rejection a token is drawn from the normalised
residual `max(p - q, 0)` (from p if rounding leaves the residual empty); when all K are kept, the bonus
token is drawn from p at position K. Every emitted token is therefore distributed exactly as the target's
warped distribution, and greedy rows keep exactly the draft prefix that matches the target's argmax.

Randomness: row r at position j uses two uniforms from `fold_in(key_r, j)` (accept, then draw); the draws
follow the spec's inverse-CDF rule (`vsampler.core.numerics.draw`). The warping runs on the chosen implementation
(`impl`: reference, xla or the pallas kernel through `process_logits`); acceptance and the residual draw
are shared jnp over (B, K + 1, V).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core.inputs import EosIds, allowed_words, first_eos, key_array
from vsampler.core.numerics import NEG_INF, draw
from vsampler.core.params import NUMERIC_FIELDS, SamplingParams
from vsampler.core.sampling import Impl, process_logits


def _repeat_rows(params: SamplingParams, times: int) -> SamplingParams:
    """Per-row fields (B,) -> (B * times,), each row's value repeated for its positions."""
    children, stages = params.tree_flatten()
    out = []
    for name, value in zip((*NUMERIC_FIELDS, "logit_bias"), children, strict=True):
        per_row = np.ndim(value) == 1 if name != "logit_bias" else (value is not None and np.ndim(value) == 2)
        out.append(jnp.repeat(jnp.asarray(value), times, axis=0) if per_row else value)
    return SamplingParams.tree_unflatten(stages, tuple(out))


def _uniforms(key: Any, batch: int, positions: int) -> jax.Array:
    """(B, K + 1, 2) uniforms: row r, position j from `fold_in(key_r, j)`."""
    key, single_ndim = key_array(key)
    keys = jax.random.split(key, batch) if key.ndim == single_ndim else key
    if keys.ndim != single_ndim + 1 or keys.shape[0] != batch:
        raise ValueError(f"key must be one PRNG key or one per row ({batch}), got shape {key.shape}")

    def row(k: jax.Array) -> jax.Array:
        return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(k, j), (2,)))(jnp.arange(positions))

    return jax.vmap(row)(keys)


def _check_draft_tokens(draft_tokens: Any, batch: int, k: int, vocab: int, used: Any = None) -> jax.Array:
    """Integer ids `(B, K)` as int32; concrete ids outside [0, V) are refused (traced ones: module docstring),
    among the first `used[r]` of each row when `used` (concrete num_draft_tokens) is given."""
    dtype = getattr(draft_tokens, "dtype", None)
    dtype = np.asarray(draft_tokens).dtype if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"draft_tokens must hold integer token ids, got dtype {dtype}")
    if not isinstance(draft_tokens, jax.core.Tracer) and k:
        ids = np.asarray(draft_tokens)
        read = np.ones(ids.shape, bool) if used is None else np.arange(k)[None, :] < np.asarray(used)[:, None]
        bad = ids[read & ((ids < 0) | (ids >= vocab))]
        if bad.size:
            raise ValueError(
                f"draft_tokens hold ids outside the vocabulary [0, {vocab}): {sorted(set(bad.tolist()))[:8]} "
                "(inside jax.jit such ids, e.g. -1 padding, are always rejected instead)"
            )
    return jnp.asarray(draft_tokens).astype(jnp.int32)


DRAFT_PROBS_ATOL = 1e-3  # concrete draft_probs rows must sum to 1 within this (float32 sums over V)


def _check_draft_probs(draft_probs: Any) -> jax.Array | None:
    """Concrete `draft_probs` must be finite, >= 0 and sum to 1 per row within `DRAFT_PROBS_ATOL`."""
    if draft_probs is None:
        return None
    dtype = getattr(draft_probs, "dtype", None)
    dtype = np.asarray(draft_probs).dtype if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"draft_probs must be a float array of probabilities, got dtype {dtype}")
    if isinstance(draft_probs, jax.core.Tracer):
        return jnp.asarray(draft_probs, jnp.float32)
    with jax.ensure_compile_time_eval():  # concrete values (a constant inside the caller's jit too): checked
        q = jnp.asarray(draft_probs, jnp.float32)
        finite, non_negative = bool(jnp.all(jnp.isfinite(q))), bool(jnp.all(q >= 0))
        worst = float(jnp.max(jnp.abs(jnp.sum(q, axis=-1) - 1.0))) if q.size else 0.0
    if not finite:
        raise ValueError("draft_probs must be finite probabilities: it holds NaN or inf")
    if not non_negative:
        raise ValueError(
            "draft_probs must be probabilities (>= 0): it holds negative values (log-probabilities? pass exp of them)"
        )
    if worst > DRAFT_PROBS_ATOL:
        raise ValueError(
            f"draft_probs rows must each sum to 1 (within {DRAFT_PROBS_ATOL}); the worst row is off by {worst:.3g}"
        )
    return q


def verify_draft(
    target_logits: jax.Array,
    draft_tokens: jax.Array,
    draft_probs: jax.Array | None,
    params: SamplingParams,
    key: jax.Array | None,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    num_draft_tokens: jax.Array | None = None,
    allowed_tokens: jax.Array | None = None,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Exact speculative verification of `draft_tokens` (module docstring): `(accepted, num_accepted)`.

    Per request (row): its own parameters, key (one key is split into one per row), history and
    prompt length; its drafts are kept up to its first rejection, then one token is drawn from its
    target distribution. `key` may be None when no row samples (every temperature 0), as in `sample`.
    """
    if np.ndim(target_logits) != 3:
        raise ValueError(f"target_logits must be (B, K + 1, V), got shape {np.shape(target_logits)}")
    batch, positions, vocab = np.shape(target_logits)
    k = positions - 1
    if np.shape(draft_tokens) != (batch, k):
        raise ValueError(
            f"draft_tokens must be (B, K) = {(batch, k)} for target_logits {np.shape(target_logits)}, "
            f"got {np.shape(draft_tokens)}"
        )
    if draft_probs is not None and np.shape(draft_probs) != (batch, k, vocab):
        raise ValueError(f"draft_probs must be (B, K, V) = {(batch, k, vocab)} or None, got {np.shape(draft_probs)}")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if params.batch_size not in (None, batch):
        raise ValueError(f"SamplingParams has {params.batch_size} per-row values but the batch has {batch} rows")
    n_draft = None if num_draft_tokens is None else _check_num_draft(num_draft_tokens, batch, k)
    concrete_n = None if isinstance(num_draft_tokens, jax.core.Tracer) else num_draft_tokens
    draft = _check_draft_tokens(draft_tokens, batch, k, vocab, used=concrete_n)
    if n_draft is not None:  # ragged: row r's drafts past its n_r are padding
        draft = jnp.where(jnp.arange(k)[None, :] < n_draft[:, None], draft, -1)
    q = _check_draft_probs(draft_probs)
    if key is None:
        if params.stages.random:
            raise ValueError("key is None but some row samples (temperature > 0): pass a PRNG key")
        u = jnp.zeros((batch, positions, 2), jnp.float32)  # greedy rows never read their uniforms
    else:
        u = _uniforms(key, batch, positions)

    # the target's warped distribution at every position, the drafts before it counted as generated
    before = jnp.arange(k)[None, :] < jnp.arange(positions)[:, None]  # (K + 1, K): draft i precedes j
    drafts_seen = jnp.where(before[None], draft[:, None, :], -1)  # (B, K + 1, K)
    flat_history = flat_prompt_len = None
    if history is not None or k:
        base = jnp.full((batch, 0), -1, jnp.int32) if history is None else jnp.asarray(history, jnp.int32)
        base = jnp.broadcast_to(base[:, None, :], (batch, positions, base.shape[1]))
        flat_history = jnp.concatenate([base, drafts_seen], axis=2).reshape(batch * positions, -1)
        if prompt_len is None:
            prompt_len = 0 if history is None else np.shape(history)[1]
        flat_prompt_len = jnp.repeat(jnp.broadcast_to(jnp.asarray(prompt_len, jnp.int32), (batch,)), positions)
    elif prompt_len is not None:
        raise ValueError("prompt_len was given without history: it says where the history's prompt ends")
    flat_allowed, empty_token = _flat_allowed(allowed_tokens, eos_token_id, batch, positions, vocab)
    if np.ndim(eos_token_id) == 2:  # per-request stop ids: each row's own at each of its positions
        eos_token_id = jnp.repeat(jnp.asarray(eos_token_id), positions, axis=0)
    warped = process_logits(
        jnp.reshape(target_logits, (batch * positions, vocab)),
        _repeat_rows(params, positions),
        history=flat_history,
        prompt_len=flat_prompt_len,
        eos_token_id=eos_token_id,
        allowed_tokens=flat_allowed,
        impl=impl,
    )
    return _accept(warped.reshape(batch, positions, vocab), draft, q, u, empty_token)


def _check_num_draft(num_draft_tokens: Any, batch: int, k: int) -> jax.Array:
    """(B,) int32 in [0, K]: concrete values are checked, traced ones clipped."""
    dtype = getattr(num_draft_tokens, "dtype", None)
    dtype = np.asarray(num_draft_tokens).dtype if dtype is None else dtype
    if np.shape(num_draft_tokens) != (batch,) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"num_draft_tokens must be a ({batch},) integer array (each row's number of drafts), "
            f"got shape {np.shape(num_draft_tokens)} dtype {dtype}"
        )
    if not isinstance(num_draft_tokens, jax.core.Tracer):
        n = np.asarray(num_draft_tokens)
        if np.any(n < 0) or np.any(n > k):
            raise ValueError(f"num_draft_tokens must lie in [0, K={k}], got {n.tolist()}")
    return jnp.clip(jnp.asarray(num_draft_tokens), 0, k).astype(jnp.int32)


def _flat_allowed(allowed_tokens: Any, eos_token_id: EosIds, batch: int, positions: int, vocab: int):
    """The mask per (row, position) as (B * (K + 1), W) words for `process_logits`, and the token a
    position the mask empties emits (the first EOS id; 0 without a mask, as `sample`)."""
    if allowed_tokens is None:
        return None, jnp.zeros((batch,), jnp.int32)
    words = allowed_words(vocab)
    shape = np.shape(allowed_tokens)
    if shape not in ((batch, words), (batch, positions, words)):
        raise ValueError(
            f"allowed_tokens must be (B, ceil(V / 32)) = {(batch, words)} or (B, K + 1, ceil(V / 32)) = "
            f"{(batch, positions, words)}, got {shape}"
        )
    if eos_token_id is None or (eos_token_id.size if hasattr(eos_token_id, "size") else np.size(eos_token_id)) == 0:
        raise ValueError(
            "allowed_tokens needs eos_token_id: a position whose mask leaves no token emits the first EOS id"
        )
    mask = jnp.asarray(allowed_tokens)
    if mask.ndim == 2:
        mask = jnp.broadcast_to(mask[:, None, :], (batch, positions, words))
    eos = jnp.asarray(eos_token_id, jnp.int32)
    first = first_eos(eos if eos.ndim == 2 else eos.reshape(-1))
    return mask.reshape(batch * positions, words), jnp.broadcast_to(first, (batch,))


def sanitise_draft_probs(q: jax.Array, draft: jax.Array, valid: jax.Array) -> jax.Array:
    """The rule for `draft_probs` values only known at run time (concrete ones are checked instead):
    NaN, infinite and negative entries count as 0 and each row is divided by its sum; a row left with
    no mass (log-probabilities passed by mistake, say) counts as a deterministic draft (one-hot on its
    token). At a draft id outside [0, V) the row is no proposal: the position draws from the target."""
    vocab = q.shape[-1]
    q = jnp.where(jnp.isfinite(q) & (q > 0), q, 0.0)
    total = jnp.sum(q, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(draft, vocab, dtype=jnp.float32)  # all zeros at an id outside [0, V)
    q = jnp.where(total > 0, q / jnp.where(total > 0, total, 1.0), one_hot)
    return jnp.where(valid[..., None], q, 0.0)


@jax.jit
def _accept(warped: jax.Array, draft: jax.Array, draft_probs: jax.Array | None, u: jax.Array, empty_token: jax.Array):
    batch, positions, vocab = warped.shape
    k = positions - 1
    finite = jnp.any(warped > NEG_INF, axis=-1, keepdims=True)
    p = jnp.where(finite, jax.nn.softmax(jnp.where(finite, warped, 0.0), axis=-1), 0.0)
    p = jnp.where(finite, p, jax.nn.one_hot(empty_token, vocab)[:, None, :])  # nothing left: as `sample` (0 or EOS)
    valid = (draft >= 0) & (draft < vocab)  # traced ids outside [0, V) (e.g. -1 padding): always rejected
    q = jax.nn.one_hot(draft, vocab) if draft_probs is None else sanitise_draft_probs(draft_probs, draft, valid)
    safe = jnp.where(valid, draft, 0)
    rows = jnp.arange(batch)[:, None]
    cols = jnp.arange(k)[None, :]
    p_d = jnp.where(valid, p[rows, cols, safe], 0.0)
    q_d = jnp.where(valid, q[rows, cols, safe], 0.0)
    accepted = valid & (u[:, :k, 0] * q_d < p_d)  # probability min(1, p / q)
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    residual = jnp.maximum(p[:, :k] - q, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p[:, :k])
    pool = jnp.concatenate([residual, p[:, k:]], axis=1)  # (B, K + 1, V): what each position resamples from
    drawn = jax.vmap(draw)((pool > 0).reshape(-1, vocab), pool.reshape(-1, vocab), u[:, :, 1].reshape(-1)).reshape(
        batch, positions
    )
    index = jnp.arange(positions)[None, :]
    last = jnp.take_along_axis(drawn, num_accepted[:, None], axis=1)
    padded_draft = jnp.concatenate([draft, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    out = jnp.where(index < num_accepted[:, None], padded_draft, jnp.where(index == num_accepted[:, None], last, -1))
    return out.astype(jnp.int32), num_accepted
