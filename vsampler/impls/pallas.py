"""impl="pallas": the fused Pallas kernel (`vsampler.kernels.sampler`) behind the common input contract.

Variants of one kernel, each registered under the name `impl=` takes (`register_variant`): "pallas" (the
backend's: on TPU and in interpret mode a block of rows resident in VMEM, compiled by Mosaic with the
policy of `vsampler.kernels.block_sizes`, which picks `vsampler.kernels.sampler` where whole-row
temporaries fit and the chunked `vsampler.kernels.sampler_chunked` where they do not; on GPU the Triton
one), "pallas-chunked" (the chunked TPU kernel by name, to verify it off TPU) and "pallas-triton"
(`vsampler.kernels.sampler_triton`: one program per row over power-of-two chunks). On CPU they run in
Pallas interpret mode (for verification only: slow, but the same kernel code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vsampler.core import logprobs as lp
from vsampler.core import penalties, reference, registry
from vsampler.core.inputs import SamplerInputs
from vsampler.core.numerics import NEG_INF, inverse_temperature
from vsampler.kernels import block_sizes, sampler_chunked, sampler_grouped, sampler_triton
from vsampler.kernels import sampler as kernel
from vsampler.kernels.config import KernelConfig, pack_rows

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


def tpu_kernel(plan: block_sizes.BlockPlan) -> Callable[..., tuple[jax.Array, ...]]:
    """The TPU variant a block plan calls for: resident (`sampler.fused_sample`; its blocks taken
    `plan.group_for(depth)` a grid step by `sampler_grouped.fused_sample_grouped` where the call allows) or
    chunked (`sampler_chunked.fused_sample_chunked`, which also takes the plan's `chunk` and `buffers`)."""
    return sampler_grouped.fused_sample_grouped if plan.chunk is None else sampler_chunked.fused_sample_chunked


def tpu_generation() -> str | None:
    """The block-size generation of the default device, or None off TPU (interpret mode)."""
    if jax.default_backend() != "tpu":
        return None
    return _DEVICE_KINDS.get(jax.devices()[0].device_kind, "v5e")


# A variant's launcher: the kernel operands (`kernel_operands`) and the launch's `KernelConfig` ->
# (tokens (B,) int32, finished (B,) bool, stats (B, STAT_COLUMNS) float32[, top_x (B, n), top_ids (B, n)]);
# `generation`: the TPU block-size policy's (None: interpret mode or the device's).
Launcher = Callable[..., tuple[jax.Array, ...]]
_LAUNCHERS: dict[str, Launcher] = {}


def launch(
    inp: SamplerInputs,
    *,
    finished: jax.Array | None = None,
    pad_token_id: int = 0,
    generation: str | None = None,
    interpret: bool | None = None,
    variant: str | None = None,
    top_n: int | None = None,
    logprobs_mode: str = "raw",
) -> tuple[jax.Array, ...]:
    """Runs the kernel: (tokens (B,) int32, finished (B,) bool, stats (B, STAT_COLUMNS) float32), plus
    (top_x (B, n) float32, top_ids (B, n) int32) when `top_n` is given (None: no log-prob values); with
    `top_n`, stats also hold the token's rank counted in `logprobs_mode`'s distribution.

    `finished` rows emit `pad_token_id`; a row whose token is one of `inp.eos_ids` comes back finished.
    `generation` picks the TPU block-size policy (default: the device's); `variant` is a registered
    variant's name (default "pallas": the Triton kernel on GPU, the TPU one elsewhere); `interpret`
    defaults to "on neither TPU nor GPU".
    """
    variant = variant or "pallas"
    if variant not in _LAUNCHERS:
        raise ValueError(f"variant must be one of {tuple(_LAUNCHERS)}, got {variant!r}")
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu")
    x, rows, eos, allowed, config = kernel_operands(inp, finished)
    config = config.replace(top_n=top_n, logprobs_mode=logprobs_mode, pad_id=pad_token_id)
    return _LAUNCHERS[variant](x, rows, eos, allowed, config=config, interpret=interpret, generation=generation)


def _launch_triton(x, rows, eos, allowed, *, config: KernelConfig, interpret: bool, generation: str | None):
    """The GPU variant: one program per row over power-of-two chunks (`sampler_triton`)."""
    width = 1 << (eos.shape[0] - 1).bit_length()  # Triton arrays: power-of-two shapes
    eos = jnp.pad(eos.astype(jnp.int32), (0, width - eos.shape[0]), constant_values=-1)
    tokens, new_finished, stats, *top = sampler_triton.fused_sample_triton(
        x, rows, eos, allowed, config=config, plan=block_sizes.gpu_plan(x.shape[1]), interpret=interpret
    )
    return (tokens[:, 0], new_finished[:, 0] > 0, stats, *(t[:, : config.top_n] for t in top))


def _tpu_launcher(chunked: bool) -> Launcher:
    """The TPU variants: a row block resident in VMEM, whole-row passes or (`chunked`, or where the
    policy says whole-row temporaries do not fit) passes over chunks."""

    def launch_tpu(x, rows, eos, allowed, *, config: KernelConfig, interpret: bool, generation: str | None):
        if generation is None and not interpret:
            generation = tpu_generation()
        batch, vocab = x.shape
        plan = block_sizes.plan(
            batch, vocab, x.dtype, None if interpret else generation, allowed is not None, chunked=chunked
        )
        tokens, new_finished, stats, *top = tpu_launch(plan, x, rows, eos, allowed, config=config, interpret=interpret)
        return (tokens[:batch, 0], new_finished[:batch, 0] > 0, stats[:batch], *(t[:batch] for t in top))

    return launch_tpu


_launch_tpu_resident = _tpu_launcher(chunked=False)


def _launch_backend(x, rows, eos, allowed, **kw):
    """The "pallas" variant: the backend's (Triton on GPU; the TPU kernel on TPU and in interpret mode)."""
    launcher = _launch_triton if jax.default_backend() == "gpu" else _launch_tpu_resident
    return launcher(x, rows, eos, allowed, **kw)


def kernel_operands(
    inp: SamplerInputs, finished: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, KernelConfig]:
    """What every kernel variant takes: the penalised logits (B, V), the packed per-row parameters
    (B, ROW_COLUMNS), the EOS ids (E,) int32 (-1: none), the packed mask words or None, and the
    `KernelConfig` of the stages the inputs need (no log-prob entries, pad id 0: the launch sets those)."""
    x = penalties.penalised_logits(inp, eos_mask=False)  # the kernels apply the min_tokens EOS mask
    eos = inp.eos_ids if inp.eos_ids is not None else jnp.full((1,), -1, jnp.int32)
    config = KernelConfig(
        top_k=inp.stages.top_k,
        top_p=inp.stages.top_p,
        min_p=inp.stages.min_p,
        random=inp.stages.random,
        min_tokens=penalties.masks_eos(inp),
    )
    return x, _packed_rows(inp, finished), eos, inp.allowed, config


def tpu_launch(
    plan: block_sizes.BlockPlan,
    x: jax.Array,
    rows: jax.Array,
    eos: jax.Array,
    allowed: jax.Array | None,
    *,
    config: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, ...]:
    """One launch of the TPU variant `plan` calls for, on `kernel_operands`' arrays with the batch padded
    to the plan's blocks: its outputs for the padded batch (statistics: one row per padded row)."""
    pad = plan.padded_batch - x.shape[0]
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        allowed = None if allowed is None else jnp.pad(allowed, ((0, pad), (0, 0)))
    return tpu_kernel(plan)(
        x, rows, eos.reshape(1, -1).astype(jnp.int32), allowed, config=config, plan=plan, interpret=interpret
    )


def _packed_rows(inp: SamplerInputs, finished: jax.Array | None) -> jax.Array:
    """The per-row parameters as the kernels read them: (B, ROW_COLUMNS) float32 (`ROW_FIELDS`)."""
    p = inp.params
    batch = p.temperature.shape[0]
    u = inp.u if inp.u is not None else jnp.zeros((batch,), jnp.float32)
    done = jnp.zeros((batch,), jnp.float32) if finished is None else finished.astype(jnp.float32)
    early = penalties.too_early_for_eos(inp).astype(jnp.float32) if penalties.masks_eos(inp) else jnp.zeros_like(u)
    empty = jnp.broadcast_to(jnp.asarray(inp.empty_token, jnp.float32), (batch,))
    return pack_rows(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        u=u,
        finished=done,
        eos_too_early=early,
        empty_token=empty,
    )


def sample(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The token per row, `(B,)` int32, from one kernel launch."""
    return launch(inp, variant=variant)[0]


def row_values(request: lp.LogprobsRequest, outputs: tuple) -> lp.RowValues:
    """The kernel's per-row outputs (a launch with `request`'s log-prob keywords) as
    `vsampler.core.logprobs.RowValues`."""
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
        rank=stats[:, kernel.RANK].astype(jnp.int32),  # counted in the kernel, in `request.mode`
        x_max=stats[:, kernel.X_MAX],
    )


def finish_logprobs(inp: SamplerInputs, request: lp.LogprobsRequest, outputs: tuple, tokens: jax.Array) -> lp.LogProbs:
    """The log-probabilities from one launch's outputs (`tokens`: before the pad of finished rows)."""
    min_p = inp.params.min_p if inp.stages.min_p else None
    return lp.from_row_values(row_values(request, outputs), tokens, inp.params.temperature, min_p, request)


def _logprob_outputs(request: lp.LogprobsRequest | None) -> dict[str, object]:
    """`launch`'s log-prob keywords for `request` (None: no log-prob outputs)."""
    return {} if request is None else {"top_n": request.n, "logprobs_mode": request.mode}


def sample_with_logprobs(
    inp: SamplerInputs, request: lp.LogprobsRequest | None, variant: str | None = None
) -> tuple[jax.Array, lp.LogProbs | None]:
    """The token per row and, when asked, its log-probabilities, from one kernel launch."""
    outputs = launch(inp, variant=variant, **_logprob_outputs(request))
    if request is None:
        return outputs[0], None
    return outputs[0], finish_logprobs(inp, request, outputs, outputs[0])


def process_logits(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The warped logits rebuilt from the kernel's per-row values (threshold, maximum, token)."""
    tokens, _, stats = launch(inp, variant=variant)
    x = reference.penalised_logits(inp)  # stages 0-5
    p = inp.params
    greedy = (p.temperature == 0.0)[:, None]
    s = x * inverse_temperature(p.temperature, jnp.max(x, axis=1))[:, None]
    kept = (s > NEG_INF) & (s >= stats[:, kernel.THRESHOLD : kernel.THRESHOLD + 1])
    if inp.stages.min_p:
        kept &= jnp.exp(s - stats[:, kernel.S_MAX : kernel.S_MAX + 1]) >= p.min_p[:, None]
    only_token = (jnp.arange(x.shape[1])[None, :] == tokens[:, None]) & (x > NEG_INF)
    kept = jnp.where(greedy, only_token, kept)
    return jnp.where(kept, s, NEG_INF)


def step(
    inp: SamplerInputs,
    finished: jax.Array,
    pad_token_id: int,
    request: lp.LogprobsRequest | None,
    variant: str | None = None,
) -> tuple[jax.Array, ...]:
    """The fused decode step (`vsampler.core.sampling.sample_step`'s contract): spec stage 8 inside the
    one launch; log-probs of finished rows as `vsampler.core.logprobs.for_finished_rows` says."""
    outputs = launch(
        inp,
        finished=finished,
        pad_token_id=pad_token_id,
        variant=variant,
        **_logprob_outputs(request),
    )
    tokens, new_finished = outputs[0], outputs[1]
    if request is None:
        return tokens, new_finished
    values = finish_logprobs(inp, request, outputs, tokens)  # finished rows: replaced below
    return tokens, new_finished, lp.for_finished_rows(values, finished, pad_token_id)


def register_variant(name: str, launcher: Launcher, description: str, *, auto_backends: tuple[str, ...] = ()) -> None:
    """Registers a kernel variant under `name` (what `impl=` and `launch(variant=)` take): its launcher
    (`Launcher`), and the implementation in `vsampler.core.registry` (sampling, warped logits and the
    fused step through `launch`). A new variant is its kernel module and one call of this."""
    _LAUNCHERS[name] = launcher
    registry.register(
        registry.Implementation(
            name=name,
            sample=functools.partial(sample_with_logprobs, variant=name),
            process_logits=functools.partial(process_logits, variant=name),
            step=functools.partial(step, variant=name),
            description=description,
            kernel=True,
            per_row_stop_ids=False,  # one set of EOS ids per launch
            auto_backends=auto_backends,
        )
    )


def unregister_variant(name: str) -> None:
    """Removes a variant `register_variant` added (a test's)."""
    registry.unregister(name)
    del _LAUNCHERS[name]


register_variant(
    "pallas",
    _launch_backend,
    "the fused Pallas kernel, one launch per call (TPU Mosaic; Triton on GPU; interpret mode on CPU)",
    auto_backends=("tpu",),
)
register_variant(
    "pallas-chunked",
    _tpu_launcher(chunked=True),
    "the fused kernel's chunked TPU variant by name (passes over 4096-lane chunks)",
)
register_variant(
    "pallas-triton", _launch_triton, "the fused kernel's GPU (Triton) variant by name: one program per row"
)
