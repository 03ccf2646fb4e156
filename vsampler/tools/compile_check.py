"""Compiling the fused kernel for TPU without a TPU: libtpu's deviceless AOT (the `tpu` extra).

`compile_tpu(...)` lowers and compiles the kernel for one configuration on a TPU topology description
(`jax.experimental.topologies`), through the whole Mosaic + XLA:TPU compiler, and reports what the
executable says about its memory; the compiler's own error when it refuses. `estimate_tpu(...)`: its
time per call by libtpu's static cost model (`vsampler.tools.estimate`). Used by the tests and by
`vsampler compile-check [--estimate]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # the compilation-cache switch as a context (no public one)

from vsampler.core.inputs import allowed_words
from vsampler.core.trips import FixedTrips
from vsampler.impls import pallas as pallas_impl
from vsampler.kernels import block_sizes
from vsampler.kernels.config import ROW_COLUMNS, KernelConfig


class TpuCompilerUnavailable(RuntimeError):
    """libtpu (the `tpu` extra: pip install 'vsampler[tpu]') is not installed or not usable."""


@dataclasses.dataclass
class CompileResult:
    generation: str
    batch: int
    vocab: int
    dtype: str
    ok: bool
    error: str = ""
    block_rows: int = 0
    chunk: int | None = None  # None: the resident variant; else the chunked variant's slice width
    buffers: int = 2
    vmem_limit_bytes: int = 0
    working_set_bytes: int = 0  # the policy's estimate
    vmem_used_bytes: int = 0  # scoped VMEM the compiled kernel uses, read from the executable
    argument_bytes: int = 0  # HBM bytes the call reads (logits + parameters)
    output_bytes: int = 0
    logits_bytes: int = 0  # one read of the logits: the physical floor

    @property
    def hbm_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes

    def estimated_seconds(self) -> float:
        """HBM bytes moved / the generation's bandwidth: an estimate, not a measurement."""
        return self.hbm_bytes / block_sizes.TPU_GENERATIONS[self.generation].hbm_bytes_per_s


