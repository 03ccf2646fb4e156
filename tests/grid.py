"""Test-side helpers over `vsampler.verification`: the same grid, asserting instead of reporting."""

from vsampler.verification import EOS, STAGE_CASES, Case, check, history, logits, params  # noqa: F401


def compare(impl: str, kind: str, config: str, batch: int, vocab: int, dtype: str, seed: int = 0) -> None:
    """Asserts that `impl` keeps exactly the reference's tokens (values included) and draws the
    reference's token on every row for the same per-row keys."""
    result = check(impl, Case(kind, config, batch, vocab, dtype), seed)
    assert result.kept_equal, "kept sets differ"
    assert result.values_equal, "kept values differ"
    assert result.in_range, "token id outside [0, V)"
    assert result.agreement == 1.0, f"token agreement {result.agreement:.4f}"
