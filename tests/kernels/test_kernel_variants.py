"""The fused Pallas kernel's variants (interpret mode on CPU: the same kernel code Mosaic and Triton
compile) beyond the verification grid (tests/impls/test_impls_vs_reference.py runs that on every
variant): top-k above the column count, the EOS / pad / finished handling, the per-row statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams, process_logits, sample
from vsampler.core.inputs import prepare
from vsampler.impls import pallas as pallas_impl


@pytest.mark.parametrize(("impl", "vocab", "k"), [("pallas-chunked", 9000, 4500), ("pallas-triton", 5000, 3000)])
def test_top_k_above_the_column_count_equals_the_reference(impl, vocab, k):
    """The chunked body's top-k starts from the k-th largest column maximum when a row has k columns (4096
    for the TPU chunked variant, the chunk width for Triton); with fewer it starts from the row's lowest
    value. Rows 0-1: k above the column count; row 2: k below it; row 3: ties everywhere."""
    x = jax.random.normal(jax.random.key(7), (4, vocab)) * 3
    x = x.at[3].set(jnp.round(x[3]))
    params = SamplingParams(temperature=0.8, top_k=np.array([k, k + 1, 40, k], np.int32))
    key = jax.random.key(8)
    got = np.asarray(process_logits(x, params, impl=impl))
    want = np.asarray(process_logits(x, params, impl="reference"))
    np.testing.assert_array_equal(got > -np.inf, want > -np.inf)
    assert ((want > -np.inf).sum(axis=1)[:2] >= [k, k + 1]).all()
    np.testing.assert_array_equal(
        np.asarray(sample(x, params, key, impl=impl)), np.asarray(sample(x, params, key, impl="reference"))
    )


@pytest.mark.parametrize("variant", ["pallas", "pallas-chunked", "pallas-triton"])
def test_finished_rows_emit_pad_and_eos_finishes_a_row(variant):
    logits = jnp.full((4, 10), -5.0).at[:, 3].set(5.0).at[1, 7].set(9.0)  # row 1's argmax is 7
    params = SamplingParams(temperature=0.0)
    inp = prepare(logits, params, None, eos_token_id=[7, 9])
    finished = jnp.asarray([False, False, True, False])
    tokens, new_finished, _ = pallas_impl.launch(inp, finished=finished, pad_token_id=0, variant=variant)
    np.testing.assert_array_equal(tokens, [3, 7, 0, 3])
    np.testing.assert_array_equal(new_finished, [False, True, True, False])


@pytest.mark.parametrize("variant", ["pallas", "pallas-chunked", "pallas-triton"])
def test_kernel_stats_rebuild_the_normaliser(variant):
    x = jax.random.normal(jax.random.key(3), (8, 2000)) * 3
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    inp = prepare(x, params, jax.random.key(0))
    _, _, stats = pallas_impl.launch(inp, variant=variant)
    warped = np.asarray(pallas_impl.process_logits(inp, variant=variant))
    kept = warped > -np.inf
    s_max = np.asarray(stats[:, 1])
    mass = np.where(kept, np.exp(warped - s_max[:, None]), 0.0).sum(axis=1)
    np.testing.assert_allclose(np.asarray(stats[:, 2]), mass, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats[:, 0]), np.where(kept, warped, np.inf).min(axis=1))


@pytest.mark.parametrize("vocab", [100, 1000])
def test_greedy_pass_edge_rows_equal_the_reference(vocab):
    """The greedy-only kernel's one pass (`row_passes.max_and_first_index`: row maximum and its first
    index in one read, slices of 512 lanes, a row narrower than a vreg or ending inside a slice): NaN
    left out, an all-NaN and an all -inf row, the first of two +inf, ties, the maximum in the last lane,
    and the min_tokens EOS mask on an EOS id that is the row's maximum."""
    x = np.array(jax.random.normal(jax.random.key(vocab), (8, vocab))) * 3
    x[0, 5], x[1, :], x[2, :] = np.nan, np.nan, -np.inf
    x[3, 7] = x[3, vocab - 1] = np.inf
    x[4, vocab - 1], x[5, :], x[6, 3], x[7, vocab - 2] = 50.0, 1.0, 40.0, 60.0
    history = jnp.full((8, 4), -1, jnp.int32).at[:, 0].set(1)
    min_tokens = SamplingParams(temperature=0.0, min_tokens=np.array([5, 0] * 4, np.int32))
    for params, kw in ((SamplingParams(temperature=0.0), {}), (min_tokens, {"history": history, "prompt_len": 1})):
        got, want = (
            np.asarray(sample(jnp.asarray(x), params, None, impl=impl, eos_token_id=[3, vocab - 2], **kw))
            for impl in ("pallas", "reference")
        )
        np.testing.assert_array_equal(got, want)
