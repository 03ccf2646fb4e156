"""`vsampler compile-check`: the kernel compiled for TPU generations without a TPU (and lowered to
Triton), with --estimate its time per call by libtpu's static cost model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vsampler.tools.cli.arguments import choice_list, int_list
from vsampler.tools.cli.ui import (
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_USAGE,
    environment,
    ui_for_output,
)


def _run_estimate(args: argparse.Namespace) -> int:
    import itertools

    from vsampler.tools import estimate

    batches = args.batch or ((8,) if args.quick else (64,))
    vocabs = args.vocab or ((32000, 128256) if args.quick else (128256,))
    dtypes = args.dtype or ("float32", "bfloat16")
    cases = [
        estimate.EstimateCase(gen, batch, vocab, dtype, config)
        for gen, config, vocab, batch, dtype in itertools.product(args.tpu, args.configs, vocabs, batches, dtypes)
    ]
    ui = ui_for_output()
    ui.header("vsampler compile-check --estimate", {**environment(), "libtpu": str(estimate.libtpu_version())})
    try:
        with ui.progress(len(cases), "estimating") as advance:
            results = estimate.estimate_grid(cases, breakdown=args.breakdown, progress=advance)
    except estimate.TpuEstimateUnavailable as err:
        print(f"vsampler compile-check: {err}", file=sys.stderr)
        return EXIT_USAGE
    ui.rows(*estimate.table(results))
    if args.breakdown:
        for r in results:
            if r.ok:
                ui.note(f"where the cycles go: {r.case.label}")
                ui.rows(*estimate.breakdown_table(r))
    for line in estimate.notes(results):
        ui.note(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "estimates": [r.as_dict() for r in results]}, f, indent=2)
        ui.note(f"estimates written to {args.json}")
    modelled = [r for r in results if r.case.generation not in estimate.UNMODELLED]
    return EXIT_MISMATCH if any(not r.ok for r in modelled) else EXIT_OK


def run(args: argparse.Namespace) -> int:
    import itertools

    from vsampler.kernels import block_sizes
    from vsampler.tools import compile_check
    from vsampler.tools.estimate import significant

    if args.estimate:
        return _run_estimate(args)
    batches = args.batch or ((8,) if args.quick else (1, 8, 64, 256))
    vocabs = args.vocab or ((32000, 128256) if args.quick else (1000, 32000, 50257, 128256, 152064, 256000))
    dtypes = args.dtype or ("float32", "bfloat16")
    try:
        compile_check.tpu_device(args.tpu[0])
    except compile_check.TpuCompilerUnavailable as err:
        print(f"vsampler compile-check: {err}", file=sys.stderr)
        return EXIT_USAGE
    configs = list(itertools.product(args.tpu, vocabs, dtypes, batches))
    ui = ui_for_output()
    ui.header("vsampler compile-check", environment())
    rows, failures, unclaimed = [], 0, 0
    mib = 1 << 20
    with ui.progress(len(configs), "compiling") as advance:
        for gen, vocab, dtype, batch in configs:
            r = compile_check.compile_tpu(gen, batch, vocab, dtype)
            label = [gen, str(batch), str(vocab), dtype]
            if r.ok:
                bw = block_sizes.TPU_GENERATIONS[gen].hbm_bytes_per_s
                variant = (
                    "resident" if r.chunk is None else f"chunked ({r.buffers} {'copy' if r.buffers == 1 else 'copies'})"
                )
                rows.append(
                    [
                        *label,
                        "compiled",
                        variant,
                        f"{r.vmem_used_bytes / mib:.1f} / {r.vmem_limit_bytes / mib:.0f}",
                        f"{r.hbm_bytes / r.logits_bytes:.3f}x of {significant(r.logits_bytes / mib)} MiB",
                        f"~{significant(r.estimated_seconds() * 1e6)} us "
                        f"(floor ~{significant(r.logits_bytes / bw * 1e6)} us)",
                    ]
                )
            elif r.block_rows == 0:  # refused by the policy: not a claimed configuration
                unclaimed += 1
                rows.append([*label, "not claimed", "", r.error.split(") needs ")[-1], "", ""])
            else:
                failures += 1
                rows.append([*label, "FAILED", "", r.error, "", ""])
            advance(f"{gen} B={batch} V={vocab} {dtype}")
    ui.rows(
        [
            "gen",
            "B",
            "V",
            "dtype",
            "result",
            "variant",
            "VMEM used / limit (MiB)",
            "HBM moved per call",
            "implied time (estimate)",
        ],
        rows,
    )
    ui.note(
        f"{len(configs)} configurations: {len(configs) - failures - unclaimed} compiled, {failures} failed, "
        f"{unclaimed} not claimed (over the generation's VMEM even chunked); "
        f"{sum(row[5].startswith('chunked') for row in rows)} use the chunked variant (whole-row temporaries "
        "would not fit)"
    )
    if args.gpu:
        gpu_rows = []
        for vocab, dtype, batch in itertools.product(vocabs, dtypes, batches):
            r = compile_check.lower_triton(batch, vocab, dtype)
            failures += not r.ok
            gpu_rows.append(
                [
                    "cuda",
                    str(batch),
                    str(vocab),
                    dtype,
                    "lowered" if r.ok else "FAILED",
                    f"chunk {r.chunk}, {r.num_warps} warps",
                    r.error,
                ]
            )
        ui.rows(["target", "B", "V", "dtype", "Triton lowering", "plan", "error"], gpu_rows)
        ui.note(
            f"GPU: {sum(row[4] == 'lowered' for row in gpu_rows)}/{len(gpu_rows)} configurations lowered to "
            "Triton (the Triton-to-PTX compile happens on the GPU, at first run)"
        )
    return EXIT_MISMATCH if failures else EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `vsampler compile-check` and its arguments to the subparsers `sub`."""
    from vsampler.tools import workloads

    cc = sub.add_parser(
        "compile-check",
        help="compile the fused kernel for TPU generations without a TPU (needs the tpu extra)",
        description=(
            "Compiles every kernel configuration of the grid for each named TPU generation through "
            "libtpu's deviceless AOT (the whole Mosaic + XLA:TPU compiler; pip install 'vsampler[tpu]'). "
            "Per configuration: compiled, or the compiler's own error; the VMEM the executable uses against "
            "the limit the block-size policy set; the HBM bytes one call moves against one read of the "
            "logits, and the time that implies at the generation's HBM bandwidth (an estimate, not a "
            "measurement). Configurations the policy does not claim (too large for the generation's VMEM) "
            "are listed as such. Exits 1 if a claimed configuration fails to compile."
        ),
    )
    cc.add_argument(
        "--tpu",
        type=choice_list(("v4", "v5e", "v5p", "v6e")),
        default=("v4", "v5e", "v5p", "v6e"),
        help="comma-separated TPU generations (default v4,v5e,v5p,v6e)",
    )
    cc.add_argument(
        "--gpu",
        action="store_true",
        help="also lower the kernel's GPU (Triton) variant for CUDA through jax.export (no GPU needed)",
    )
    cc.add_argument(
        "--estimate",
        action="store_true",
        help=(
            "instead of the compile table: the kernel's time per call by libtpu's static cost model "
            "(deviceless; data-dependent loops counted from trips measured in interpret mode) against the "
            "HBM floor, per workload config (default grid: B=64, V=128256)"
        ),
    )
    cc.add_argument(
        "--configs",
        type=choice_list((*workloads.CONFIGS, *workloads.PEER_CONFIGS)),
        default=tuple(workloads.CONFIGS),
        help=(
            f"with --estimate: workload configs (default {','.join(workloads.CONFIGS)}; also "
            f"{', '.join(f'{k}: {v}' for k, v in workloads.PEER_CONFIGS.items())})"
        ),
    )
    cc.add_argument(
        "--breakdown",
        action="store_true",
        help="with --estimate: also where the cycles go, per data-dependent loop and per stage (more compiles)",
    )
    cc.add_argument("--json", metavar="PATH", help="with --estimate: also write the estimates as JSON to PATH")
    cc.add_argument("--quick", action="store_true", help="B=8, V in {32000, 128256}")
    cc.add_argument("--batch", type=int_list, default=None, help="batch sizes (default 1,8,64,256; with --estimate 64)")
    cc.add_argument(
        "--vocab",
        type=int_list,
        default=None,
        help="vocabulary sizes (default 1000,32000,50257,128256,152064,256000; with --estimate 128256)",
    )
    cc.add_argument(
        "--dtype",
        type=choice_list(("float32", "bfloat16")),
        default=None,
        help="logits dtypes (default float32,bfloat16)",
    )
    return cc
