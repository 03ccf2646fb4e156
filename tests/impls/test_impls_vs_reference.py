"""Every registered implementation against the reference (the spec) on the verification grid: kept sets
equal exactly (values included), the reference's token for the same key on every row, the reference's
processed log-probs (`grid.compare`).

One table of cases per implementation, by registered name; a kernel variant or fast path registered
without a table of its own gets the shared one of its kind (`KERNEL_CASES` or `FAST_CASES`), so a new
registration brings its tests. The kernel variants run in Pallas interpret mode (the same kernel code
Mosaic and Triton compile). Every case carries its grid key as an `xdist_group` (tests/conftest.py):
under `--dist loadgroup` the implementations of one case run on one worker, which computes the
reference's results once (`verification.REFERENCE_CACHE`).
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

import grid
import pytest
from grid import compare

from vsampler.core import registry

DTYPES = ("float32", "bfloat16")


class GridCase(NamedTuple):
    kind: str  # the logits: "normal", "ties", "one_finite", "nan", "textbook"
    config: str  # the sampling parameters (`verification.params`)
    batch: int
    vocab: int
    dtype: str
    slow: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.config}-B{self.batch}-V{self.vocab}-{self.dtype}"


def _cases(kinds, configs, batches, vocabs, dtypes, slow=False) -> list[GridCase]:
    return [GridCase(*c, slow=slow) for c in itertools.product(kinds, configs, batches, vocabs, dtypes)]


HARD = ("ties", "one_finite", "nan")
# decimal top-p boundaries (`verification.TEXTBOOK_TOP_P`), one row each; `compare` also checks the
# hand-computed kept sets
TEXTBOOK_ROWS = len(grid.TEXTBOOK_TOP_P)


def _textbook(vocab: int, dtype: str = "float32") -> list[GridCase]:
    return _cases(["textbook"], grid.TEXTBOOK_CASES, [TEXTBOOK_ROWS], [vocab], [dtype])


# stages 1-3 (bias and penalties) are the shared pre-pass every kernel variant gets already applied
KERNEL_STAGE_CASES = [case for case in grid.STAGE_CASES if case not in ("bias", "bias_dense", "repetition")]

XLA_CASES = [
    *_cases(["normal"], grid.STAGE_CASES, [8], [1000, 32000], ["float32"]),
    *_cases(HARD, ["combined", "heterogeneous", "top_k_large", "top_p"], [8], [1000], ["float32"]),
    *_cases(["normal"], ["heterogeneous"], [1, 3], [32000], ["float32"]),
    *_textbook(1000),
    *_textbook(50257),
    *_textbook(1000, "bfloat16"),
    *_cases(["normal"], ["heterogeneous"], [1, 3, 8], [1000, 32000, 50257, 128256, 152064, 256000], DTYPES, True),
    *_cases(["normal"], ["combined", "top_p", "top_k_large"], [64], [50257, 128256, 256000], DTYPES, True),
    *_cases(["normal"], grid.STAGE_CASES, [8], [50257], ["float32"], True),
    *_cases(["ties"], grid.STAGE_CASES, [8], [50257], ["bfloat16"], True),
]
# the resident TPU kernel (interpret mode): its row blocks, batches that are not a block multiple
PALLAS_CASES = [
    *_cases(["normal"], grid.STAGE_CASES, [8], [1000], ["float32"]),
    *_cases(HARD, ["combined", "heterogeneous"], [8], [1000], ["float32"]),
    *[GridCase("normal", "heterogeneous", b, 32000, d) for b, d in ((1, "float32"), (3, "bfloat16"), (12, "float32"))],
    GridCase("normal", "heterogeneous", 20, 32000, "bfloat16"),
    *_textbook(1000),
    *_cases(["normal"], ["heterogeneous"], [8], [32000, 50257, 128256, 152064, 256000], DTYPES, True),
    *_cases(["normal"], ["combined", "top_p", "top_k_large"], [64], [128256], ["bfloat16"], True),
    *_cases(["ties"], grid.STAGE_CASES, [8], [50257], ["bfloat16"], True),
]
CASES: dict[str, list[GridCase]] = {
    "xla": XLA_CASES,
    "pallas": PALLAS_CASES,
    # the GPU variant: one program per row over power-of-two chunks
    "pallas-triton": [
        *_cases(["normal"], ["combined", "heterogeneous", "top_k_large", "greedy", "min_p"], [8], [1000], ["float32"]),
        *_cases(HARD, ["heterogeneous"], [3], [5000], ["bfloat16"]),
        *_textbook(1000),
        *_cases(["normal"], ["heterogeneous"], [8], [32000, 50257, 128256, 256000], DTYPES, True),
    ],
    # the TPU chunked variant: V=9000 is three 4096-lane chunks with an overhang, so rows cross the
    # draw's threshold in different chunks
    "pallas-chunked": [
        *_cases(["normal"], KERNEL_STAGE_CASES, [8], [9000], ["float32"]),
        *_cases(HARD, ["heterogeneous"], [20], [9000], ["bfloat16"]),
        *_textbook(9000),
        *_cases(["normal"], ["heterogeneous"], [8], [50257, 128256, 256000], DTYPES, True),
        GridCase("normal", "combined", 64, 128256, "float32", slow=True),
    ],
}
# what a registered implementation without its own table gets
KERNEL_CASES = [c for c in PALLAS_CASES if not c.slow]
FAST_CASES = [c for c in XLA_CASES if not c.slow]


def _unique(cases: list[GridCase]) -> list[GridCase]:
    """Each case once: one also listed in a slow grid runs where it is first listed (its fast entry)."""
    seen: set[GridCase] = set()
    unique = []
    for case in cases:
        if case._replace(slow=False) not in seen:
            seen.add(case._replace(slow=False))
            unique.append(case)
    return unique


def cases_for(name: str) -> list[GridCase]:
    if name in CASES:
        return _unique(CASES[name])
    return KERNEL_CASES if registry.get(name).kernel else FAST_CASES


PAIRS = [
    pytest.param(
        impl,
        case,
        id=f"{impl}-{case.label}",
        marks=[
            pytest.mark.xdist_group(case.label),
            *([pytest.mark.slow] if case.slow else []),
            *([pytest.mark.quick] if i == 0 else []),  # each implementation's first case: in the quick run
        ],
    )
    for impl in registry.names(fast=True)
    for i, case in enumerate(cases_for(impl))
]


@pytest.mark.parametrize(("impl", "case"), PAIRS)
def test_the_implementation_keeps_and_draws_what_the_reference_does(impl: str, case: GridCase) -> None:
    compare(impl, case.kind, case.config, case.batch, case.vocab, case.dtype)


def test_every_fast_implementation_has_cases() -> None:
    """A registered implementation is never left untested: each has a non-empty table."""
    assert {impl for impl, *_ in (p.values for p in PAIRS)} == set(registry.names(fast=True))


@pytest.mark.interpret
def test_a_kernel_variant_registered_in_one_call_is_listed_selectable_and_verified():
    """What a new variant takes: its launcher and one `register_variant` call (here the resident TPU
    launcher under a new name). It is then in `available_impls()`, the CLI's `--impl` choices, gets the
    shared kernel table, and passes the same comparison."""
    from vsampler import available_impls
    from vsampler.impls import pallas
    from vsampler.tools.cli import build_parser

    name = "pallas-example"
    pallas.register_variant(name, pallas._tpu_launcher(chunked=False), "the resident kernel, registered again")
    try:
        assert name in available_impls() and registry.get(name).kernel
        assert build_parser().parse_args(["verify", "--impl", name]).impl == (name,)
        assert cases_for(name) == KERNEL_CASES
        compare(name, "normal", "combined", 8, 1000, "float32")
    finally:
        pallas.unregister_variant(name)
    assert name not in available_impls()


# each implementation's `combined` case at its smallest vocabulary (the chunked variant's: three chunks)
UNDER_XLAS_DEFAULTS = "normal-combined-B8-V1000 or pallas-chunked-normal-combined-B8-V9000"


@pytest.mark.slow
@pytest.mark.interpret
def test_the_implementations_agree_with_the_reference_compiled_with_xlas_defaults():
    """The suite compiles its programs with less effort (tests/compile_policy.py); users compile with
    XLA's defaults. Every fast implementation's `combined` case, the same comparison, in a process that
    compiles as users do (no compile policy, XLA_FLAGS as a new user's shell has it)."""
    import os

    from pytest_subprocess import failure, run_pytest

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["VSAMPLER_TEST_COMPILE"] = "default"
    done = run_pytest(["-m", "slow or not slow", __file__, "-k", UNDER_XLAS_DEFAULTS], env)
    assert done.returncode == 0, failure(done)
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) == len(registry.names(fast=True)), done.stdout[-2000:]
