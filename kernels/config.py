"""What a kernel program is compiled for, as one frozen, hashable static argument (as jax's
`flash_attention.BlockSizes`), and the layout of the packed per-row parameter block every variant reads.

Every variant's launcher (`sampler.fused_sample`, `sampler_chunked.fused_sample_chunked`,
`sampler_triton.fused_sample_triton`) takes `config: KernelConfig` beside its block plan
(`block_sizes.BlockPlan` / `GpuPlan`), so a new stage flag is one field here, not a keyword repeated in
every launcher, its `static_argnames`, `vsampler.impls.pallas` and the compile check.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vsampler.core.trips import FixedTrips

# The packed per-row parameter block, (B, ROW_COLUMNS) float32: one column per name, in this order.
ROW_FIELDS = (
    "temperature",  # 0 = greedy
    "top_k",  # 0 = off (an integer, exact in float32 below 2**24)
    "top_p",
    "min_p",
    "u",  # the row's uniform for the draw
    "finished",  # 1: the row is done and emits the pad id
    "eos_too_early",  # 1: min_tokens not reached, the EOS ids are masked
    "empty_token",  # the token of a row with no finite value left
)
ROW_COLUMNS = len(ROW_FIELDS)
T, TOP_K, TOP_P, MIN_P, U, FINISHED, EOS_TOO_EARLY, EMPTY_TOKEN = range(ROW_COLUMNS)  # ROW_FIELDS' order


def pack_rows(**columns: jax.Array) -> jax.Array:
    """The (B, ROW_COLUMNS) float32 block from one (B,) array per name of `ROW_FIELDS` (all of them)."""
    missing = set(ROW_FIELDS) - set(columns)
    unknown = set(columns) - set(ROW_FIELDS)
    if missing or unknown:
        raise ValueError(f"pack_rows needs exactly {ROW_FIELDS}; missing {sorted(missing)}, unknown {sorted(unknown)}")
    return jnp.stack([jnp.asarray(columns[f], jnp.float32) for f in ROW_FIELDS], axis=1)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The static choices of one kernel program.

    top_k, top_p, min_p: the filters compiled in (a row turns one off with its own value: top_k 0, ...).
    random:      sampling compiled in (False: every row greedy).
    min_tokens:  the min_tokens EOS mask compiled in (each row's `eos_too_early` column says whether).
    top_n:       None: no log-prob outputs; else the top entries per row to return.
    logprobs_mode: with `top_n`, the distribution the sampled token's rank is counted in ("raw" or
                 "processed", `vsampler.core.logprobs`).
    pad_id:      what finished rows emit.
    trips:       the static estimate's fixed loop trips (`vsampler.core.trips`); None for a real launch.
    """

    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    random: bool = False
    min_tokens: bool = False
    top_n: int | None = None
    logprobs_mode: str = "raw"
    pad_id: int = 0
    trips: FixedTrips | None = None

    @property
    def filters(self) -> dict[str, bool]:
        """The filter flags by name (the kernels' stage helpers take them as keywords)."""
        return {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}

    def replace(self, **changes: object) -> KernelConfig:
        return dataclasses.replace(self, **changes)
