"""Edge cases of the spec (NaN, -inf, +inf, bfloat16, odd vocabularies), run-time sanitising of traced
parameters, and the errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams, process_logits, sample
from vsampler.core import registry

NEG = -np.inf
KEY = jax.random.key(0)


def test_nan_logits_are_never_sampled():
    x = jnp.asarray([[np.nan, 1.0, np.nan, 0.5]] * 64)
    tokens = np.asarray(sample(x, SamplingParams(temperature=1.0), KEY))
    assert set(tokens.tolist()) <= {1, 3}
    assert int(sample(x[:1], SamplingParams(temperature=0.0), KEY)[0]) == 1
    assert np.isneginf(np.asarray(process_logits(x[:1], SamplingParams()))[0, [0, 2]]).all()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("fill", [NEG, np.nan])
def test_rows_with_nothing_left_return_token_zero(temperature, fill):
    x = jnp.asarray([[fill] * 5, [fill, fill, 2.0, fill, fill]])
    tokens = sample(x, SamplingParams(temperature=temperature, top_k=2, top_p=0.5), KEY)
    assert tokens.tolist() == [0, 2]
    assert np.isneginf(np.asarray(process_logits(x, SamplingParams(temperature=temperature)))[0]).all()
    # a bias ban that empties the row behaves the same
    banned = sample(jnp.zeros((1, 3)), SamplingParams(logit_bias={0: NEG, 1: NEG, 2: NEG}), KEY)
    assert banned.tolist() == [0]


def test_min_tokens_masking_the_only_finite_token_empties_the_row():
    x = jnp.asarray([[NEG, 3.0, NEG]])
    nothing_yet = jnp.full((1, 2), -1, jnp.int32)
    assert sample(x, SamplingParams(min_tokens=1), KEY, history=nothing_yet, eos_token_id=1).tolist() == [0]


def test_positive_infinity_shares_the_mass():
    x = jnp.asarray([[1.0, np.inf, 3.0, np.inf]] * 4000)
    tokens = np.asarray(sample(x, SamplingParams(temperature=0.7), KEY))
    assert set(tokens.tolist()) == {1, 3}
    assert abs(np.mean(tokens == 1) - 0.5) < 0.05
    assert int(sample(x[:1], SamplingParams(temperature=0.0), KEY)[0]) == 1


def test_bfloat16_logits_are_computed_in_float32():
    x32 = jax.random.normal(jax.random.key(5), (8, 1000)) * 4
    x16 = x32.astype(jnp.bfloat16)
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02)
    out16 = process_logits(x16, params)
    assert out16.dtype == jnp.float32
    np.testing.assert_array_equal(out16, process_logits(x16.astype(jnp.float32), params))
    np.testing.assert_array_equal(sample(x16, params, KEY), sample(x16.astype(jnp.float32), params, KEY))


@pytest.mark.parametrize("vocab", [1, 1000, 32000, 50257])
def test_any_vocabulary_size_and_ids_in_range(vocab):
    x = jax.random.normal(jax.random.key(vocab), (3, vocab))
    tokens = np.asarray(sample(x, SamplingParams(temperature=1.0, top_p=0.9), KEY))
    assert ((tokens >= 0) & (tokens < vocab)).all()


def test_traced_out_of_range_parameters_are_sanitised():
    x = jnp.asarray([[0.0, 2.0, 1.0, 1.5]])

    @jax.jit
    def run(t, k, p, mp, r):
        params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=r)
        return process_logits(x, params, history=jnp.asarray([[1]]))

    def kept(*args):
        return np.flatnonzero(np.asarray(run(*args))[0] > NEG).tolist()

    assert kept(-1.0, 0, 1.0, 0.0, 1.0) == [1]  # negative temperature -> greedy
    assert kept(jnp.nan, 0, 1.0, 0.0, 1.0) == [1]
    assert kept(1.0, -3, 1.0, 0.0, 1.0) == [0, 1, 2, 3]  # negative top_k -> off
    assert kept(1.0, 0, -0.5, 0.0, 1.0) == [1]  # top_p <= 0 keeps only the most probable
    assert kept(1.0, 0, jnp.nan, 0.0, 1.0) == [0, 1, 2, 3]
    assert kept(1.0, 0, 1.0, 7.0, 1.0) == [1]  # min_p clipped to 1
    np.testing.assert_array_equal(run(1.0, 0, 1.0, 0.0, -2.0), x)  # repetition <= 0 -> off


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sample(jnp.zeros((4,)), SamplingParams(), KEY), r"logits must be a \(B, V\) array"),
        (lambda: sample(jnp.zeros((2, 4), jnp.int32), SamplingParams(), KEY), "logits must be float32"),
        (lambda: sample(jnp.zeros((0, 4)), SamplingParams(), KEY), "at least one row"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(temperature=[1.0, 1.0, 1.0]), KEY), "3 per-row values"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(logit_bias={4: 1.0}), KEY), r"token id\(s\) \[4\] outside"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(logit_bias=np.zeros(5, np.float32)), KEY), r"shape \(V,\)"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(repetition_penalty=1.2), KEY), "history is None"),
        (
            lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, history=jnp.zeros((3, 2), jnp.int32)),
            r"history must be a \(B, L\)",
        ),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, history=jnp.zeros((2, 2))), "integer token ids"),
        (
            lambda: sample(
                jnp.zeros((2, 4)), SamplingParams(), KEY, history=jnp.zeros((2, 2), jnp.int32), prompt_len=3
            ),
            r"prompt_len must lie in \[0, L=2\]",
        ),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, prompt_len=1), "without history"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(min_tokens=1), KEY), "needs eos_token_id"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, eos_token_id=[1, 4]), r"\[4\] outside"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, eos_token_id=1.5), "eos_token_id must be"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), jax.random.split(KEY, 3)), "batch of 2 keys"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), jnp.zeros((3,), jnp.uint32)), "must be a PRNG key"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), None), "key is None"),
        (lambda: sample(jnp.zeros((2, 4)), SamplingParams(), KEY, impl="cuda"), "impl must be one of"),
        (lambda: sample(jnp.zeros((2, 4)), {"temperature": 1.0}, KEY), "params must be a SamplingParams"),
    ],
)
def test_bad_arguments_get_specific_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_greedy_needs_no_key():
    assert sample(jnp.asarray([[0.0, 1.0]]), SamplingParams(temperature=0.0), None).tolist() == [1]


@pytest.mark.parametrize("impl", list(registry.names()))
@pytest.mark.parametrize("top_k", [0, 5])
def test_min_p_one_keeps_exactly_the_maximum_on_every_impl(impl, top_k):
    """min_p = 1 keeps the tokens whose probability equals the largest: the maximum's relative weight must
    be exactly 1 (a fused multiply-add in `x / T - max` once left its rounding error there, and the
    maximum was dropped on about half the rows)."""
    logits = jax.random.normal(jax.random.key(0), (64, 1000)) * 3
    logits = logits.at[0, 7].set(logits[0].max())  # a tie at the maximum: both kept, either drawn
    params = SamplingParams(temperature=0.7, min_p=1.0, top_k=top_k)
    tokens = np.asarray(sample(logits, params, jax.random.key(1), impl=impl))
    is_max = np.asarray(logits)[np.arange(64), tokens] == np.asarray(logits).max(axis=1)
    assert is_max.all()
    kept = np.asarray(process_logits(logits, params, impl=impl)) > NEG
    assert (kept.sum(axis=1) == [2] + [1] * 63).all()


def test_the_reference_sorts_rows_largest_first_as_floats_compare():
    """`sort_descending` (int keys in the floats' order) gives `-np.sort(-x)`'s values: infinities, signed
    zeros, subnormals, the float32 extremes, ties."""
    from vsampler.core.reference import sort_descending

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3000)).astype(np.float32) * 3
    x[0, :50], x[1, :50] = -np.inf, np.inf
    x[2, :100], x[2, 100:200] = 0.0, -0.0
    x[3] = np.round(x[3])
    x[4, :10], x[4, 10:20] = np.float32(1e-45), np.float32(-1e-45)
    x[5, :20], x[5, 20:40] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    got = np.asarray(sort_descending(jnp.asarray(x)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, -np.sort(-x, axis=1))
