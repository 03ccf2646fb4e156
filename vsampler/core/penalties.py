"""Stages 1-4 of the spec (logit bias, repetition / presence / frequency penalties, min_tokens), shared
by every implementation.

Penalties are sparse: the logits are gathered at the history's L ids, updated, and scattered back
(duplicate ids write the same value); per-slot counts come from an (L, L) comparison. Nothing of size
(B, V) is built besides the logits themselves. Every implementation runs this same code, so the
penalised logits agree bit for bit: XLA may contract a multiply and the following add into one fused
multiply-add depending on how it fuses the surrounding program, and a dense (B, V) formulation in one
implementation and a sparse one in another would then round differently. The tests check it against a
plain numpy statement of the definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsampler.core.inputs import SamplerInputs, eos_rows, history_masks, ignored_prompt_slots
from vsampler.core.numerics import NEG_INF


def masks_eos(inp: SamplerInputs) -> bool:
    """Whether stage 4 (the min_tokens EOS mask) can be active (static)."""
    return inp.stages.min_tokens and inp.eos_ids is not None


def active(inp: SamplerInputs, *, eos_mask: bool = True) -> bool:
    """Whether any of stages 1-4 (stage 4 only with `eos_mask`) can change the logits (static)."""
    return (
        inp.bias_dense is not None
        or inp.bias_ids is not None
        or (eos_mask and masks_eos(inp))
        or (inp.history is not None and inp.stages.penalties)
    )


def too_early_for_eos(inp: SamplerInputs) -> jax.Array:
    """(B,) bool: rows whose generated count (real history slots at positions >= prompt_len) is still
    below min_tokens, whose EOS ids stage 4 masks."""
    batch, vocab = inp.logits.shape
    if inp.history is None:
        n_generated = jnp.zeros((batch,), jnp.int32)
    else:
        n_generated = history_masks(inp.history, inp.prompt_len, vocab)[1].sum(axis=1)
    return n_generated < inp.params.min_tokens


def penalised_logits(inp: SamplerInputs, *, eos_mask: bool = True) -> jax.Array:
    """Stages 1-4, as float32 (B, V); the logits as given (dtype included) when none is active.
    `eos_mask=False` leaves stage 4 to the caller (the fused kernels apply it themselves).

    1. bias: `x += bias` (a mapping adds at its ids; an array elementwise).
    2. repetition `r`, once per distinct token among the history's real slots (prompt + generated; the
       row's first `prompt_ignore_length` real prompt tokens left out, HF's `prompt_ignore_length`: a
       token found only there is not penalised): `x / r` where `x > 0`, else `x * r` (a true division:
       `x * (1 / r)` then `- presence` was contracted into one fused multiply-add by the CPU compiler,
       and a division by a broadcast `r` was rewritten as a multiplication by its reciprocal; either way
       the rounding differed from the spec's).
    3. presence: `x -= presence` once per distinct generated token (slots at positions >= prompt_len);
       frequency: `x -= frequency * count`, count = the token's generated occurrences.
    4. min_tokens: EOS ids get -inf while the row's generated count (its real slots at positions
       >= prompt_len) is below min_tokens.
    """
    if not active(inp, eos_mask=eos_mask):
        return inp.logits
    x = inp.logits.astype(jnp.float32)
    batch, vocab = x.shape
    p = inp.params
    rows = jnp.arange(batch)[:, None]
    if inp.bias_dense is not None:
        x = x + inp.bias_dense
    if inp.bias_ids is not None:
        x = x.at[:, inp.bias_ids].add(inp.bias_values[None, :])

    if inp.history is not None and inp.stages.penalties:
        history = counted_history(inp)
        valid, generated = history_masks(history, inp.prompt_len, vocab)
        ids = jnp.where(valid, history, 0)
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]  # (B, L, L)
        count = jnp.sum(same & generated[:, None, :], axis=2).astype(jnp.float32)  # generated occurrences
        v = x[rows, ids]
        if inp.stages.repetition:
            # r laid out at v's shape behind a barrier: XLA rewrites a division by a broadcast into a
            # multiplication by its reciprocal, which rounds differently (14.875 / 1.25 became 11.900001)
            r = jax.lax.optimization_barrier(jnp.broadcast_to(p.repetition_penalty[:, None], v.shape))
            v = rounded(jnp.where(v > 0, v / r, v * r))
        if inp.stages.presence:
            v = v - p.presence_penalty[:, None] * (count > 0)
        if inp.stages.frequency:
            v = v - rounded(p.frequency_penalty[:, None] * count)
        x = x.at[rows, jnp.where(valid, ids, vocab)].set(v, mode="drop")

    if eos_mask and masks_eos(inp):
        too_early = too_early_for_eos(inp)[:, None]
        eos = eos_rows(jnp.where(inp.eos_ids >= 0, inp.eos_ids, vocab))  # (1, E) or per request (B, S)
        x = x.at[rows, eos].set(jnp.where(too_early, NEG_INF, x[rows, jnp.minimum(eos, vocab - 1)]), mode="drop")

    return x


def counted_history(inp: SamplerInputs) -> jax.Array:
    """The (B, L) history the penalties count: each row's first `prompt_ignore_length` real prompt tokens
    emptied (-1) when that stage is on. Only the repetition penalty reads prompt slots (presence,
    frequency and min_tokens count generated slots), so emptying them is exactly "left out" for it."""
    if not (inp.stages.prompt_ignore and inp.stages.repetition):
        return inp.history
    valid, generated = history_masks(inp.history, inp.prompt_len, inp.logits.shape[1])
    return jnp.where(ignored_prompt_slots(valid, generated, inp.params.prompt_ignore_length), -1, inp.history)


def rounded(product: jax.Array) -> jax.Array:
    """A product rounded on its own before it is added to anything (a hint against fused multiply-add;
    sharing this module between implementations is what actually guarantees equal rounding)."""
    return jax.lax.optimization_barrier(product)
