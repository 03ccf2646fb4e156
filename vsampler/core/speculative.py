"""Speculative decoding: verify a draft model's K tokens against the target model in one call.

    accepted, num_accepted = verify_draft(target_logits, draft_tokens, draft_probs, params, key)

Shapes and dtypes:
  target_logits  (B, K + 1, V) float32 / bfloat16: the target's logits at the K draft positions and one
                 more (the bonus position after the last draft token).
  draft_tokens   (B, K) integer ids the draft proposed.
  draft_probs    (B, K, V) float, the draft's probabilities for those positions (each row sums to 1), or
                 None for a deterministic draft (probability 1 on its token).
  params, key, history, prompt_len, eos_token_id, impl: as `vsampler.sample`. `key` is one key or one
                 per row (per-request streams).
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

from vsampler.core.inputs import EosIds
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
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    keys = jax.random.split(key, batch) if single else key
    if keys.shape[0] != batch:
        raise ValueError(f"key must be one PRNG key or one per row ({batch}), got shape {key.shape}")

    def row(k: jax.Array) -> jax.Array:
        return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(k, j), (2,)))(jnp.arange(positions))

    return jax.vmap(row)(keys)


def verify_draft(
    target_logits: jax.Array,
    draft_tokens: jax.Array,
    draft_probs: jax.Array | None,
    params: SamplingParams,
    key: jax.Array,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Exact speculative verification of `draft_tokens` (module docstring): `(accepted, num_accepted)`."""
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
    if params.batch_size not in (None, batch):
        raise ValueError(f"SamplingParams has {params.batch_size} per-row values but the batch has {batch} rows")
    draft = jnp.asarray(draft_tokens, jnp.int32)
    if k and not isinstance(draft, jax.core.Tracer) and bool(jnp.any((draft < 0) | (draft >= vocab))):
        raise ValueError(f"draft_tokens hold ids outside the vocabulary [0, {vocab})")

    # the target's warped distribution at every position, the drafts before it counted as generated
    before = jnp.arange(k)[None, :] < jnp.arange(positions)[:, None]  # (K + 1, K): draft i precedes j
    drafts_seen = jnp.where(before[None], draft[:, None, :], -1)  # (B, K + 1, K)
    flat_history = None
    if history is not None or k:
        base = jnp.full((batch, 0), -1, jnp.int32) if history is None else jnp.asarray(history, jnp.int32)
        base = jnp.broadcast_to(base[:, None, :], (batch, positions, base.shape[1]))
        flat_history = jnp.concatenate([base, drafts_seen], axis=2).reshape(batch * positions, -1)
    if prompt_len is None:
        prompt_len = 0 if history is None else np.shape(history)[1]
    flat_prompt_len = jnp.repeat(jnp.broadcast_to(jnp.asarray(prompt_len, jnp.int32), (batch,)), positions)
    warped = process_logits(
        jnp.reshape(target_logits, (batch * positions, vocab)),
        _repeat_rows(params, positions),
        history=flat_history,
        prompt_len=flat_prompt_len,
        eos_token_id=eos_token_id,
        impl=impl,
    )
    return _accept(warped.reshape(batch, positions, vocab), draft, draft_probs, _uniforms(key, batch, positions))


@jax.jit
def _accept(warped: jax.Array, draft: jax.Array, draft_probs: jax.Array | None, u: jax.Array):
    batch, positions, vocab = warped.shape
    k = positions - 1
    finite = jnp.any(warped > NEG_INF, axis=-1, keepdims=True)
    p = jnp.where(finite, jax.nn.softmax(jnp.where(finite, warped, 0.0), axis=-1), 0.0)
    p = jnp.where(finite, p, jax.nn.one_hot(0, vocab))  # nothing left: token 0, as `sample`
    q = jax.nn.one_hot(draft, vocab) if draft_probs is None else jnp.asarray(draft_probs, jnp.float32)
    rows = jnp.arange(batch)[:, None]
    cols = jnp.arange(k)[None, :]
    p_d = p[rows, cols, draft]
    q_d = q[rows, cols, draft]
    accepted = u[:, :k, 0] * q_d < p_d  # probability min(1, p / q)
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
