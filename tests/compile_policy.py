"""How the test suite has XLA:CPU compile its programs: the same programs, compiled with less effort.

Most of the suite's time is XLA:CPU compiling small programs that then run for milliseconds (a grid
case at B=8, V=1000: about 10 CPU-seconds of compile, well under one of running). The compiler's own
options cut that without touching a program's HLO, so every test still runs the programs users run:

- `xla_cpu_use_fusion_emitters=false`: the fusions' code from XLA's elemental IR emitters instead of its
  MLIR fusion emitters, and `xla_cpu_parallel_codegen_split_count=1`: one LLVM module, not several
  compiled apart (less total CPU where both cores are already busy, as under `-n 2`). Everywhere:
  `XLA_FLAGS`, so the subprocesses the tests start (the CLI's, the x64 module's, the multi-host
  workers) get them too, with `xla_backend_optimization_level=1` (LLVM's light pipeline).
- Per program (`overrides`, installed in pytest's processes by `install`): LLVM without optimisation
  (`xla_backend_optimization_level=0`) for a program whose largest tensor holds fewer than
  `SMALL_ELEMENTS` values: at that size its code runs in milliseconds however it was optimised. A larger
  one (a serving-size grid case: a sort of 64 x 256000 values, three times slower unoptimised) keeps
  level 1 and takes XLA's fusion emitters back: there their code runs faster (the resident kernel's
  serving-size log-prob test, interpret mode: 26 s with the elemental emitters, 19 s with these, 21 s
  with XLA's defaults).

Measured on this 2-core machine (CPU seconds of one grid case's two programs, compile and run; noisy
by +-15%): B=8, V=1000, the resident kernel in interpret mode ~14 -> ~5; B=8, V=128256, bfloat16 ~20 ->
~9; B=64, V=256000, xla `top_p` ~17 -> ~17 (level 1: its run, not its compile, is the cost).

None of these options is a numeric one (no fast math: IEEE semantics, the same reductions in the same
order), and both sides of every comparison are compiled alike. What users compile, with XLA's defaults,
stays checked: `test_the_implementations_agree_with_the_reference_compiled_with_xlas_defaults` (every
fast implementation's `combined` grid case) and the README's examples (tests/tools/test_readme.py) run
in processes without the policy, as do `vsampler verify` and `vsampler bench` from a user's shell.
`VSAMPLER_TEST_COMPILE=default` (before pytest starts) leaves XLA's defaults everywhere.
"""

from __future__ import annotations

import math
import os

SMALL_ELEMENTS = 1 << 22  # 4,194,304 values: B=64 x V=50257 is below, B=64 x V=128256 above

FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_backend_optimization_level=1",
)


def enabled() -> bool:
    return os.environ.get("VSAMPLER_TEST_COMPILE", "") != "default"


def set_flags() -> None:
    """Adds `FLAGS` to `XLA_FLAGS` (before jax starts; a flag already given there is kept as given)."""
    if not enabled():
        return
    given = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in FLAGS if flag.split("=")[0] not in given]
    os.environ["XLA_FLAGS"] = " ".join([given, *missing]).strip()


def largest_tensor(module) -> int:
    """The most values any one tensor of an MLIR module holds (its operations' results, nested regions
    included)."""
    from jax._src.lib.mlir import ir

    largest = 0
    pending = [module.operation]
    while pending:
        op = pending.pop()
        for result in op.results:
            try:
                shape = ir.RankedTensorType(result.type).shape
            except ValueError:  # not a ranked tensor (a token, a tuple)
                continue
            if all(d >= 0 for d in shape):
                largest = max(largest, math.prod(shape))
        for region in op.regions:
            for block in region.blocks:
                pending.extend(block.operations)
    return largest


def overrides(platform: str, module) -> dict[str, int | bool]:
    """The compile-option overrides the policy adds to one CPU program: level 0 below `SMALL_ELEMENTS`;
    above it XLA's fusion emitters again (their code runs faster there); nothing for other platforms."""
    if platform != "cpu":
        return {}
    if largest_tensor(module) < SMALL_ELEMENTS:
        return {"xla_backend_optimization_level": 0}
    return {"xla_cpu_use_fusion_emitters": True}


def install() -> bool:
    """Applies `overrides` to every program this process compiles, by wrapping jax's
    `compile_or_get_cached` (a private function: where a jax version lacks it, nothing changes). They go
    into the program's compile options, so jax's persistent cache keys them apart; an option the caller
    set is kept. Whether it was installed now (False: disabled, unavailable, or installed before)."""
    if not enabled():
        return False
    try:
        from jax._src import compiler
    except ImportError:
        return False
    compile_or_get_cached = getattr(compiler, "compile_or_get_cached", None)
    if compile_or_get_cached is None or getattr(compile_or_get_cached, "_vsampler_policy", False):
        return False

    def with_the_policy(backend, computation, devices, compile_options, *args, **kwargs):
        added = overrides(getattr(backend, "platform", ""), computation)
        if added:
            compile_options.env_option_overrides = list({**added, **dict(compile_options.env_option_overrides)}.items())
        return compile_or_get_cached(backend, computation, devices, compile_options, *args, **kwargs)

    with_the_policy._vsampler_policy = True
    compiler.compile_or_get_cached = with_the_policy
    return True