# libtpu's sentence where a kernel needs more scoped VMEM than its limit (its error's first line is generic)
SCOPED_VMEM_EXCEEDED = re.compile(r"Scoped allocation with size ([\d.]+)M and limit ([\d.]+)M exceeded scoped vmem")
_USED_VMEM = re.compile(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"\d+","size":"(\d+)"')


def vmem_used(hlo_text: str) -> int:
    """The largest scoped VMEM allocation any op of a compiled TPU executable uses (the kernel's)."""
    return max((int(size) for size in _USED_VMEM.findall(hlo_text)), default=0)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Sends this process's file descriptor 2 to a temporary file while the block runs (libtpu writes
    its start-up warnings there from C++, past `sys.stderr`); yields a function returning what was
    written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield lambda: (captured.seek(0), captured.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@functools.cache
def tpu_device(generation: str) -> jax.Device:
    """A device of `generation`'s topology, described without a TPU. libtpu's start-up noise (it looks
    for the TPU metadata a TPU VM has: accelerator type, worker host names) is kept off stderr; where
    the description fails, it is part of the error."""
    # deviceless compilation touches no TPU: it need not hold libtpu's one-process-per-host lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _stderr_captured() as written:
        try:
            from jax.experimental import topologies

            topology = topologies.get_topology_desc(platform="tpu", topology_name=block_sizes.TOPOLOGIES[generation])
        except Exception as err:
            raise TpuCompilerUnavailable(
                f"cannot describe a {generation} TPU without libtpu: install the tpu extra "
                f"(pip install 'vsampler[tpu]'); the error was: {err}; libtpu wrote: {written().strip() or '-'}"
            ) from err
    return topology.devices[0]


def compile_tpu(
    generation: str,
    batch: int,
    vocab: int,
    dtype: str = "float32",
    *,
    top_k: bool = True,
    top_p: bool = True,
    min_p: bool = True,
    random: bool = True,
    min_tokens: bool = True,
    allowed: bool = False,
    top_n: int | None = None,
    trips: FixedTrips | None = None,
    vmem_limit_bytes: int | None = None,
) -> CompileResult:
    """Compiles the kernel (all stages on by default) for one configuration on `generation`;
    `allowed`: with the allowed-token mask input; `top_n`: with the log-prob outputs; `trips`: with the
    data-dependent loops at fixed trip counts (for the static estimate, `vsampler.tools.estimate`);
    `vmem_limit_bytes`: the kernel's scoped-VMEM limit in place of the block-size policy's (the
    estimate's profiled compiles, `estimate.profile_vmem_limit`)."""
    result = CompileResult(generation, batch, vocab, dtype, ok=False)
    try:
        plan = block_sizes.plan(batch, vocab, dtype, generation, allowed)
    except ValueError as err:
        result.error = str(err)
        return result
    if vmem_limit_bytes is not None:
        plan = dataclasses.replace(plan, vmem_limit_bytes=vmem_limit_bytes)
    result.block_rows, result.working_set_bytes = plan.block_rows, plan.working_set_bytes
    result.chunk, result.buffers = plan.chunk, plan.buffers
    result.vmem_limit_bytes = plan.vmem_limit_bytes or 0
    device = tpu_device(generation)
    sharding = jax.sharding.SingleDeviceSharding(device)
    batch_p = plan.padded_batch
    args = (
        jax.ShapeDtypeStruct((batch_p, vocab), jnp.dtype(dtype), sharding=sharding),
        jax.ShapeDtypeStruct((batch_p, ROW_COLUMNS), jnp.float32, sharding=sharding),
        jax.ShapeDtypeStruct((1, 2), jnp.int32, sharding=sharding),
    )
    if allowed:
        args += (jax.ShapeDtypeStruct((batch_p, allowed_words(vocab)), jnp.int32, sharding=sharding),)
    config = KernelConfig(
        top_k=top_k, top_p=top_p, min_p=min_p, random=random, min_tokens=min_tokens, top_n=top_n, trips=trips
    )
    fn = functools.partial(pallas_impl.tpu_kernel(plan), config=config, plan=plan, interpret=False)
    try:
        # Mosaic asks the default device which chip it lowers for: make it the described TPU. The
        # persistent compilation cache stays out of it: a deviceless compile has no client to load a
        # cached TPU executable with, and jax warns on every read of the entry its last run wrote
        with jax.default_device(device), jax_config.enable_compilation_cache(False):
            compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    except Exception as err:
        text = str(err).strip()
        scoped = SCOPED_VMEM_EXCEEDED.search(text)
        result.error = (text.splitlines()[0] + (f" {scoped.group(0)}" if scoped else ""))[:500]
        return result
    stats = compiled.memory_analysis()
    result.vmem_used_bytes = vmem_used(compiled.as_text())
    result.ok = True
    result.argument_bytes = int(stats.argument_size_in_bytes)
    result.output_bytes = int(stats.output_size_in_bytes)
    result.logits_bytes = batch * vocab * jnp.dtype(dtype).itemsize
    return result


@dataclasses.dataclass
class TritonLowering:
    batch: int
    vocab: int
    dtype: str
    ok: bool
    error: str = ""
    chunk: int = 0
    num_warps: int = 0
    kernels: int = 0  # Triton custom calls in the exported module


def lower_triton(
    batch: int, vocab: int, dtype: str = "float32", *, allowed: bool = False, top_n: int | None = None
) -> TritonLowering:
    """Lowers the kernel's GPU variant to Triton for CUDA with `jax.export`, without a GPU (the Triton
    custom call's compatibility check is disabled: only the lowering is being checked); `allowed` and
    `top_n` as in `compile_tpu`."""
    from jax import export

    from vsampler.kernels import sampler_triton

    plan = block_sizes.gpu_plan(vocab)
    result = TritonLowering(batch, vocab, dtype, ok=False, chunk=plan.chunk, num_warps=plan.num_warps)
    config = KernelConfig(top_k=True, top_p=True, min_p=True, random=True, min_tokens=True, top_n=top_n)
    fn = functools.partial(sampler_triton.fused_sample_triton, config=config, plan=plan, interpret=False)
    args = (
        jax.ShapeDtypeStruct((batch, vocab), jnp.dtype(dtype)),
        jax.ShapeDtypeStruct((batch, ROW_COLUMNS), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    if allowed:
        args += (jax.ShapeDtypeStruct((batch, allowed_words(vocab)), jnp.int32),)
    try:
        exported = export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    except Exception as err:
        result.error = str(err).strip().splitlines()[0][:500]
        return result
    result.kernels = exported.mlir_module().count("__gpu$xla.gpu.triton")
    result.ok = result.kernels > 0
    if not result.ok:
        result.error = "the exported module holds no Triton kernel"
    return result


def estimate_tpu(
    generation: str,
    batch: int,
    vocab: int,
    dtype: str = "float32",
    config: str = "full",
    *,
    allowed: bool = False,
    top_n: int | None = None,
    breakdown: bool = False,
) -> Any:
    """The kernel's time per call on `generation` for a workload config (`vsampler.tools.workloads`), by
    libtpu's static cost model with the data-dependent loops counted: a `vsampler.tools.estimate.KernelEstimate`
    (static estimate, not measured on a TPU; `vsampler.tools.estimate` says how). Starts a compile worker."""
    from vsampler.tools import estimate

    case = estimate.EstimateCase(generation, batch, vocab, dtype, config, allowed, top_n)
    return estimate.estimate_grid([case], breakdown=breakdown)[0]
