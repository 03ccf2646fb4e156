"""The fused sampling kernel, TPU chunked variant: for a block of rows whose passes do not fit in VMEM
as whole-row temporaries (v4's 16 MiB above ~50k vocabulary, any generation at large enough V).

Same launch, inputs and outputs as the resident variant (`sampler.py`): each grid step owns a block of
R rows, copied into VMEM once (single-buffered when two copies do not fit). The difference is the
passes: the resident variant computes each pass over the whole (R, V) block, so its temporaries are
(R, V) float32 arrays, five of them alive at once; here every pass is a loop over (R, CHUNK) slices of
the resident block that reduces to (R, 1) columns (`chunked_passes.sample_rows`, the body the GPU
variant shares), so the temporaries are chunk-sized and VMEM holds little more than the logits
themselves. The logits are still read from HBM once per call.

The block is CHUNK-aligned: it overhangs the vocabulary up to the next multiple of CHUNK (what lies
past V is masked to -inf on load), so every slice is an aligned, static-size lane window. Rows cross
the draw's threshold in different chunks, so each row keeps its crossing chunk's kept mass as the
chunk loop passes it (one (R, CHUNK) select per chunk), and the token's logit costs one more pass.
Reference: `vsampler.core.reference`. Block sizes: `block_sizes.plan` (its `chunk`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from vsampler.kernels import block_sizes
from vsampler.kernels.chunked_passes import SITES, RowChunks, RowColumns, sample_rows
from vsampler.kernels.config import EMPTY_TOKEN, EOS_TOO_EARLY, FINISHED, MIN_P, TOP_K, TOP_P, KernelConfig, T, U
from vsampler.kernels.row_passes import lanes_max, lanes_min, lanes_sum
from vsampler.kernels.sampler import (
    KEPT_MASS,
    LOG_Z_RAW,
    RANK,
    S_MAX,
    THRESHOLD,
    TOKEN_X,
    X_MAX,
    row_block_call,
    stats_block,
    unpack_allowed_block,
)

from vsampler.core.numerics import NEG_INF


def chunked_sampler_kernel(
    *refs: jax.Array,
    vocab: int,
    chunk: int,
    config: KernelConfig,
    allowed: bool = False,
) -> None:
    """One block of rows: x (R, V') with V' = V rounded up to CHUNK, rows (R, 8), eos (1, E)
    [, allowed (R, V' / 32)] -> token (R, 1), finished (R, 1), stats (R, 8)[, top_x (R, n), top_ids (R, n)].
    `config.trips`: fixed trip counts for the data-dependent loops (`chunked_passes.SITES`), for the
    static estimate's compiles only."""
    min_tokens, top_n, pad_id = config.min_tokens, config.top_n, config.pad_id
    x_ref, rows_ref, eos_ref, *refs = refs
    allowed_ref = refs.pop(0) if allowed else None
    token_ref, finished_ref, stats_ref, *top_refs = refs
    block_rows = x_ref.shape[0]
    words = chunk // 32

    def load(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        start = pl.multiple_of(c * chunk, chunk)
        index = start + lax.broadcasted_iota(jnp.int32, (block_rows, chunk), 1)
        v = x_ref[:, pl.ds(start, chunk)].astype(jnp.float32)
        v = jnp.where(index < vocab, v, NEG_INF)  # the block's overhang past V
        if allowed:  # stage 0: the allowed-token mask
            bits = allowed_ref[:, pl.ds(pl.multiple_of(c * words, words), words)]
            v = jnp.where(unpack_allowed_block(bits, chunk), v, NEG_INF)
        return index, v

    rows = RowChunks(
        vocab, chunk, pl.cdiv(vocab, chunk), (block_rows, 1), load, lanes_sum, lanes_max, lanes_min, one_row=False
    )
    packed = rows_ref[...]

    def column(c: int) -> jax.Array:
        return packed[:, c : c + 1]

    params = RowColumns(
        temperature=column(T),
        top_k=column(TOP_K),
        top_p=column(TOP_P),
        min_p=column(MIN_P),
        u=column(U),
        too_early=column(EOS_TOO_EARLY) > 0,
        empty_token=column(EMPTY_TOKEN),
    )
    eos = eos_ref[...]  # (1, E), -1 = none
    eos_ids = [eos[:, e : e + 1] for e in range(eos.shape[1])] if min_tokens else []
    result = sample_rows(rows, params, eos_ids, config)
    token = result.token
    if top_n:
        top_x_ref, top_ids_ref = top_refs
        top_x_ref[...] = jnp.concatenate(result.top_x, axis=1)
        top_ids_ref[...] = jnp.concatenate(result.top_ids, axis=1)

    # EOS: finished rows emit the pad id; sampling an EOS id finishes a row
    finished = column(FINISHED) > 0
    is_eos = lanes_max(jnp.where(token == eos, 1, 0)) > 0
    token_ref[...] = jnp.where(finished, pad_id, token).astype(jnp.int32)
    finished_ref[...] = (finished | is_eos).astype(jnp.int32)
    values = {
        THRESHOLD: result.threshold,
        S_MAX: result.s_max,
        KEPT_MASS: result.kept_mass,
        LOG_Z_RAW: result.log_z_raw,
        TOKEN_X: result.token_x,
        X_MAX: result.x_max,
        RANK: result.rank,
    }
    stats_ref[...] = stats_block(values, {site.column: n for site, n in zip(SITES, result.loop_trips, strict=True)})


@functools.partial(jax.jit, static_argnames=("config", "plan", "interpret"))
def fused_sample_chunked(
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None = None,
    *,
    config: KernelConfig,
    plan: block_sizes.BlockPlan,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """As `sampler.fused_sample`, with the passes over `plan.chunk`-lane slices (a multiple of 128; of
    4096 with a mask, so that its words are lane-aligned too) and the row block held in `plan.buffers`
    (1 or 2) VMEM copies."""
    vocab = logits.shape[1]
    kernel = functools.partial(chunked_sampler_kernel, vocab=vocab, chunk=plan.chunk, config=config)
    return row_block_call(
        kernel,
        logits,
        rows,
        eos,
        allowed,
        block_rows=plan.block_rows,
        lanes=pl.cdiv(vocab, plan.chunk) * plan.chunk,
        top_n=config.top_n,
        vmem_limit_bytes=None if interpret else plan.vmem_limit_bytes,
        interpret=interpret,
        buffers=plan.buffers,
    )
