"""How libtpu's static cost model charges a kernel's logits copies (no TPU needed; the `tpu` extra).

Probe kernels over B=64 x V=128256 logits in (16, V) blocks, each doing `--chains` max / min chains a
vreg over its block (0: one vreg read), compiled deviceless for v5e with the static profile on
(`vsampler.tools.estimate`'s flag), one line of cycles each:

- `pallas`: Pallas's own pipeline (a BlockSpec over the grid), as the sampler's kernels copy their blocks;
- `manual`: `pltpu.make_async_copy` into two VMEM slots, the next block's copy started before this
  block's compute, the blocks taken in pairs so each slot is static;
- `serial`: each block's copy awaited before its compute (no overlap at all);
- `dynamic_slot`: `manual` written with the slot as `i % 2` and the next copy started under
  `pl.when(i + 1 < blocks)`, which the model takes as not taken: it charges half the copies.

    python bench/tpu_dma_probe.py [--chains 0,3] [--dtype float32]

README (How the figure is obtained) has the figures this printed on 2026-12-07.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"  # no TPU probe: the compiles are deviceless

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import config as jax_config
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vsampler.tools.compile_check import tpu_device
from vsampler.tools.estimate import PROFILE_FLAG, read_static_profile

# libtpu reads its flags when the first TPU topology is described (`tpu_device`), not when jax loads
PROFILE_DIR = tempfile.mkdtemp(prefix="vsampler-dma-probe-")
os.environ["LIBTPU_INIT_ARGS"] = f"{PROFILE_FLAG}={PROFILE_DIR}"

ROWS, VOCAB, BATCH, LANES = 16, 128256, 64, 128
BLOCKS = BATCH // ROWS
VMEM_LIMIT = 100 << 20


def chains(block_ref, count: int) -> jax.Array:
    """`count` max / min chains a vreg over the (ROWS, VOCAB) block; 0: one vreg read."""
    if count == 0:
        return block_ref[:, :LANES].astype(jnp.float32)

    def body(j, acc):
        hi, lo = acc
        x = block_ref[:, pl.ds(pl.multiple_of(j * LANES, LANES), LANES)].astype(jnp.float32)
        for _ in range(count):
            hi, lo, x = jnp.maximum(hi, x), jnp.minimum(lo, x), x * 1.0001
        return hi, lo

    start = (jnp.full((ROWS, LANES), -jnp.inf), jnp.full((ROWS, LANES), jnp.inf))
    hi, lo = lax.fori_loop(0, VOCAB // LANES, body, start, unroll=8)
    return hi + lo


def _out() -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((BATCH, LANES), jnp.float32)


def pallas(count: int, dtype) -> Callable:
    def kernel(x_ref, o_ref):
        o_ref[...] = chains(x_ref, count)

    return pl.pallas_call(
        kernel,
        grid=(BLOCKS,),
        in_specs=[pl.BlockSpec((ROWS, VOCAB), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((ROWS, LANES), lambda i: (i, 0)),
        out_shape=_out(),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=VMEM_LIMIT),
    )


def _hand_copied(count: int, dtype, body: Callable) -> Callable:
    """A one-step kernel that copies the blocks itself (`body(copy, compute)` orders them)."""

    def kernel(x_hbm, o_ref, buffers, semaphores):
        def copy(i, slot):
            return pltpu.make_async_copy(x_hbm.at[pl.ds(i * ROWS, ROWS)], buffers.at[slot], semaphores.at[slot])

        def compute(i, slot):
            o_ref[pl.ds(pl.multiple_of(i * ROWS, ROWS), ROWS), :] = chains(buffers.at[slot], count)

        body(copy, compute)

    return pl.pallas_call(
        kernel,
        grid=(1,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((BATCH, LANES), lambda i: (0, 0)),
        out_shape=_out(),
        scratch_shapes=[pltpu.VMEM((2, ROWS, VOCAB), dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(vmem_limit_bytes=VMEM_LIMIT),
    )


def manual(count: int, dtype) -> Callable:
    def body(copy, compute):
        copy(0, 0).start()

        def block(i, slot):
            @pl.when(i + 1 < BLOCKS)
            def _():
                copy(i + 1, 1 - slot).start()

            copy(i, slot).wait()
            compute(i, slot)

        def pair(h, carry):
            block(2 * h, 0)
            block(2 * h + 1, 1)
            return carry

        lax.fori_loop(0, BLOCKS // 2, pair, 0)

    return _hand_copied(count, dtype, body)


def serial(count: int, dtype) -> Callable:
    def body(copy, compute):
        def block(i, carry):
            one = copy(i, 0)
            one.start()
            one.wait()
            compute(i, 0)
            return carry

        lax.fori_loop(0, BLOCKS, block, 0)

    return _hand_copied(count, dtype, body)


def dynamic_slot(count: int, dtype) -> Callable:
    def body(copy, compute):
        copy(0, 0).start()

        def block(i, carry):
            slot = i % 2

            @pl.when(i + 1 < BLOCKS)
            def _():
                copy(i + 1, 1 - slot).start()

            copy(i, slot).wait()
            compute(i, slot)
            return carry

        lax.fori_loop(0, BLOCKS, block, 0)

    return _hand_copied(count, dtype, body)


def cycles(make: Callable, count: int, dtype) -> int:
    for path in Path(PROFILE_DIR).glob("*"):
        path.unlink()
    device = tpu_device("v5e")
    arg = jax.ShapeDtypeStruct((BATCH, VOCAB), dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    with jax.default_device(device), jax_config.enable_compilation_cache(False):
        jax.jit(make(count, dtype)).trace(arg).lower(lowering_platforms=("tpu",)).compile()
    return sum(read_static_profile(PROFILE_DIR).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", default="0,3", help="max / min chains a vreg, comma-separated (default 0,3)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"v5e, B={BATCH}, V={VOCAB}, {dtype.name}, blocks of {ROWS} rows: estimated cycles")
    for make in (pallas, manual, serial, dynamic_slot):
        for count in (int(c) for c in args.chains.split(",")):
            print(f"{make.__name__:>13} chains {count}: {cycles(make, count, dtype):>8,}", flush=True)


if __name__ == "__main__":
    main()
