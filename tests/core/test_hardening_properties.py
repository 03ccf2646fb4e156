"""A property over extreme finite inputs: logits near the float32 limits, tiny and huge temperatures,
huge integers. On every implementation: the token lies in [0, V), it is the reference's, and no
log-prob is NaN. The stage set is fixed (`with_stages`), so each implementation compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsampler import SamplingParams, Stages, sample

B, V = 4, 40
F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)
EXTREME = [F32_MAX, -F32_MAX, 3e38, -3e38, 1e38, 2.5e38, 1e30, -1e30, 1.0, 0.0, -1.0, TINY, -TINY, 1e-30]
STAGES = Stages(top_k=True, top_p=True, min_p=True, greedy=True, random=True)

logits = st.lists(st.sampled_from(EXTREME), min_size=B * V, max_size=B * V).map(
    lambda v: np.asarray(v, np.float32).reshape(B, V)
)
rows = st.fixed_dictionaries(
    {
        "temperature": st.lists(
            st.sampled_from([0.0, TINY, 1e-30, 1e-3, 0.7, 1.0, 1e20, F32_MAX]), min_size=B, max_size=B
        ),
        "top_k": st.lists(st.sampled_from([0, 1, 2, V - 1, V, 2**31 - 1, 2**40, 2**62]), min_size=B, max_size=B),
        "top_p": st.lists(st.sampled_from([TINY, 1e-6, 0.5, 0.999, 1.0]), min_size=B, max_size=B),
        "min_p": st.lists(st.sampled_from([0.0, TINY, 0.5, 1.0]), min_size=B, max_size=B),
    }
)


def _params(values: dict) -> SamplingParams:
    arrays = {name: np.asarray(v, np.int64 if name == "top_k" else np.float32) for name, v in values.items()}
    return SamplingParams(**arrays).with_stages(STAGES)


def _check(impl: str, x: np.ndarray, values: dict, seed: int) -> None:
    params = _params(values)
    keys = jax.random.split(jax.random.key(seed), B)
    for mode in ("raw", "processed"):
        tokens, lp = sample(jnp.asarray(x), params, keys, logprobs=2, logprobs_mode=mode, impl=impl)
        tokens = np.asarray(tokens)
        assert ((tokens >= 0) & (tokens < V)).all()
        for values_ in (lp.token, lp.top):
            assert not np.isnan(np.asarray(values_)).any(), mode
    reference = np.asarray(sample(jnp.asarray(x), params, keys, impl="reference"))
    np.testing.assert_array_equal(tokens, reference)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=logits, values=rows, seed=st.integers(0, 2**31 - 1))
def test_extreme_inputs_on_xla(x, values, seed):
    _check("xla", x, values, seed)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas", "pallas-chunked", "pallas-triton"])
def test_extreme_inputs_on_the_kernel(impl):
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(x=logits, values=rows, seed=st.integers(0, 2**31 - 1))
    def prop(x, values, seed):
        _check(impl, x, values, seed)

    prop()
