"""The `vsampler` command line: benchmark and verification reports, compile checks, a generation demo.

  vsampler bench [--quick] [--json PATH] ...   time every implementation and peer on the embedded grid,
                                              check each implementation's tokens against the reference
  vsampler verify [--impl xla|pallas|all] ...  the reference-vs-implementation grid and distribution check
  vsampler compile-check [--tpu v4,v5e,...]    compile the kernel for TPU generations without a TPU;
                        [--estimate]           with --estimate, its time per call by libtpu's static cost model
  vsampler generate [--prompt 5,6,7] ...       stream tokens from the tiny decoder through the decode loop

Exit codes: 0 success; 1 a verification failed; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vsampler.tools.cli import bench, compile_check, generate, verify
from vsampler.tools.cli.ui import EXIT_MISMATCH, EXIT_OK, EXIT_USAGE

COMMANDS = {"bench": bench, "verify": verify, "compile-check": compile_check, "generate": generate}
bench_cases = bench.bench_cases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsampler",
        description=(
            "vsampler: a fast, verified LLM token sampler for JAX. Benchmark and verification reports, "
            "TPU/GPU compile checks and a generation demo."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _skip_absent_tpu() -> None:
    """With libtpu installed (the tpu or test extra) but no TPU attached, JAX would probe for one at
    start-up, slowly and noisily: unless the user chose platforms, use the CPU (or a GPU plugin's)."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    gpu_plugins = [
        name
        for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin")
        if importlib.util.find_spec(name) is not None
    ]
    if not gpu_plugins:
        import jax  # imported already with the package; backends start later, on first use

        jax.config.update("jax_platforms", "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    _skip_absent_tpu()
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXIT_MISMATCH", "EXIT_OK", "EXIT_USAGE", "bench_cases", "build_parser", "main"]
