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
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _id_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """ "100-199,2" -> ((100, 200), (2, 3)): token ids and inclusive ranges, as half-open intervals."""
    ranges = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ids and ranges like 100-199,2, got {text!r}") from None
        if first < 0 or last < first:
            raise argparse.ArgumentTypeError(f"expected ids >= 0 and ranges low-high with low <= high, got {part!r}")
        ranges.append((first, last + 1))
    return tuple(ranges)


def _choice_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown value(s) {bad or text!r}; choose from {', '.join(choices)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    from vsampler import workloads

    parser = argparse.ArgumentParser(
        prog="vsampler",
        description=(
            "vsampler: a fast, verified LLM token sampler for JAX. Benchmark and verification reports, "
            "TPU/GPU compile checks and a generation demo."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="time the implementations and their peers on the embedded workload grid, verified",
        description=(
            "Times every vsampler implementation that can run here and the samplers a user would otherwise "
            "pick (HF transformers' Flax warpers + jax.random.categorical; full-vocabulary "
            "jax.random.categorical) on an embedded grid of workloads. Reports the median time per call, "
            "the speedup over each peer, the ratio to one sum(exp(x - max)) pass measured in the same run "
            "(the floor), and whether each implementation's tokens were checked against the reference "
            "on the same inputs and key."
        ),
    )
    bench.add_argument("--quick", action="store_true", help="a short run: B in {1, 8}, V=32000, float32")
    bench.add_argument(
        "--configs",
        type=_choice_list(tuple(workloads.CONFIGS)),
        default=tuple(workloads.CONFIGS),
        help=f"comma-separated configs (default: all of {', '.join(workloads.CONFIGS)})",
    )
    bench.add_argument("--batch", type=_int_list, default=None, help="comma-separated batch sizes (default 1,8,64)")
    bench.add_argument(
        "--vocab", type=_int_list, default=None, help="comma-separated vocabulary sizes (default 32000,128256)"
    )
    bench.add_argument(
        "--dtype",
        type=_choice_list(("float32", "bfloat16")),
        default=None,
        help="comma-separated logits dtypes (default float32,bfloat16)",
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per measurement; the median is kept")
    bench.add_argument("--no-peers", action="store_true", help="time vsampler's implementations only")
    bench.add_argument(
        "--no-features",
        action="store_true",
        help="skip the serving features (log-probs, allowed-token mask) timed on the 'full' workloads",
    )
    bench.add_argument(
        "--no-estimate",
        action="store_true",
        help="skip the TPU kernel's static estimate (libtpu's cost model) for the headline workloads",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--plot", metavar="PATH", help="also draw the speedups per workload as a PNG at PATH")

    verify = sub.add_parser(
        "verify",
        help="check an implementation against the reference on the verification grid",
        description=(
            "Runs an implementation and the reference on a grid of logits (B x V x dtype) and sampling "
            "configs with the same per-row keys, and checks that the kept sets (process_logits) are equal, "
            "values included, and that every row draws the reference's token; then a distribution check "
            "(empirical frequencies over --draws draws against the renormalised probabilities). Prints a "
            "per-case table and a summary; exits 1 on any disagreement. The pallas kernel runs in "
            "interpret mode off TPU: slow at large shapes, use --quick or narrow the grid."
        ),
    )
    verify.add_argument(
        "--impl",
        type=_choice_list(("xla", "pallas", "pallas-triton", "pallas-chunked", "all")),
        default=("xla",),
        help="implementation(s) to check: xla, pallas (the kernel's variant for this backend), pallas-triton "
        "(its GPU variant, wherever it runs), pallas-chunked (its TPU chunked variant) or all (default xla)",
    )
    verify.add_argument("--quick", action="store_true", help="a short grid: B in {1, 8}, V in {1000, 32000}")
    verify.add_argument(
        "--draws",
        type=_positive_int,
        default=40000,
        help="draws per distribution check (default 40000; the total-variation bound widens as they shrink)",
    )
    verify.add_argument("--batch", type=_int_list, default=None, help="batch sizes (default 1,3,8,64)")
    verify.add_argument(
        "--vocab", type=_int_list, default=None, help="vocabulary sizes (default 1000,32000,50257,128256,152064,256000)"
    )
    verify.add_argument(
        "--dtype",
        type=_choice_list(("float32", "bfloat16")),
        default=None,
        help="logits dtypes (default float32,bfloat16)",
    )

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
        type=_choice_list(("v4", "v5e", "v5p", "v6e")),
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
        type=_choice_list((*workloads.CONFIGS, *workloads.PEER_CONFIGS)),
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
    cc.add_argument(
        "--batch", type=_int_list, default=None, help="batch sizes (default 1,8,64,256; with --estimate 64)"
    )
    cc.add_argument(
        "--vocab",
        type=_int_list,
        default=None,
        help="vocabulary sizes (default 1000,32000,50257,128256,152064,256000; with --estimate 128256)",
    )
    cc.add_argument(
        "--dtype",
        type=_choice_list(("float32", "bfloat16")),
        default=None,
        help="logits dtypes (default float32,bfloat16)",
    )

    gen = sub.add_parser(
        "generate",
        help="stream tokens from the tiny NNX decoder through the chunked decode loop",
        description=(
            "Builds vsampler's tiny Llama-style decoder (random weights from --model-seed: it has no "
            "tokenizer, prompts and outputs are token ids), precompiles the loop for the prompts' bucket, "
            "and streams the generated ids chunk by chunk (one compiled call of --chunks steps each), then "
            "reports decode tokens per second. Sampling options are SamplingParams fields; bad values are "
            "reported with the allowed range (exit 2)."
        ),
    )
    gen.add_argument(
        "--prompt",
        type=_int_list,
        action="append",
        default=None,
        help="a prompt as comma-separated token ids; repeat for a batch (default: --batch random prompts)",
    )
    gen.add_argument("--batch", type=int, default=4, help="random prompts when no --prompt is given (default 4)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per row (default 32)")
    gen.add_argument("--chunks", type=int, default=8, help="decode steps per compiled call (default 8)")
    gen.add_argument("--vocab", type=int, default=32000, help="the tiny decoder's vocabulary size (default 32000)")
    gen.add_argument("--model-seed", type=int, default=0, help="seed of the decoder's random weights")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (row r draws from fold_in(key, r))")
    gen.add_argument("--eos", type=_int_list, default=None, help="comma-separated EOS ids (default: none)")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument(
        "--impl",
        choices=("auto", "reference", "xla", "pallas"),
        default="auto",
        help="sampler implementation (default auto: pallas on TPU, xla elsewhere)",
    )
    gen.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="also report each token's log-probability and the N most likely tokens (0-64)",
    )
    gen.add_argument(
        "--logprobs-mode",
        choices=("raw", "processed"),
        default="raw",
        help="raw: after penalties, before temperature and filters (default); processed: what was sampled from",
    )
    gen.add_argument(
        "--allowed-ids",
        type=_id_ranges,
        default=None,
        metavar="IDS",
        help="structured output: only these token ids (and ranges, e.g. 100-199,2) may be generated; "
        "applied as a packed allowed_tokens mask at every step (add the EOS ids to let rows end early)",
    )
    gen.add_argument("--json", metavar="PATH", help="also write the generated ids and timings as JSON to PATH")
    return parser


def _environment() -> dict[str, str]:
    import jax

    import vsampler

    return {
        "vsampler": vsampler.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": str(jax.device_count()),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "implementations": ", ".join(vsampler.available_impls()),
    }


def _run_bench(args: argparse.Namespace) -> int:
    from vsampler import benchmarking as bm
    from vsampler import sampling, workloads

    if args.repeats < 1:
        print("vsampler bench: --repeats must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.plot and args.no_peers:
        print(
            "vsampler bench: --plot draws speedups over the peers; it cannot be used with --no-peers", file=sys.stderr
        )
        return EXIT_USAGE
    batches = args.batch or ((1, 8) if args.quick else workloads.DEFAULT_BATCHES)
    vocabs = args.vocab or ((32000,) if args.quick else workloads.DEFAULT_VOCABS)
    dtypes = args.dtype or (("float32",) if args.quick else workloads.DEFAULT_DTYPES)
    cases = list(workloads.grid(args.configs, batches, vocabs, dtypes))
    repeats = min(args.repeats, 3) if args.quick else args.repeats

    import jax

    # the kernel is timed only where it runs compiled (on GPU "pallas" is its Triton variant already)
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    native = [i for i in sampling.available_impls() if not i.startswith("pallas") or (i == "pallas" and on_accelerator)]
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

    ui = _ui()
    env = _environment()
    ui.header("vsampler bench", env)
    results: list[dict[str, Any]] = []
    failures = 0
    with ui.progress(len(cases)) as advance:
        for w in cases:
            inp = workloads.make_inputs(w)
            floor_s = bm.time_call(lambda inp=inp: bm.floor_runner(inp), repeats)
            reference_tokens = runners["reference"](inp)
            peer_s = {name: bm.time_call(lambda r=r, inp=inp: r(inp), repeats) for name, r in peers.items()}
            for impl, run in runners.items():
                seconds = bm.time_call(lambda run=run, inp=inp: run(inp), repeats)
                check = bm.check_tokens(w, inp, run(inp), reference_tokens)
                failures += not check.ok
                results.append(
                    {
                        "config": w.config,
                        "batch": w.batch,
                        "vocab": w.vocab,
                        "dtype": w.dtype,
                        "impl": impl,
                        "median_ms": seconds * 1e3,
                        "floor_ms": floor_s * 1e3,
                        "x_floor": seconds / floor_s,
                        **{f"speedup_vs_{name}": s / seconds for name, s in peer_s.items()},
                        **{f"{name}_ms": s * 1e3 for name, s in peer_s.items()},
                        "verified": check.ok,
                        "agree_rows": check.agree,
                        "kept_rows": check.in_kept_set,
                        "rows": check.rows,
                    }
                )
            advance(w.label)
    ui.table(results, list(peers))
    tpu_estimates = _bench_estimates(args, cases, results, ui)
    feature_rows, feature_failures = _bench_features(args, cases, runners, results, repeats, ui)
    failures += feature_failures
    for note in notes:
        ui.note(note)
    summary = f"{len(results) + len(feature_rows)} measurements, {failures} failed verification"
    if feature_rows:
        summary += " (" + ", ".join(_feature_summary(feature_rows)) + ")"
    ui.note(summary)
    if args.plot:
        from vsampler.plotting import plot_speedups

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
    largest B and V, float32), by libtpu's static cost model (`vsampler.estimate`; cached per code
    version), beside the CPU time of the same workload."""
    import jax

    from vsampler import estimate

    if args.no_estimate or jax.default_backend() == "tpu":
        return []
    if estimate.libtpu_version() is None:
        ui.note("TPU estimate skipped: libtpu is not installed (pip install 'vsampler[tpu]')")
        return []
    batch, vocab = max(c.batch for c in cases), max(c.vocab for c in cases)
    configs = list(dict.fromkeys(c.config for c in cases))
    headline = estimate.headline_cases(configs, batch, vocab)
    try:
        with ui.progress(len(headline)) as advance:
            found = estimate.cached_estimates(headline, progress=advance)
    except estimate.TpuEstimateUnavailable as err:
        ui.note(f"TPU estimate skipped: {err}")
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
    """Per feature: the range of its cost over plain sampling across the workloads."""
    out = []
    for feature in dict.fromkeys(r["feature"] for r in rows):
        ratios = [r["cost_ratio"] for r in rows if r["feature"] == feature]
        out.append(f"{feature} {min(ratios):.2f}-{max(ratios):.2f}x plain")
    return out


def _bench_features(
    args: argparse.Namespace,
    cases: list[Any],
    runners: dict[str, Any],
    results: list[dict[str, Any]],
    repeats: int,
    ui: Any,
) -> tuple[list[dict[str, Any]], int]:
    """The serving features (log-probs in both modes, the allowed-token mask) on the "full" workloads:
    each one's median time as a ratio to plain sampling by the same implementation, timed interleaved
    with it, and its output checked against the reference's."""
    from vsampler import benchmarking as bm
    from vsampler import workloads

    if args.no_features:
        return [], 0
    del results  # plain sampling is re-timed here, interleaved with the features, for the ratios
    rows: list[dict[str, Any]] = []
    failures = 0
    for w in (c for c in cases if c.config == "full"):
        inp = workloads.make_inputs(w)
        for impl in (i for i in runners if i != "reference"):
            features = list(bm.FEATURES)
            fns = [runners[impl]] + [bm.feature_runner(impl, f, w.batch, w.vocab) for f in features]
            plain_s, *feature_s = bm.time_interleaved([lambda fn=fn, inp=inp: fn(inp) for fn in fns], repeats)
            for feature, seconds in zip(features, feature_s, strict=True):
                ok = bm.check_feature(inp, impl, feature, w.batch, w.vocab)
                failures += not ok
                rows.append(
                    {
                        "workload": w.label,
                        "impl": impl,
                        "feature": feature,
                        "median_ms": seconds * 1e3,
                        "plain_ms": plain_s * 1e3,
                        "cost_ratio": seconds / plain_s,
                        "verified": ok,
                    }
                )
    if rows:
        ui.rows(
            ["workload", "impl", "feature", "ms", "plain ms", "cost (x plain)", "verified"],
            [
                [
                    r["workload"],
                    r["impl"],
                    r["feature"],
                    f"{r['median_ms']:.2f}",
                    f"{r['plain_ms']:.2f}",
                    f"{r['cost_ratio']:.2f}x",
                    _yes(r["verified"]),
                ]
                for r in rows
            ],
        )
    return rows, failures


def _run_verify(args: argparse.Namespace) -> int:
    from vsampler import verification

    impls = ("xla", "pallas", "pallas-triton", "pallas-chunked") if "all" in args.impl else args.impl
    batches = args.batch or ((1, 8) if args.quick else (1, 3, 8, 64))
    vocabs = args.vocab or ((1000, 32000) if args.quick else (1000, 32000, 50257, 128256, 152064, 256000))
    dtypes = args.dtype or ("float32", "bfloat16")
    configs = verification.STAGE_CASES if args.quick else ("combined", "heterogeneous")
    cases = list(verification.grid(batches, vocabs, dtypes, configs))
    cases += list(verification.grid(batches, vocabs, dtypes, ("heterogeneous",), masked=(True,)))
    # decimal top-p boundaries, also against the hand-computed kept sets (one batch: every textbook row)
    textbook_batch = (len(verification.TEXTBOOK_TOP_P),)
    cases += list(verification.grid(textbook_batch, vocabs, dtypes, verification.TEXTBOOK_CASES, kinds=("textbook",)))
    ui = _ui()
    ui.header("vsampler verify", _environment())
    results = []
    with ui.progress(len(cases) * len(impls)) as advance:
        for impl in impls:
            for case in cases:
                results.append(verification.check(impl, case))
                verification.bound_mappings()  # a full grid compiles past the kernel's mapping limit
                advance(f"{impl} {case.label}")
    rows = [
        [
            r.impl,
            r.case.label,
            _yes(r.kept_equal),
            _yes(r.values_equal),
            f"{r.agreeing_rows}/{r.case.batch}",
            _yes(r.logprobs_equal),
            _yes(r.mask_respected) if r.case.masked else "-",
            _yes(r.exact) if r.case.kind == "textbook" else "-",
            "ok" if r.ok else "MISMATCH",
        ]
        for r in results
    ]
    ui.rows(
        ["impl", "case", "kept set", "values", "tokens agree", "log-probs", "mask held", "textbook", "result"], rows
    )
    dist_rows, dist_failures = [], 0
    for impl in impls:
        for name in verification.DISTRIBUTION_PARAMS:
            tv, bound, dropped = verification.distribution(impl, name, n_draws=args.draws)
            ok = tv < bound and not dropped
            dist_failures += not ok
            dist_rows.append([impl, name, f"{tv:.4f}", f"{bound:.4f}", "ok" if ok else "MISMATCH"])
    ui.rows(["impl", "distribution", "total variation", "bound", "result"], dist_rows)
    failures = sum(not r.ok for r in results)
    agree = sum(r.agreeing_rows for r in results)
    total = sum(r.case.batch for r in results)
    ui.note(
        f"{len(results)} cases, {failures} disagree; token agreement {agree}/{total} rows "
        f"({100 * agree / max(total, 1):.2f}%); distribution checks: {dist_failures} failed"
    )
    return EXIT_MISMATCH if failures or dist_failures else EXIT_OK


def _run_estimate(args: argparse.Namespace) -> int:
    import itertools

    from vsampler import estimate

    batches = args.batch or ((8,) if args.quick else (64,))
    vocabs = args.vocab or ((32000, 128256) if args.quick else (128256,))
    dtypes = args.dtype or ("float32", "bfloat16")
    cases = [
        estimate.EstimateCase(gen, batch, vocab, dtype, config)
        for gen, config, vocab, batch, dtype in itertools.product(args.tpu, args.configs, vocabs, batches, dtypes)
    ]
    ui = _ui()
    ui.header("vsampler compile-check --estimate", {**_environment(), "libtpu": str(estimate.libtpu_version())})
    try:
        with ui.progress(len(cases)) as advance:
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
            json.dump({"environment": _environment(), "estimates": [r.as_dict() for r in results]}, f, indent=2)
        ui.note(f"estimates written to {args.json}")
    modelled = [r for r in results if r.case.generation not in estimate.UNMODELLED]
    return EXIT_MISMATCH if any(not r.ok for r in modelled) else EXIT_OK


def _run_compile_check(args: argparse.Namespace) -> int:
    import itertools

    from vsampler import compile_check
    from vsampler.kernels import block_sizes

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
    ui = _ui()
    ui.header("vsampler compile-check", _environment())
    rows, failures, unclaimed = [], 0, 0
    mib = 1 << 20
    with ui.progress(len(configs)) as advance:
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
                        f"{r.hbm_bytes / r.logits_bytes:.3f}x of {r.logits_bytes / mib:.1f} MiB",
                        f"~{r.estimated_seconds() * 1e6:.0f} us (floor ~{r.logits_bytes / bw * 1e6:.0f} us)",
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


def _logprobs_json(state: Any, args: argparse.Namespace, rows: list[list[int]], bucket: int) -> dict[str, Any]:
    """Per row, per generated token: its log-probability and the top entries as [id, log-probability]."""
    if args.logprobs is None:
        return {}
    import numpy as np

    token_lp, top_ids, top_lp = map(np.asarray, (state.token_logprobs, state.top_logprob_ids, state.top_logprobs))
    out = []
    for r, row in enumerate(rows):
        slots = range(bucket, bucket + len(row))
        out.append(
            [
                {
                    "token": row[i],
                    "logprob": float(token_lp[r, s]),
                    "top": [[int(t), float(v)] for t, v in zip(top_ids[r, s], top_lp[r, s], strict=True)],
                }
                for i, s in enumerate(slots)
            ]
        )
    return {"logprobs_mode": args.logprobs_mode, "logprobs": out}


def _run_generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from vsampler import SamplingParams, pack_allowed, vInference, vInferenceConfig, vInferencePreCompileConfig
    from vsampler.loop_benchmark import tiny_model

    for name in ("batch", "max_new_tokens", "chunks", "vocab"):
        if getattr(args, name) < 1:
            print(f"vsampler generate: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        params = SamplingParams(
            max_tokens=args.max_new_tokens,
            min_tokens=args.min_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
        )
        model = tiny_model(args.vocab, seed=args.model_seed)
        config = vInferenceConfig(
            max_new_tokens=args.max_new_tokens,
            streaming_chunks=args.chunks,
            eos_token_id=list(args.eos) if args.eos else None,
            pad_token_id=0,
            sampling_params=params,
        )
        engine = vInference(model, config, impl=args.impl)
        if args.prompt:
            width = max(len(p) for p in args.prompt)
            ids = np.zeros((len(args.prompt), width), np.int32)
            mask = np.zeros_like(ids)
            for r, p in enumerate(args.prompt):
                ids[r, : len(p)], mask[r, : len(p)] = p, 1
        else:
            ids = np.random.default_rng(args.seed).integers(1, args.vocab, (args.batch, 16), dtype=np.int32)
            mask = np.ones_like(ids)
        lengths = mask.sum(axis=1)
        bucket = 1 << int(lengths.max() - 1).bit_length()
        allowed = None
        if args.allowed_ids is not None:
            if max(hi for _, hi in args.allowed_ids) > args.vocab:
                raise ValueError(f"--allowed-ids names ids outside the vocabulary [0, {args.vocab})")
            allowed_rows = np.zeros((ids.shape[0], args.vocab), bool)
            for lo, hi in args.allowed_ids:
                allowed_rows[:, lo:hi] = True
            allowed = pack_allowed(allowed_rows)
        serving = {"logprobs": args.logprobs, "logprobs_mode": args.logprobs_mode}
        engine.precompile(
            vInferencePreCompileConfig(batch_size=ids.shape[0], prefill_length=bucket),
            allowed_tokens=allowed is not None,
            **serving,
        )
        stream = engine.generate(ids, mask, key=jax.random.key(args.seed), allowed_tokens=allowed, **serving)
        ui = _ui()
        ui.header("vsampler generate", _environment())
        ui.note(f"tiny decoder, vocabulary {args.vocab}; {ids.shape[0]} prompts, bucket {bucket}; {params}")
        shown = [0] * ids.shape[0]
        state = None
        for chunk, state in enumerate(stream):
            seq, length = np.asarray(state.sequences), np.asarray(state.current_length)
            for r in range(ids.shape[0]):
                first = bucket + shown[r]
                new = seq[r, first : length[r]].tolist()
                shown[r] = int(length[r]) - bucket
                if new and args.logprobs is not None:
                    lps = np.asarray(state.token_logprobs[r, first : length[r]])
                    new = " ".join(f"{t} ({lp:.3f})" for t, lp in zip(new, lps, strict=True))
                if new:
                    ui.note(f"{'prefill' if chunk == 0 else f'chunk {chunk}'} row {r}: {new}")
    except ValueError as err:
        print(f"vsampler generate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    assert state is not None
    seq, length = np.asarray(state.sequences), np.asarray(state.current_length)
    rows = [seq[r, bucket : length[r]].tolist() for r in range(ids.shape[0])]
    tps = float(state.tokens_per_second)
    ui.note(
        f"{int(state.generated_tokens)} tokens generated; decode {tps:.0f} tokens/s over "
        f"{float(state._time_spent_computing) * 1e3:.1f} ms of decode calls"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "environment": _environment(),
                    "prompts": [ids[r][mask[r] > 0].tolist() for r in range(ids.shape[0])],
                    "generated": rows,
                    "finished": np.asarray(state.is_sequence_finished)[: ids.shape[0]].tolist(),
                    "generated_tokens": int(state.generated_tokens),
                    "decode_tokens_per_second": tps,
                    **_logprobs_json(state, args, rows, bucket),
                },
                f,
                indent=2,
            )
    return EXIT_OK


def _yes(flag: bool) -> str:
    return "equal" if flag else "DIFFERENT"


class _PlainUI:
    """Text output for when rich (the `bench` extra) is not installed."""

    def header(self, title: str, env: dict[str, str]) -> None:
        print(title)
        for k, v in env.items():
            print(f"  {k}: {v}")

    def progress(self, total: int) -> Any:
        import contextlib

        @contextlib.contextmanager
        def bar() -> Any:
            done = [0]

            def advance(label: str) -> None:
                done[0] += 1
                print(f"[{done[0]}/{total}] {label}", file=sys.stderr, flush=True)

            yield advance

        return bar()

    def table(self, results: list[dict[str, Any]], peers: list[str]) -> None:
        cols = ["config", "B", "V", "dtype", "impl", "ms", "x floor", *[f"vs {p}" for p in peers], "verified"]
        print("  ".join(f"{c:>12}" for c in cols))
        for r in results:
            cells = [
                r["config"],
                r["batch"],
                r["vocab"],
                r["dtype"],
                r["impl"],
                f"{r['median_ms']:.2f}",
                f"{r['x_floor']:.1f}",
                *[f"{r[f'speedup_vs_{p}']:.1f}x" for p in peers],
                "yes" if r["verified"] else f"NO {r['agree_rows']}/{r['rows']}",
            ]
            print("  ".join(f"{c!s:>12}" for c in cells))

    def rows(self, columns: list[str], rows: list[list[str]]) -> None:
        print("  ".join(columns))
        for row in rows:
            print("  ".join(row))

    def note(self, text: str) -> None:
        print(text)


class _RichUI(_PlainUI):
    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(width=None if sys.stdout.isatty() else 110)

    def header(self, title: str, env: dict[str, str]) -> None:
        self.console.rule(f"[bold]{title}")
        self.console.print("  ".join(f"[dim]{k}[/dim] {v}" for k, v in env.items()))

    def progress(self, total: int) -> Any:
        import contextlib

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if not self.console.is_terminal:  # piped (CI logs, | tee): one line per finished item instead
            return super().progress(total)

        @contextlib.contextmanager
        def bar() -> Any:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            ) as progress:
                task = progress.add_task("starting", total=total)

                def advance(label: str) -> None:
                    progress.update(task, advance=1, description=label)

                yield advance

        return bar()

    def table(self, results: list[dict[str, Any]], peers: list[str]) -> None:
        from rich.table import Table

        table = Table(
            caption="ms: median per call. x floor: impl / one sum(exp(x - max)) pass. "
            "vs PEER: peer time / impl time (>1: vsampler faster)."
        )
        for col in ["config", "B", "V", "dtype", "impl", "ms", "x floor", *[f"vs {p}" for p in peers], "verified"]:
            left = col in ("config", "dtype", "impl", "verified")
            table.add_column(col, justify="left" if left else "right", no_wrap=True)
        for r in results:
            verified = "[green]yes" if r["verified"] else f"[red]NO {r['agree_rows']}/{r['rows']}"
            table.add_row(
                r["config"],
                str(r["batch"]),
                str(r["vocab"]),
                r["dtype"].replace("float", "f"),
                r["impl"],
                f"{r['median_ms']:.2f}",
                f"{r['x_floor']:.1f}",
                *[f"{r[f'speedup_vs_{p}']:.2f}x" for p in peers],
                verified,
            )
        self.console.print(table)

    def rows(self, columns: list[str], rows: list[list[str]]) -> None:
        from rich.table import Table

        table = Table()
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*[f"[red]{c}" if c in ("MISMATCH", "DIFFERENT", "FAILED") else c for c in row])
        self.console.print(table)

    def note(self, text: str) -> None:
        self.console.print(text)


def _ui() -> _PlainUI:
    try:
        return _RichUI()
    except ImportError:
        return _PlainUI()


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
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "verify":
        return _run_verify(args)
    if args.command == "compile-check":
        return _run_compile_check(args)
    if args.command == "generate":
        return _run_generate(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
