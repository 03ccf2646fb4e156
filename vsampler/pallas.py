"""impl="pallas": the fused Pallas kernel (`vsampler.kernels.sampler`) behind the common input contract.

Two variants of one kernel: "tpu" (`vsampler.kernels.sampler`: a block of rows resident in VMEM, compiled
by Mosaic with the policy of `vsampler.kernels.block_sizes`) and "triton" (`vsampler.kernels.sampler_triton`:
one program per row over power-of-two chunks). The backend picks the variant; on CPU both run in Pallas
interpret mode (for verification only: slow, but the same kernel code), the TPU variant by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsampler import penalties, reference
from vsampler.inputs import SamplerInputs
from vsampler.kernels import block_sizes, sampler_triton
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the kernel: (tokens (B,) int32, finished (B,) bool, stats (B, 4) float32).

    `finished` rows emit `pad_token_id`; a row whose token is one of `inp.eos_ids` comes back finished.
    `generation` picks the TPU block-size policy (default: the device's); `variant` is "tpu" or "triton"
    (default: "triton" on GPU, else "tpu"); `interpret` defaults to "on neither TPU nor GPU".
    """
    backend = jax.default_backend()
    variant = variant or ("triton" if backend == "gpu" else "tpu")
    if variant not in ("tpu", "triton"):
        raise ValueError(f"variant must be 'tpu' or 'triton', got {variant!r}")
    if interpret is None:
        interpret = backend not in ("tpu", "gpu")
    x = penalties.penalised_logits(inp, eos_mask=False)  # the kernels apply the min_tokens EOS mask
    batch, vocab = x.shape
    rows = _packed_rows(inp, finished)
    eos = inp.eos_ids if inp.eos_ids is not None else jnp.full((1,), -1, jnp.int32)
    stages = {
        "top_k": inp.stages.top_k,
        "top_p": inp.stages.top_p,
        "min_p": inp.stages.min_p,
        "random": inp.stages.random,
        "min_tokens": penalties.masks_eos(inp),
    }
    if variant == "triton":
        width = 1 << (eos.shape[0] - 1).bit_length()  # Triton arrays: power-of-two shapes
        eos = jnp.pad(eos.astype(jnp.int32), (0, width - eos.shape[0]), constant_values=-1)
        gpu = block_sizes.gpu_plan(vocab)
        tokens, new_finished, stats = sampler_triton.fused_sample_triton(
            x,
            rows,
            eos,
            pad_id=pad_token_id,
            chunk=gpu.chunk,
            num_warps=gpu.num_warps,
            interpret=interpret,
            **stages,
        )
        return tokens[:, 0], new_finished[:, 0] > 0, stats
    if generation is None and not interpret:
        generation = tpu_generation()
    plan = block_sizes.plan(batch, vocab, x.dtype, None if interpret else generation)
    pad = plan.padded_batch - batch
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
    tokens, new_finished, stats = kernel.fused_sample(
        x,
        rows,
        eos.reshape(1, -1).astype(jnp.int32),
        pad_id=pad_token_id,
        block_rows=plan.block_rows,
        vmem_limit_bytes=plan.vmem_limit_bytes,
        interpret=interpret,
        **stages,
    )
    return tokens[:batch, 0], new_finished[:batch, 0] > 0, stats[:batch]


def _packed_rows(inp: SamplerInputs, finished: jax.Array | None) -> jax.Array:
    """The per-row parameters as the kernels read them: (B, 8) float32, columns as in `kernel`."""
    p = inp.params
    batch = p.temperature.shape[0]
    u = inp.u if inp.u is not None else jnp.zeros((batch,), jnp.float32)
    done = jnp.zeros((batch,), jnp.float32) if finished is None else finished.astype(jnp.float32)
    early = penalties.too_early_for_eos(inp).astype(jnp.float32) if penalties.masks_eos(inp) else jnp.zeros_like(u)
    zeros = jnp.zeros((batch,), jnp.float32)
    return jnp.stack([p.temperature, p.top_k.astype(jnp.float32), p.top_p, p.min_p, u, done, early, zeros], axis=1)


def sample(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The token per row, `(B,)` int32, from one kernel launch."""
    return launch(inp, variant=variant)[0]


def process_logits(inp: SamplerInputs, variant: str | None = None) -> jax.Array:
    """The warped logits rebuilt from the kernel's per-row values (threshold, maximum, token)."""
    tokens, _, stats = launch(inp, variant=variant)
    x = reference.penalised_logits(inp)
    p = inp.params
    greedy = (p.temperature == 0.0)[:, None]
    s = x * (1.0 / jnp.where(greedy[:, 0], 1.0, p.temperature))[:, None]
    kept = (s > NEG_INF) & (s >= stats[:, kernel.THRESHOLD : kernel.THRESHOLD + 1])
    if inp.stages.min_p:
        kept &= jnp.exp(s - stats[:, kernel.S_MAX : kernel.S_MAX + 1]) >= p.min_p[:, None]
    only_token = (jnp.arange(x.shape[1])[None, :] == tokens[:, None]) & (x > NEG_INF)
    kept = jnp.where(greedy, only_token, kept)
    return jnp.where(kept, s, NEG_INF)
