"""`vsampler verify`: the reference-vs-implementation grid and the distribution checks."""

from __future__ import annotations

import argparse
from typing import Any

from vsampler.core import registry
from vsampler.tools.cli.arguments import choice_list, int_list, positive_int
from vsampler.tools.cli.ui import (
    EXIT_MISMATCH,
    EXIT_OK,
    environment,
    ui_for_output,
    yes,
)


def run(args: argparse.Namespace) -> int:
    from vsampler.tools import verification

    impls = registry.names(fast=True) if "all" in args.impl else args.impl
    batches = args.batch or ((1, 8) if args.quick else (1, 3, 8, 64))
    vocabs = args.vocab or ((1000, 32000) if args.quick else (1000, 32000, 50257, 128256, 152064, 256000))
    dtypes = args.dtype or ("float32", "bfloat16")
    configs = verification.STAGE_CASES if args.quick else ("combined", "heterogeneous")
    cases = list(verification.grid(batches, vocabs, dtypes, configs))
    cases += list(verification.grid(batches, vocabs, dtypes, ("heterogeneous",), masked=(True,)))
    # decimal top-p boundaries, also against the hand-computed kept sets (one batch: every textbook row)
    textbook_batch = (len(verification.TEXTBOOK_TOP_P),)
    cases += list(verification.grid(textbook_batch, vocabs, dtypes, verification.TEXTBOOK_CASES, kinds=("textbook",)))
    ui = ui_for_output()
    ui.header("vsampler verify", environment())
    results = []
    with ui.progress(len(cases) * len(impls), "verifying") as advance:
        # case by case, every implementation in turn: the case's inputs and the reference's results are
        # computed once and still cached for the next implementation (implementation by implementation,
        # a grid larger than the caches would evict each case before its next use)
        for case in cases:
            for impl in impls:
                results.append(verification.check(impl, case))
                verification.bound_mappings()  # a full grid compiles past the kernel's mapping limit
                advance(f"{impl} {case.label}")
    results.sort(key=lambda r: impls.index(r.impl))  # the table by implementation (a stable sort)
    rows = [
        [
            r.impl,
            r.case.label,
            yes(r.kept_equal) + (f" +{r.kept_boundary_rows} top-p cut" if r.kept_boundary_rows else ""),
            yes(r.values_equal),
            f"{r.agreeing_rows}/{r.case.batch}" + (f" +{r.boundary_rows} boundary" if r.boundary_rows else ""),
            yes(r.logprobs_equal),
            yes(r.mask_respected) if r.case.masked else "-",
            yes(r.exact) if r.case.kind == "textbook" else "-",
            "ok" if r.ok else "MISMATCH",
        ]
        for r in results
    ]
    ui.rows(
        ["impl", "case", "kept set", "values", "tokens agree", "log-probs", "mask held", "textbook", "result"], rows
    )
    dist_rows, dist_failures = [], 0
    with ui.progress(len(impls) * len(verification.DISTRIBUTION_PARAMS), "distribution checks") as advance:
        for impl in impls:
            for name in verification.DISTRIBUTION_PARAMS:
                tv, bound, dropped = verification.distribution(impl, name, n_draws=args.draws)
                ok = tv < bound and not dropped
                dist_failures += not ok
                dist_rows.append([impl, name, f"{tv:.4f}", f"{bound:.4f}", "ok" if ok else "MISMATCH"])
                advance(f"{impl} {name}")
    ui.rows(["impl", "distribution", "total variation", "bound", "result"], dist_rows)
    failures = sum(not r.ok for r in results)
    agree = sum(r.agreeing_rows for r in results)
    boundary = sum(r.boundary_rows for r in results)
    cuts = sum(r.kept_boundary_rows for r in results)
    total = sum(r.case.batch for r in results)
    ui.note(
        f"{len(results)} cases, {failures} disagree; token agreement {agree}/{total} rows "
        f"({100 * agree / max(total, 1):.2f}%), {boundary} at a rounding boundary"
        + (f", {cuts} kept set{'s' * (cuts != 1)} at a top-p cut rounding decides" if cuts else "")
        + f"; distribution checks: {dist_failures} failed"
    )
    if cuts:
        ui.note(
            "top-p cut: the kept sets differ only by the tokens of one value, the lowest the larger set keeps, "
            "and the exact mass above that value (float64) lies within float32 rounding of top_p * total "
            "(verification.top_p_boundary): the reference sums the masses compensated, the fast paths in "
            "float32, so the cut may fall on either side; values equal on the tokens both keep"
        )
    if boundary:
        ui.note(
            "rounding boundary: the row drew the kept token next to the reference's, and u * total lies within "
            "float32 rounding (verification.draw_rounding_bound, computed in float64) of the cumulative mass "
            "between the two (the spec's draw rule: the same key gives the same token except where rounding "
            "moves a boundary)"
        )
    return EXIT_MISMATCH if failures or dist_failures else EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `vsampler verify` and its arguments to the subparsers `sub`."""

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
        type=choice_list((*registry.names(fast=True), "all")),
        default=("xla",),
        help="implementation(s) to check, by registered name ("
        + "; ".join(f"{i.name}: {i.description}" for i in registry.implementations() if i.name != "reference")
        + "), or all (default xla)",
    )
    verify.add_argument("--quick", action="store_true", help="a short grid: B in {1, 8}, V in {1000, 32000}")
    verify.add_argument(
        "--draws",
        type=positive_int,
        default=40000,
        help="draws per distribution check (default 40000; the total-variation bound widens as they shrink)",
    )
    verify.add_argument("--batch", type=int_list, default=None, help="batch sizes (default 1,3,8,64)")
    verify.add_argument(
        "--vocab", type=int_list, default=None, help="vocabulary sizes (default 1000,32000,50257,128256,152064,256000)"
    )
    verify.add_argument(
        "--dtype",
        type=choice_list(("float32", "bfloat16")),
        default=None,
        help="logits dtypes (default float32,bfloat16)",
    )
    return verify
