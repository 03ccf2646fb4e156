"""The sort-free XLA path against the reference (the spec) on the verification grid: kept sets equal
exactly (process_logits), tokens equal for the same key, on every row."""

import grid
import jax
import numpy as np
import pytest

from vsampler import process_logits, sample


def compare(impl: str, kind: str, case: str, batch: int, vocab: int, dtype: str, seed: int = 0) -> None:
    x = grid.logits(kind, batch, vocab, dtype, seed)
    params = grid.params(case, batch, vocab)
    hist, prompt = grid.history(batch, vocab, seed)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": grid.EOS}
    want = np.asarray(process_logits(x, params, impl="reference", **kw))
    got = np.asarray(process_logits(x, params, impl=impl, **kw))
    np.testing.assert_array_equal(got > -np.inf, want > -np.inf, err_msg="kept sets differ")
    np.testing.assert_array_equal(got, want, err_msg="kept values differ")
    key = jax.random.split(jax.random.key(seed), batch)
    ref_tokens = np.asarray(sample(x, params, key, impl="reference", **kw))
    tokens = np.asarray(sample(x, params, key, impl=impl, **kw))
    assert ((tokens >= 0) & (tokens < vocab)).all()
    agreement = np.mean(tokens == ref_tokens)
    assert agreement == 1.0, f"token agreement {agreement:.4f}: rows {np.flatnonzero(tokens != ref_tokens)}"


@pytest.mark.parametrize("case", grid.STAGE_CASES)
@pytest.mark.parametrize("vocab", [1000, 32000])
def test_each_stage(case, vocab):
    compare("xla", "normal", case, 8, vocab, "float32")


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
