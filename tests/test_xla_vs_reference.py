"""The sort-free XLA path against the reference (the spec) on the verification grid: kept sets equal
exactly (process_logits), tokens equal for the same key, on every row."""

import grid
import pytest
from grid import compare


@pytest.mark.parametrize("case", grid.STAGE_CASES)
@pytest.mark.parametrize("vocab", [1000, 32000])
def test_each_stage(case, vocab):
    compare("xla", "normal", case, 8, vocab, "float32")


@pytest.mark.parametrize("case", grid.TEXTBOOK_CASES)
@pytest.mark.parametrize(("vocab", "dtype"), [(1000, "float32"), (50257, "float32"), (1000, "bfloat16")])
def test_textbook_top_p_boundaries(case, vocab, dtype):
    """Decimal top-p boundaries (verification.TEXTBOOK_TOP_P): the hand-computed kept sets, as the reference."""
    compare("xla", "textbook", case, len(grid.TEXTBOOK_TOP_P), vocab, dtype)


@pytest.mark.parametrize("kind", ["ties", "one_finite", "nan"])
@pytest.mark.parametrize("case", ["combined", "heterogeneous", "top_k_large", "top_p"])
def test_hard_logits(kind, case):
    compare("xla", kind, case, 8, 1000, "float32")


@pytest.mark.parametrize("batch", [1, 3])
def test_small_batches(batch):
    compare("xla", "normal", "heterogeneous", batch, 32000, "float32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [1000, 32000, 50257, 128256, 152064, 256000])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_grid_heterogeneous(batch, vocab, dtype):
    compare("xla", "normal", "heterogeneous", batch, vocab, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [50257, 128256, 256000])
@pytest.mark.parametrize("case", ["combined", "top_p", "top_k_large"])
def test_grid_batch_64(case, vocab, dtype):
    compare("xla", "normal", case, 64, vocab, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", grid.STAGE_CASES)
def test_each_stage_bfloat16_and_odd_vocab(case, dtype):
    compare("xla", "ties" if dtype == "bfloat16" else "normal", case, 8, 50257, dtype)
