"""The one script to run where a GPU is lent (jax with CUDA, nothing installable, run from the checkout):

    PYTHONPATH=. python bench/gpu_check.py            # on the GPU machine
    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/gpu_check.py --dry   # a tiny rehearsal here

1. The kernel's Triton variant, compiled for the GPU, against the reference on a verification grid:
   kept sets and tokens for the same keys (`vsampler.tools.verification.check`).
2. Median timings of pallas (Triton), xla and the reference at B=64, V=128256 (float32 and bfloat16)
   on the bench workloads, with the ratios, measured in this one run.
"""

from __future__ import annotations

import argparse
import sys

import jax

from vsampler.tools import sampler_benchmark as benchmarking
from vsampler.tools import verification, workloads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes, any backend: rehearse the script")
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"jax {jax.__version__}, backend {backend}, device {jax.devices()[0].device_kind}")
    if backend != "gpu" and not args.dry:
        print("no GPU here: run with --dry to rehearse", file=sys.stderr)
        return 2
    impl = "pallas" if backend == "gpu" else "pallas-triton"
    batches, vocabs = ((3,), (1000,)) if args.dry else ((1, 8, 64), (32000, 50257, 128256, 256000))
    failures = 0
    for case in verification.grid(batches, vocabs, ("float32", "bfloat16"), ("combined", "heterogeneous")):
        result = verification.check(impl, case)
        failures += not result.ok
        print(
            f"verify {impl:14s} {case.label:48s} kept={result.kept_equal} values={result.values_equal} "
            f"tokens={result.agreeing_rows}/{case.batch}"
        )
    shape = (3, 1000) if args.dry else (64, 128256)
    for dtype in ("float32", "bfloat16"):
        for config in workloads.CONFIGS:
            w = workloads.Workload(config, shape[0], shape[1], dtype)
            inp = workloads.make_inputs(w)
            times = {
                name: benchmarking.time_call(
                    lambda n=name, inp=inp: benchmarking.impl_runner(n)(inp), 3 if args.dry else 10
                )
                for name in (impl, "xla", "reference")
            }
            floor = benchmarking.time_call(lambda inp=inp: benchmarking.floor_runner(inp), 10)
            print(
                f"time {w.label:40s} "
                + " ".join(f"{n}={t * 1e3:.3f}ms" for n, t in times.items())
                + f" floor={floor * 1e3:.3f}ms pallas/xla={times[impl] / times['xla']:.2f}"
                + f" reference/pallas={times['reference'] / times[impl]:.1f}"
            )
    print(f"{failures} verification failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
