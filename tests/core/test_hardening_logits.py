"""Logits at the float32 limits: `x / T` beyond the float32 range has a defined result (the argmax-like
limit: the row samples among its maxima, uniformly over ties), the same on every implementation, and
never a NaN log-prob."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams, process_logits, sample
from vsampler.core.numerics import SCALE_CAP, inverse_temperature

F32_MAX = float(np.finfo(np.float32).max)
KEYS = jax.random.split(jax.random.key(0), 8)
IMPLS = ["reference", "xla", "pallas", "pallas-chunked", "pallas-triton"]

ROWS = np.array(
    [
        [2.5e38, 2e38, 0.0, -1.0],  # the row: token 0 only
        [-3e38, -3.1e38, -3.3e38, -F32_MAX],  # every value overflows to -inf at T = 0.5
        [1e38, 1e38, 5.0, -F32_MAX],  # two tied maxima share the mass
        [F32_MAX, F32_MAX / 2, 0.0, -F32_MAX],
        [1.0, 0.5, 0.0, -1.0],  # an ordinary row, for contrast
        [0.0, -1e38, -2e38, -3e38],  # a zero maximum
        [3e38, 3e38, 3e38, 3e38],  # all tied
        [-np.inf, 2e38, -np.inf, 1.9e38],
    ],
    np.float32,
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1e-3, 1.2e-38])
def test_overflow_after_temperature_samples_the_maxima_and_never_gives_nan(impl, temperature):
    params = SamplingParams(temperature=temperature)
    x = jnp.asarray(ROWS)
    maxima = [set(np.flatnonzero(row == row.max()).tolist()) for row in ROWS]
    for mode in ("raw", "processed"):
        for seed in range(3):
            keys = jax.random.split(jax.random.key(seed), len(ROWS))
            tokens, lp = sample(x, params, keys, logprobs=2, logprobs_mode=mode, impl=impl)
            tokens = np.asarray(tokens)
            for row in (0, 1, 2, 3, 5, 6, 7):
                assert tokens[row] in maxima[row], (row, tokens[row])
            for values in (lp.token, lp.top):
                assert not np.isnan(np.asarray(values)).any()
            ref = sample(x, params, keys, impl="reference")
            np.testing.assert_array_equal(tokens, np.asarray(ref))


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_process_logits_stays_finite_at_the_maxima(impl):
    warped = np.asarray(process_logits(jnp.asarray(ROWS), SamplingParams(temperature=0.5), impl=impl))
    for row, values in zip(ROWS, warped, strict=True):
        at_max = row == row.max()
        assert np.isfinite(values[at_max]).all()
        assert not np.isnan(values).any()
    np.testing.assert_array_equal(
        warped, np.asarray(process_logits(jnp.asarray(ROWS), SamplingParams(temperature=0.5), impl="reference"))
    )


def test_the_cap_acts_only_beyond_half_the_float32_range():
    t = jnp.array([0.5, 0.5, 1.0, 0.0, 2.0], jnp.float32)
    x_max = jnp.array([1.0, 2.5e38, 3e38, 3e38, -jnp.inf], jnp.float32)
    inv = np.asarray(inverse_temperature(t, x_max))
    assert inv[0] == 2.0  # ordinary: 1 / T exactly
    assert inv[1] == np.float32(SCALE_CAP) / np.float32(2.5e38)  # capped: x_max / T would pass F32_MAX
    assert inv[2] == np.float32(SCALE_CAP) / np.float32(3e38)  # |x_max| / T > F32_MAX / 2: capped
    assert inv[3] == 1.0  # greedy keeps 1
    assert inv[4] == 0.5  # an empty row
    assert np.isfinite(np.float32(2.5e38) * inv[1])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_huge_temperatures_and_bias_near_the_limits(impl):
    x = jnp.asarray(ROWS)
    for params in (
        SamplingParams(temperature=3e38),
        SamplingParams(temperature=0.7, logit_bias={0: -3e38, 1: 3e38}),
        SamplingParams(temperature=0.7, repetition_penalty=3e38),
    ):
        tokens = np.asarray(sample(x, params, KEYS, history=np.zeros((8, 2), np.int32), impl=impl))
        assert ((tokens >= 0) & (tokens < 4)).all()
        np.testing.assert_array_equal(
            tokens, np.asarray(sample(x, params, KEYS, history=np.zeros((8, 2), np.int32), impl="reference"))
        )
