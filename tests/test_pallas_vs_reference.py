"""The fused Pallas kernel (interpret mode on CPU: the same kernel code Mosaic compiles) against the
reference on the verification grid: kept sets rebuilt from the kernel's per-row values equal the
reference's, tokens equal for the same key on every row; plus its EOS / pad / finished handling."""

import grid
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grid import compare

from vsampler import SamplingParams, process_logits, sample
from vsampler import pallas as pallas_impl
from vsampler.inputs import prepare


@pytest.mark.parametrize("case", grid.STAGE_CASES)
def test_each_stage(case):
    compare("pallas", "normal", case, 8, 1000, "float32")


@pytest.mark.parametrize("kind", ["ties", "one_finite", "nan"])
@pytest.mark.parametrize("case", ["combined", "heterogeneous"])
def test_hard_logits(kind, case):
    compare("pallas", kind, case, 8, 1000, "float32")


@pytest.mark.parametrize("impl", ["pallas", "pallas-triton", "pallas-chunked"])
@pytest.mark.parametrize("case", grid.TEXTBOOK_CASES)
def test_textbook_top_p_boundaries(impl, case):
    """Decimal top-p boundaries (verification.TEXTBOOK_TOP_P): the hand-computed kept sets, as the reference."""
    compare(impl, "textbook", case, len(grid.TEXTBOOK_TOP_P), 9000 if impl == "pallas-chunked" else 1000, "float32")


@pytest.mark.parametrize(("batch", "dtype"), [(1, "float32"), (3, "bfloat16"), (12, "float32"), (20, "bfloat16")])
def test_batches_that_are_not_a_block_multiple(batch, dtype):
    compare("pallas", "normal", "heterogeneous", batch, 32000, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 152064, 256000])
def test_grid_heterogeneous(vocab, dtype):
    compare("pallas", "normal", "heterogeneous", 8, vocab, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["combined", "top_p", "top_k_large"])
def test_grid_batch_64(case):
    compare("pallas", "normal", case, 64, 128256, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("case", grid.STAGE_CASES)
def test_each_stage_bfloat16_odd_vocab(case):
    compare("pallas", "ties", case, 8, 50257, "bfloat16")


@pytest.mark.parametrize("case", ["combined", "heterogeneous", "top_k_large", "greedy", "min_p"])
def test_triton_variant_each_stage(case):
    compare("pallas-triton", "normal", case, 8, 1000, "float32")


@pytest.mark.parametrize("kind", ["ties", "one_finite", "nan"])
def test_triton_variant_hard_logits(kind):
    compare("pallas-triton", kind, "heterogeneous", 3, 5000, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 256000])
def test_triton_variant_grid(vocab, dtype):
    compare("pallas-triton", "normal", "heterogeneous", 8, vocab, dtype)


# The TPU chunked variant (what the policy picks where whole-row temporaries do not fit VMEM): V=9000
# is three 4096-lane chunks with an overhang, so rows cross the draw's threshold in different chunks.
# (Stages 1-3, bias and penalties, are the shared pre-pass every variant gets already applied.)
KERNEL_STAGE_CASES = [case for case in grid.STAGE_CASES if case not in ("bias", "bias_dense", "repetition")]


@pytest.mark.parametrize("case", KERNEL_STAGE_CASES)
def test_chunked_variant_each_stage(case):
    compare("pallas-chunked", "normal", case, 8, 9000, "float32")


@pytest.mark.parametrize("kind", ["ties", "one_finite", "nan"])
def test_chunked_variant_hard_logits(kind):
    compare("pallas-chunked", kind, "heterogeneous", 20, 9000, "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [50257, 128256, 256000])
def test_chunked_variant_grid(vocab, dtype):
    compare("pallas-chunked", "normal", "heterogeneous", 8, vocab, dtype)


@pytest.mark.slow
def test_chunked_variant_batch_64():
    compare("pallas-chunked", "normal", "combined", 64, 128256, "float32")


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


@pytest.mark.parametrize("variant", ["tpu", "tpu-chunked", "triton"])
def test_finished_rows_emit_pad_and_eos_finishes_a_row(variant):
    logits = jnp.full((4, 10), -5.0).at[:, 3].set(5.0).at[1, 7].set(9.0)  # row 1's argmax is 7
    params = SamplingParams(temperature=0.0)
    inp = prepare(logits, params, None, eos_token_id=[7, 9])
    finished = jnp.asarray([False, False, True, False])
    tokens, new_finished, _ = pallas_impl.launch(inp, finished=finished, pad_token_id=0, variant=variant)
    np.testing.assert_array_equal(tokens, [3, 7, 0, 3])
    np.testing.assert_array_equal(new_finished, [False, True, True, False])


@pytest.mark.parametrize("variant", ["tpu", "tpu-chunked", "triton"])
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
