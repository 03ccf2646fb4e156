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

from vsampler.inputs import SamplerInputs, history_masks

NEG_INF = float("-inf")


def active(inp: SamplerInputs) -> bool:
    """Whether any of stages 1-4 can change the logits (static)."""
    return (
        inp.bias_dense is not None
        or inp.bias_ids is not None
        or inp.stages.min_tokens
        or (inp.history is not None and inp.stages.penalties)
    )


def penalised_logits(inp: SamplerInputs) -> jax.Array:
    """Stages 1-4, as float32 (B, V); the logits as given (dtype included) when none is active.

    1. bias: `x += bias` (a mapping adds at its ids; an array elementwise).
    2. repetition `r`, once per distinct token among the history's real slots (prompt + generated):
       `x * (1 / r)` where `x > 0`, else `x * r`.
    3. presence: `x -= presence` once per distinct generated token (slots at positions >= prompt_len);
       frequency: `x -= frequency * count`, count = the token's generated occurrences.
    4. min_tokens: EOS ids get -inf while the row's generated count (its real slots at positions
       >= prompt_len) is below min_tokens.
    """
    if not active(inp):
        return inp.logits
    x = inp.logits.astype(jnp.float32)
    batch, vocab = x.shape
    p = inp.params
    rows = jnp.arange(batch)[:, None]
    if inp.bias_dense is not None:
        x = x + inp.bias_dense
    if inp.bias_ids is not None:
        x = x.at[:, inp.bias_ids].add(inp.bias_values[None, :])

    if inp.history is not None and (inp.stages.penalties or inp.stages.min_tokens):
        valid, generated = history_masks(inp.history, inp.prompt_len, vocab)
    if inp.history is not None and inp.stages.penalties:
        ids = jnp.where(valid, inp.history, 0)
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]  # (B, L, L)
        count = jnp.sum(same & generated[:, None, :], axis=2).astype(jnp.float32)  # generated occurrences
        v = x[rows, ids]
        if inp.stages.repetition:
            r = p.repetition_penalty[:, None]
            v = rounded(jnp.where(v > 0, v * (1.0 / r), v * r))
        if inp.stages.presence:
            v = v - p.presence_penalty[:, None] * (count > 0)
        if inp.stages.frequency:
            v = v - rounded(p.frequency_penalty[:, None] * count)
        x = x.at[rows, jnp.where(valid, ids, vocab)].set(v, mode="drop")

    if inp.stages.min_tokens and inp.eos_ids is not None:
        n_generated = generated.sum(axis=1) if inp.history is not None else jnp.zeros((batch,), jnp.int32)
        too_early = (n_generated < p.min_tokens)[:, None]
        eos = jnp.where(inp.eos_ids >= 0, inp.eos_ids, vocab)[None, :]
        x = x.at[rows, eos].set(jnp.where(too_early, NEG_INF, x[rows, jnp.minimum(eos, vocab - 1)]), mode="drop")

    return x


def rounded(product: jax.Array) -> jax.Array:
    """A product rounded on its own before it is added to anything (a hint against fused multiply-add;
    sharing this module between implementations is what actually guarantees equal rounding)."""
    return jax.lax.optimization_barrier(product)
