"""Test-side helpers over `vsampler.tools.verification`: the same grid, asserting instead of reporting."""

from vsampler.tools.verification import (  # noqa: F401
    EOS,
    STAGE_CASES,
    TEXTBOOK_CASES,
    TEXTBOOK_TOP_P,
    Case,
    allowed_mask,
    check,
    history,
    logits,
    params,
)


def compare(
    impl: str, kind: str, config: str, batch: int, vocab: int, dtype: str, seed: int = 0, masked: bool = False
) -> None:
    """Asserts that `impl` keeps exactly the reference's tokens (values included), draws the reference's
    token on every row for the same per-row keys, and returns the reference's processed log-probs (the
    mode that depends on every stage; tests/core/test_logprobs.py covers both on every impl); `masked`: under
    an allowed-token mask, which no token breaks."""
    result = check(impl, Case(kind, config, batch, vocab, dtype, masked), seed, logprobs_modes=("processed",))
    assert result.kept_equal, "kept sets differ"
    assert result.values_equal, "kept values differ"
    assert result.in_range, "token id outside [0, V)"
    assert result.agreement == 1.0, f"token agreement {result.agreement:.4f}"
    assert result.logprobs_equal, "log-probs differ"
    assert result.mask_respected, "a token the mask disallows was sampled"
    assert result.exact, "kept sets differ from the hand-computed textbook ones"
