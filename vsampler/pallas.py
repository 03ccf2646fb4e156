"""impl="pallas": the fused Pallas kernel (`vsampler.kernels.sampler`) behind the common input contract.

Variants of one kernel: "tpu" (a block of rows resident in VMEM, compiled by Mosaic with the policy of
`vsampler.kernels.block_sizes`, which picks `vsampler.kernels.sampler` where whole-row temporaries fit
and the chunked `vsampler.kernels.sampler_chunked` where they do not), "tpu-chunked" (the chunked one
by name, to verify it off TPU) and "triton" (`vsampler.kernels.sampler_triton`: one program per row over
power-of-two chunks). The backend picks the variant; on CPU they run in Pallas interpret mode (for
verification only: slow, but the same kernel code), the TPU variant by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vsampler import logprobs as lp
from vsampler import penalties, reference
from vsampler.inputs import SamplerInputs
from vsampler.kernels import block_sizes, sampler_chunked, sampler_triton
from vsampler.kernels import sampler as kernel

NEG_INF = float("-inf")

# jax device_kind -> block-size policy generation
_DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5p": "v5p",
    "TPU v5": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}


VARIANTS = ("tpu", "tpu-chunked", "triton")


def tpu_kernel(plan: block_sizes.BlockPlan) -> Callable[..., tuple[jax.Array, ...]]:
    """The TPU variant a block plan calls for: resident (`sampler.fused_sample`) or chunked
    (`sampler_chunked.fused_sample_chunked`, which also takes the plan's `chunk` and `buffers`)."""
    return kernel.fused_sample if plan.chunk is None else sampler_chunked.fused_sample_chunked


def tpu_generation() -> str | None:
    """The block-size generation of the default device, or None off TPU (interpret mode)."""
    if jax.default_backend() != "tpu":
        return None
    return _DEVICE_KINDS.get(jax.devices()[0].device_kind, "v5e")


def launch(
    inp: SamplerInputs,
    *,
    finished: jax.Array | None = None,
    pad_token_id: int = 0,
    generation: str | None = None,
    interpret: bool | None = None,
    variant: str | None = None,
    top_n: int | None = None,
) -> tuple[jax.Array, ...]:
    """Runs the kernel: (tokens (B,) int32, finished (B,) bool, stats (B, STAT_COLUMNS) float32), plus
    (top_x (B, n) float32, top_ids (B, n) int32) when `top_n` is given (None: no log-prob values).

    `finished` rows emit `pad_token_id`; a row whose token is one of `inp.eos_ids` comes back finished.
    `generation` picks the TPU block-size policy (default: the device's); `variant` is "tpu",
    "tpu-chunked" or "triton" (default: "triton" on GPU, else "tpu"); `interpret` defaults to "on
    neither TPU nor GPU".
    """
    backend = jax.default_backend()
    variant = variant or ("triton" if backend == "gpu" else "tpu")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if interpret is None:
        interpret = backend not in ("tpu", "gpu")
    x, rows, eos, allowed, stages = kernel_operands(inp, finished)
    stages["top_n"] = top_n
    batch, vocab = x.shape
    if variant == "triton":
        width = 1 << (eos.shape[0] - 1).bit_length()  # Triton arrays: power-of-two shapes
        eos = jnp.pad(eos.astype(jnp.int32), (0, width - eos.shape[0]), constant_values=-1)
        gpu = block_sizes.gpu_plan(vocab)
        tokens, new_finished, stats, *top = sampler_triton.fused_sample_triton(
            x,
            rows,
            eos,
            allowed,
            pad_id=pad_token_id,
            chunk=gpu.chunk,
            num_warps=gpu.num_warps,
            interpret=interpret,
            **stages,
        )
        return (tokens[:, 0], new_finished[:, 0] > 0, stats, *(t[:, :top_n] for t in top))
    if generation is None and not interpret:
        generation = tpu_generation()
    plan = block_sizes.plan(
        batch, vocab, x.dtype, None if interpret else generation, allowed is not None, chunked=variant == "tpu-chunked"
    )
    tokens, new_finished, stats, *top = tpu_launch(
        plan, x, rows, eos, allowed, pad_id=pad_token_id, interpret=interpret, **stages
    )
    return (tokens[:batch, 0], new_finished[:batch, 0] > 0, stats[:batch], *(t[:batch] for t in top))


def kernel_operands(
    inp: SamplerInputs, finished: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, dict[str, bool]]:
    """What every kernel variant takes: the penalised logits (B, V), the packed per-row parameters
    (B, 8), the EOS ids (E,) int32 (-1: none), the packed mask words or None, and the stage flags."""
    x = penalties.penalised_logits(inp, eos_mask=False)  # the kernels apply the min_tokens EOS mask
    eos = inp.eos_ids if inp.eos_ids is not None else jnp.full((1,), -1, jnp.int32)
    stages = {
        "top_k": inp.stages.top_k,
        "top_p": inp.stages.top_p,
        "min_p": inp.stages.min_p,
        "random": inp.stages.random,
        "min_tokens": penalties.masks_eos(inp),
    }
    return x, _packed_rows(inp, finished), eos, inp.allowed, stages


def tpu_launch(
    plan: block_sizes.BlockPlan,
    x: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None,
    *,
    interpret: bool,
    pad_id: int = 0,
    **stages: Any,
) -> tuple[jax.Array, ...]:
    """One launch of the TPU variant `plan` calls for, on `kernel_operands`' arrays with the batch padded
    to the plan's blocks: its outputs for the padded batch (statistics: one row per padded row)."""
    pad = plan.padded_batch - x.shape[0]
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        allowed = None if allowed is None else jnp.pad(allowed, ((0, pad), (0, 0)))
    chunking = {} if plan.chunk is None else {"chunk": plan.chunk, "buffers": plan.buffers}
    return tpu_kernel(plan)(
        x,
        rows,
        eos.reshape(1, -1).astype(jnp.int32),
        allowed,
        pad_id=pad_id,
        block_rows=plan.block_rows,
        vmem_limit_bytes=None if interpret else plan.vmem_limit_bytes,
        interpret=interpret,
        **chunking,
        **stages,
    )


def _packed_rows(inp: SamplerInputs, finished: jax.Array | None) -> jax.Array:
    """The per-row parameters as the kernels read them: (B, 8) float32, columns as in `kernel`."""
    p = inp.params
    batch = p.temperature.shape[0]
    u = inp.u if inp.u is not None else jnp.zeros((batch,), jnp.float32)
    done = jnp.zeros((batch,), jnp.float32) if finished is None else finished.astype(jnp.float32)
    early = penalties.too_early_for_eos(inp).astype(jnp.float32) if penalties.masks_eos(inp) else jnp.zeros_like(u)
    empty = jnp.broadcast_to(jnp.asarray(inp.empty_token, jnp.float32), (batch,))
    return jnp.stack([p.temperature, p.top_k.astype(jnp.float32), p.top_p, p.min_p, u, done, early, empty], axis=1)


def sample(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The token per row, `(B,)` int32, from one kernel launch."""
    return launch(inp, variant=variant)[0]


def row_values(inp: SamplerInputs, request: lp.LogprobsRequest, outputs: tuple) -> lp.RowValues:
    """The kernel's per-row outputs as `vsampler.logprobs.RowValues`."""
    _, _, stats, *top = outputs
    batch = stats.shape[0]
    top_x, top_ids = top if request.n else (jnp.zeros((batch, 0), jnp.float32), jnp.zeros((batch, 0), jnp.int32))
    return lp.RowValues(
        token_x=stats[:, kernel.TOKEN_X],
        top_x=top_x,
        top_ids=top_ids,
        log_z_raw=stats[:, kernel.LOG_Z_RAW],
        threshold=stats[:, kernel.THRESHOLD],
        s_max=stats[:, kernel.S_MAX],
        kept_mass=stats[:, kernel.KEPT_MASS],
        x_max=stats[:, kernel.X_MAX],
    )


def finish_logprobs(inp: SamplerInputs, request: lp.LogprobsRequest, outputs: tuple, tokens: jax.Array) -> lp.LogProbs:
    """The log-probabilities from one launch's outputs (`tokens`: before the pad of finished rows)."""
    min_p = inp.params.min_p if inp.stages.min_p else None
    return lp.from_row_values(row_values(inp, request, outputs), tokens, inp.params.temperature, min_p, request)


def sample_with_logprobs(
    inp: SamplerInputs, request: lp.LogprobsRequest | None, variant: str | None = None
) -> tuple[jax.Array, lp.LogProbs | None]:
    """The token per row and, when asked, its log-probabilities, from one kernel launch."""
    outputs = launch(inp, variant=variant, top_n=None if request is None else request.n)
    if request is None:
        return outputs[0], None
    return outputs[0], finish_logprobs(inp, request, outputs, outputs[0])


def process_logits(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The warped logits rebuilt from the kernel's per-row values (threshold, maximum, token)."""
    tokens, _, stats = launch(inp, variant=variant)
    x = reference.penalised_logits(inp)  # stages 0-5
    p = inp.params
    greedy = (p.temperature == 0.0)[:, None]
    s = x * kernel.inverse_temperature(p.temperature, jnp.max(x, axis=1))[:, None]
    kept = (s > NEG_INF) & (s >= stats[:, kernel.THRESHOLD : kernel.THRESHOLD + 1])
    if inp.stages.min_p:
        kept &= jnp.exp(s - stats[:, kernel.S_MAX : kernel.S_MAX + 1]) >= p.min_p[:, None]
    only_token = (jnp.arange(x.shape[1])[None, :] == tokens[:, None]) & (x > NEG_INF)
    kept = jnp.where(greedy, only_token, kept)
    return jnp.where(kept, s, NEG_INF)
