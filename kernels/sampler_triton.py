"""The fused sampling kernel, GPU (Triton) variant. Same stages, same searches and the same outputs as the
TPU variant (`sampler.py`), laid out for Triton:

* one program per row (grid = B), the row read through masked loads of power-of-two chunks
  (`CHUNK` values: Triton arrays must have power-of-two shapes and the vocabulary rarely is one);
* every pass is a loop over the chunks that reduces to scalars (the body shared with the TPU chunked
  variant: `chunked_passes.sample_rows`): the row is re-read from global memory (in practice L2) on each
  pass instead of staying resident, and values such as `s = x * (1 / T)` and `e = exp(s - max)` are
  recomputed per chunk rather than stored;
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

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from vsampler.kernels import block_sizes
from vsampler.kernels.chunked_passes import SITES, RowChunks, RowColumns, sample_rows
from vsampler.kernels.config import (
    EMPTY_TOKEN,
    EOS_TOO_EARLY,
    FINISHED,
    MIN_P,
    ROW_COLUMNS,
    TOP_K,
    TOP_P,
    KernelConfig,
    T,
    U,
)
from vsampler.kernels.sampler import (
    KEPT_MASS,
    LOG_Z_RAW,
    RANK,
    S_MAX,
    STAT_COLUMNS,
    THRESHOLD,
    TOKEN_X,
    X_MAX,
    output_shapes,
)

from vsampler.core.numerics import NEG_INF


def triton_sampler_kernel(
    *refs: jax.Array,
    vocab: int,
    chunk: int,
    config: KernelConfig,
    allowed: bool = False,
) -> None:
    """One row: x (V,), rows (ROW_COLUMNS,) packed parameters, eos (E,)[, allowed (ceil(V/32),)] ->
    token (1,), finished (1,), stats (STAT_COLUMNS,)[, top_x (n',), top_ids (n',) with n' = n rounded
    up to a power of two]."""
    min_tokens, top_n, pad_id = config.min_tokens, config.top_n, config.pad_id
    x_ref, rows_ref, eos_ref, *refs = refs
    allowed_ref = refs.pop(0) if allowed else None
    token_ref, finished_ref, stats_ref, *top_refs = refs
    lane = jnp.arange(chunk, dtype=jnp.int32)
    words_per_chunk = chunk // 32
    n_words = pl.cdiv(vocab, 32)

    def allowed_in(c: jax.Array) -> jax.Array:
        """The chunk's allowed flags: its `chunk / 32` mask words, one bit per token."""
        word = c * words_per_chunk + jnp.arange(words_per_chunk, dtype=jnp.int32)
        words = plgpu.load(allowed_ref.at[pl.ds(c * words_per_chunk, words_per_chunk)], mask=word < n_words, other=0)
        bit = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32)[None, :], (words_per_chunk, 32))
        bits = lax.shift_right_logical(jnp.broadcast_to(words[:, None], (words_per_chunk, 32)), bit) & 1
        return bits.reshape(chunk) > 0

    def load(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        index = c * chunk + lane
        v = plgpu.load(x_ref.at[pl.ds(c * chunk, chunk)], mask=index < vocab, other=NEG_INF)
        v = v.astype(jnp.float32)
        if allowed:  # stage 0: the allowed-token mask
            v = jnp.where(allowed_in(c), v, NEG_INF)
        return index, v

    rows = RowChunks(vocab, chunk, pl.cdiv(vocab, chunk), (), load, jnp.sum, jnp.max, jnp.min, one_row=True)
    params = RowColumns(
        temperature=rows_ref[T],
        top_k=rows_ref[TOP_K],
        top_p=rows_ref[TOP_P],
        min_p=rows_ref[MIN_P],
        u=rows_ref[U],
        too_early=rows_ref[EOS_TOO_EARLY] > 0,
        empty_token=rows_ref[EMPTY_TOKEN],
    )
    eos_ids = [eos_ref[e] for e in range(eos_ref.shape[0])] if min_tokens else []
    result = sample_rows(rows, params, eos_ids, config)
    token = result.token
    if top_n:
        top_x_ref, top_ids_ref = top_refs
        slot = jnp.arange(top_x_ref.shape[0], dtype=jnp.int32)
        top_x = jnp.full(slot.shape, NEG_INF, jnp.float32)
        top_ids = jnp.zeros(slot.shape, jnp.int32)
        for j, (value, index) in enumerate(zip(result.top_x, result.top_ids, strict=True)):
            top_x = jnp.where(slot == j, value, top_x)
            top_ids = jnp.where(slot == j, index, top_ids)
        top_x_ref[...] = top_x
        top_ids_ref[...] = top_ids

    finished = rows_ref[FINISHED] > 0
    is_eos = jnp.max(jnp.where(eos_ref[...] == token, 1, 0)) > 0
    token_ref[...] = jnp.full((1,), jnp.where(finished, pad_id, token), jnp.int32)
    finished_ref[...] = jnp.full((1,), jnp.where(finished | is_eos, 1, 0), jnp.int32)
    column = jnp.arange(STAT_COLUMNS)
    stats = jnp.where(column == THRESHOLD, result.threshold, 0.0)
    for where, value in (
        (S_MAX, result.s_max),
        (KEPT_MASS, result.kept_mass),
        (LOG_Z_RAW, result.log_z_raw),
        (TOKEN_X, result.token_x),
        (X_MAX, result.x_max),
        (RANK, result.rank),
        *((site.column, n.astype(jnp.float32)) for site, n in zip(SITES, result.loop_trips, strict=True)),
    ):
        stats = jnp.where(column == where, value, stats)
    stats_ref[...] = stats


@functools.partial(jax.jit, static_argnames=("config", "plan", "interpret"))
def fused_sample_triton(
    logits: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None = None,
    *,
    config: KernelConfig,
    plan: block_sizes.GpuPlan,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """One program per row: logits (B, V), rows (B, ROW_COLUMNS) float32, eos (E,) int32 with E a power
    of two, allowed (B, ceil(V / 32)) int32 packed mask words or None; `config` as in
    `sampler.fused_sample` (no fixed trips: the static estimate is TPU only), `plan` the chunk and warps.
    Returns tokens (B, 1) int32, finished (B, 1) int32, stats (B, STAT_COLUMNS) float32
    [, top_x (B, n') float32, top_ids (B, n') int32, n' = n rounded up to a power of two]."""
    batch, vocab = logits.shape
    top_n = config.top_n
    top_width = 1 << (top_n - 1).bit_length() if top_n else 0
    kernel = functools.partial(
        triton_sampler_kernel, vocab=vocab, chunk=plan.chunk, config=config, allowed=allowed is not None
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
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1),
        interpret=interpret,
    )(*inputs)
