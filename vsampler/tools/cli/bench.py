"""`vsampler bench`: the verified benchmark report (the main job)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from vsampler.core import registry
from vsampler.tools.cli.arguments import choice_list, int_list
from vsampler.tools.cli.ui import (
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_USAGE,
    environment,
    ui_for_output,
    yes,
)


def bench_cases(args: argparse.Namespace) -> list[Any]:
    """The workloads `vsampler bench` times: the headline (each config at B=64, V=128256, float32) by
    default, the whole grid with --full, a short grid with --quick; --batch, --vocab, --dtype override."""
    from vsampler.tools import workloads

    if args.full:
        scope = (workloads.DEFAULT_BATCHES, workloads.DEFAULT_VOCABS, workloads.DEFAULT_DTYPES)
    elif args.quick:
        scope = ((1, 8), (32000,), ("float32",))
    else:
        scope = (workloads.HEADLINE_BATCHES, workloads.HEADLINE_VOCABS, workloads.HEADLINE_DTYPES)
    return list(workloads.grid(args.configs, args.batch or scope[0], args.vocab or scope[1], args.dtype or scope[2]))


def run(args: argparse.Namespace) -> int:
    from vsampler.tools import sampler_benchmark as bm
    from vsampler.tools import workloads

    if args.repeats < 1:
        print("vsampler bench: --repeats must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.plot and args.no_peers:
        print(
            "vsampler bench: --plot draws speedups over the peers; it cannot be used with --no-peers", file=sys.stderr
        )
        return EXIT_USAGE
    cases = bench_cases(args)
    batches, vocabs, dtypes = (sorted({getattr(c, f) for c in cases}) for f in ("batch", "vocab", "dtype"))
    repeats = min(args.repeats, 3) if args.quick else args.repeats

    import jax

    # the kernel is timed only where it runs compiled (on GPU "pallas" is its Triton variant already)
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    native = [i.name for i in registry.implementations() if not i.kernel or (i.name == "pallas" and on_accelerator)]
    runners: dict[str, bm.Runner] = {impl: bm.impl_runner(impl) for impl in native}
    peers: dict[str, bm.Runner] = {}
    notes: list[str] = []
    if "pallas" not in native:
        notes.append(
            "pallas not timed: off TPU the kernel runs in Pallas interpret mode (verification only); "
            "its equality with the reference is what the test suite checks"
        )
    if not args.no_peers:
        hf = bm.hf_flax_runner()
        if hf is None:
            notes.append("hf_flax skipped: transformers is not installed (pip install 'vsampler[test]')")
        else:
            peers["hf_flax"] = hf
            notes.append("hf_flax has no min-p or repetition penalty: on 'full' it runs temperature + top-k + top-p")
        peers["categorical"] = bm.categorical_runner
        notes.append("categorical: full-vocabulary jax.random.categorical after temperature, no filtering")
    notes.append(
        "each workload's calls are timed in turn within every round (floor, implementations, peers), and every "
        "ratio is the median of the per-round ratios, so that a slow moment of the machine falls on both sides; "
        "spread: (slowest - fastest) / median of the implementation's calls"
    )

    ui = ui_for_output()
    env = environment()
    ui.header("vsampler bench", env)
    if not (args.full or args.quick or args.batch or args.vocab or args.dtype):
        ui.note(
            f"the headline: {len(cases)} workloads at B={batches[0]}, V={vocabs[0]}, {dtypes[0]}; "
            "--full for the whole grid (B 1, 8, 64 x V 32000, 128256 x float32, bfloat16)"
        )
    results: list[dict[str, Any]] = []
    failures = 0
    with ui.progress(len(cases), "timing") as advance:
        for w in cases:
            inp = workloads.make_inputs(w)
            names = ["floor", *runners, *peers]
            fns = [bm.floor_runner, *runners.values(), *peers.values()]
            timings = bm.time_interleaved([lambda f=f, inp=inp: f(inp) for f in fns], repeats)
            timed = dict(zip(names, timings, strict=True))
            reference_tokens = timed["reference"].output
            for impl in runners:
                t = timed[impl]
                check = bm.check_tokens(w, inp, t.output, reference_tokens)
                failures += not check.ok
                results.append(
                    {
                        "config": w.config,
                        "batch": w.batch,
                        "vocab": w.vocab,
                        "dtype": w.dtype,
                        "impl": impl,
                        "median_ms": t.median * 1e3,
                        "min_ms": min(t.samples) * 1e3,
                        "max_ms": max(t.samples) * 1e3,
                        "spread": t.spread,
                        "calls": len(t.samples),
                        "floor_ms": timed["floor"].median * 1e3,
                        "x_floor": statistics.median(bm.paired_ratios(t, timed["floor"])),
                        **{f"speedup_vs_{name}": statistics.median(bm.paired_ratios(timed[name], t)) for name in peers},
                        **{f"{name}_ms": timed[name].median * 1e3 for name in peers},
                        "verified": check.ok,
                        "agree_rows": check.agree,
                        "boundary_rows": check.boundary,
                        "kept_rows": check.in_kept_set,
                        "rows": check.rows,
                    }
                )
            advance(w.label)
    ui.table(results, list(peers))
    tpu_estimates = _bench_estimates(args, cases, results, ui)
    feature_rows, feature_failures = _bench_features(args, cases, runners, repeats, ui)
    failures += feature_failures
    for note in notes:
        ui.note(note)
    summary = f"{len(results) + len(feature_rows)} measurements, {failures} failed verification"
    if feature_rows:
        summary += " (" + ", ".join(_feature_summary(feature_rows)) + ")"
    ui.note(summary)
    if args.plot:
        from vsampler.tools.plotting import plot_speedups

        plot_speedups(
            results, list(peers), args.plot, f"vsampler bench on {env['device']} ({env['machine']}), jax {env['jax']}"
        )
        ui.note(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "environment": env,
                    "notes": notes,
                    "results": results,
                    "features": feature_rows,
                    "tpu_estimates": tpu_estimates,
                },
                f,
                indent=2,
            )
        ui.note(f"results written to {args.json}")
    return EXIT_MISMATCH if failures else EXIT_OK


def _bench_estimates(
    args: argparse.Namespace, cases: list[Any], results: list[dict[str, Any]], ui: Any
) -> list[dict[str, Any]]:
    """Off TPU: the fused kernel's time on TPU for the run's headline workloads (each config at the
    largest B and V, float32), by libtpu's static cost model (`vsampler.tools.estimate`; cached per code
    version), beside the CPU time of the same workload."""
    import jax

    from vsampler.tools import estimate

    if args.no_estimate or jax.default_backend() == "tpu":
        return []
    if estimate.libtpu_version() is None:
        ui.note("TPU estimate skipped: libtpu is not installed (pip install 'vsampler[tpu]')")
        return []
    batch, vocab = max(c.batch for c in cases), max(c.vocab for c in cases)
    configs = list(dict.fromkeys(c.config for c in cases))
    headline = estimate.headline_cases(configs, batch, vocab)
    try:
        found = estimate.cached_estimates(headline, compute=False)
        if found is None and (args.estimate or args.full):
            with ui.progress(len(headline), "TPU estimate") as advance:
                found = estimate.cached_estimates(headline, progress=advance)
    except estimate.TpuEstimateUnavailable as err:
        ui.note(f"TPU estimate skipped: {err}")
        return []
    if found is None:
        ui.note(
            "TPU estimate: not cached for this code; --estimate computes it (libtpu's compiles, a few minutes "
            "on 2 cores) and caches it, as --full and compile-check --estimate do"
        )
        return []
    by_case = {(e["case"]["generation"], e["case"]["config"]): e for e in found}
    cpu = {
        r["config"]: r["median_ms"]
        for r in results
        if r["impl"] == "xla" and (r["batch"], r["vocab"], r["dtype"]) == (batch, vocab, "float32")
    }
    rows = []
    for config in configs:
        cells = [config, str(batch), str(vocab), "f32", f"{cpu[config]:.2f}" if config in cpu else "-"]
        for gen in estimate.HEADLINE_GENERATIONS:
            e = by_case[(gen, config)]
            cells += [f"{e['estimated_us']:.1f}", f"{e['x_floor']:.1f}"] if e["ok"] else ["no estimate", ""]
        rows.append(cells)
    columns = ["config", "B", "V", "dtype", "CPU xla ms"]
    for gen in estimate.HEADLINE_GENERATIONS:
        columns += [f"{gen} us", f"{gen} x floor"]
    ui.note(f"The fused kernel on TPU, {estimate.LABEL}; x floor: over one HBM read (compile-check --estimate)")
    ui.rows(columns, rows)
    return found


def _feature_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per feature: its cost over plain sampling (the median of per-round ratios); over several workloads,
    the range of those medians."""
    out = []
    for feature in dict.fromkeys(r["feature"] for r in rows):
        ratios = [r["cost_ratio"] for r in rows if r["feature"] == feature]
        if len(ratios) == 1:
            (r,) = (r for r in rows if r["feature"] == feature)
            out.append(f"{feature} {r['cost_ratio']:.2f}x plain (rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
        else:
            out.append(f"{feature} {min(ratios):.2f}-{max(ratios):.2f}x plain")
    return out


def _bench_features(
    args: argparse.Namespace,
    cases: list[Any],
    runners: dict[str, Any],
    repeats: int,
    ui: Any,
) -> tuple[list[dict[str, Any]], int]:
    """The serving features (log-probs in both modes, the allowed-token mask) on the "full" workloads:
    each one's cost as the median of its per-round ratios to plain sampling by the same implementation,
    timed in turn with it within every round (a slow moment of the machine falls on both), with the
    rounds' range; its output checked against the reference's."""
    from vsampler.tools import sampler_benchmark as bm
    from vsampler.tools import workloads

    full = [c for c in cases if c.config == "full"]
    impls = [i for i in runners if i != "reference"]
    if args.no_features or not full or not impls:
        return [], 0
    rows: list[dict[str, Any]] = []
    failures = 0
    with ui.progress(len(full) * len(impls), "serving features") as advance:
        for w in full:
            inp = workloads.make_inputs(w)
            for impl in impls:
                features = list(bm.FEATURES)
                fns = [runners[impl]] + [bm.feature_runner(impl, f, w.batch, w.vocab) for f in features]
                plain, *timed = bm.time_interleaved([lambda fn=fn, inp=inp: fn(inp) for fn in fns], repeats)
                for feature, t in zip(features, timed, strict=True):
                    ok = bm.check_feature(inp, impl, feature, w.batch, w.vocab)
                    failures += not ok
                    ratios = bm.paired_ratios(t, plain)
                    rows.append(
                        {
                            "workload": w.label,
                            "impl": impl,
                            "feature": feature,
                            "median_ms": t.median * 1e3,
                            "plain_ms": plain.median * 1e3,
                            "cost_ratio": statistics.median(ratios),
                            "ratio_min": min(ratios),
                            "ratio_max": max(ratios),
                            "verified": ok,
                        }
                    )
                advance(f"{impl} {w.label}")
    ui.rows(
        ["workload", "impl", "feature", "ms", "plain ms", "cost (x plain)", "rounds", "verified"],
        [
            [
                r["workload"],
                r["impl"],
                r["feature"],
                f"{r['median_ms']:.2f}",
                f"{r['plain_ms']:.2f}",
                f"{r['cost_ratio']:.2f}x",
                f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x",
                yes(r["verified"]),
            ]
            for r in rows
        ],
    )
    return rows, failures


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `vsampler bench` and its arguments to the subparsers `sub`."""
    from vsampler.tools import workloads

    bench = sub.add_parser(
        "bench",
        help="time the implementations and their peers on the embedded workload grid, verified",
        description=(
            "Times every vsampler implementation that can run here and the samplers a user would otherwise "
            "pick (HF transformers' Flax warpers + jax.random.categorical; full-vocabulary "
            "jax.random.categorical) on embedded workloads: by default the headline, each config at one serving "
            "shape (about 2 minutes of CPU time on 2 cores); --full the whole grid. Reports the median time per call, "
            "the speedup over each peer, the ratio to one sum(exp(x - max)) pass measured in the same run "
            "(the floor), and whether each implementation's tokens were checked against the reference "
            "on the same inputs and key."
        ),
    )
    scope = bench.add_mutually_exclusive_group()
    scope.add_argument(
        "--full",
        action="store_true",
        help="the whole grid: every config x B in {1, 8, 64} x V in {32000, 128256} x float32, bfloat16 "
        "(about 15-30 minutes on 2 cores); the default is the headline, each config at B=64, V=128256, float32",
    )
    scope.add_argument("--quick", action="store_true", help="a short run: B in {1, 8}, V=32000, float32")
    bench.add_argument(
        "--configs",
        type=choice_list(tuple(workloads.CONFIGS)),
        default=tuple(workloads.CONFIGS),
        help=f"comma-separated configs (default: all of {', '.join(workloads.CONFIGS)})",
    )
    bench.add_argument(
        "--batch", type=int_list, default=None, help="comma-separated batch sizes (default 64; --full: 1,8,64)"
    )
    bench.add_argument(
        "--vocab",
        type=int_list,
        default=None,
        help="comma-separated vocabulary sizes (default 128256; --full: 32000,128256)",
    )
    bench.add_argument(
        "--dtype",
        type=choice_list(("float32", "bfloat16")),
        default=None,
        help="comma-separated logits dtypes (default float32; --full: float32,bfloat16)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed rounds per workload (default 5; calls over 0.5 s stop after 3); the median is kept, the spread "
        "reported",
    )
    bench.add_argument("--no-peers", action="store_true", help="time vsampler's implementations only")
    bench.add_argument(
        "--no-features",
        action="store_true",
        help="skip the serving features (log-probs, allowed-token mask) timed on the 'full' workloads",
    )
    estimate_flags = bench.add_mutually_exclusive_group()
    estimate_flags.add_argument(
        "--estimate",
        action="store_true",
        help="compute the TPU kernel's static estimate (libtpu's cost model) for the headline workloads "
        "where it is not cached (minutes of compiles); by default only --full computes it, and the headline "
        "shows it from the cache",
    )
    estimate_flags.add_argument(
        "--no-estimate", action="store_true", help="skip the TPU kernel's static estimate, even with --full"
    )
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--plot", metavar="PATH", help="also draw the speedups per workload as a PNG at PATH")
    return bench
