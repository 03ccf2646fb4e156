"""Tampered or truncated JSON never surfaces as a raw numpy / KeyError / RecursionError: a ValueError
naming the field's path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams
from vsampler.engine.state import SampleState


def _state() -> SampleState:
    return SampleState(
        current_length=jnp.array([3, 4], jnp.int32),
        sequences=jnp.arange(12, dtype=jnp.int32).reshape(2, 6),
        running_token=jnp.zeros((2, 1), jnp.int32),
        is_sequence_finished=jnp.zeros(2, bool),
        prng_key=jax.random.split(jax.random.key(0), 2),
        model_kwargs={},
    )


def _tamper(text: str, field: str, **changes) -> str:
    data = json.loads(text)
    data[field].update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"__array__": "%%%not base64%%%"}, "bad base64 data"),
        ({"__array__": "AAAA"}, "holds 3 bytes"),
        ({"dtype": "no_such_dtype"}, "unknown dtype"),
        ({"dtype": "object"}, "not a numeric array dtype"),
        ({"shape": [3, 7]}, "needs"),
        ({"shape": "x"}, "bad shape"),
        ({"shape": [-1, 12]}, "bad shape"),
    ],
)
def test_a_tampered_array_names_its_field(changes, message):
    text = _tamper(_state().to_json(), "sequences", **changes)
    with pytest.raises(ValueError, match=r"\$\.sequences") as e:
        SampleState.from_json(text)
    assert message in str(e.value)


def test_a_missing_array_key_names_its_field():
    data = json.loads(_state().to_json())
    del data["current_length"]["dtype"]
    with pytest.raises(ValueError, match=r"the value at \$\.current_length is malformed"):
        SampleState.from_json(json.dumps(data))


def test_deeply_nested_json_is_refused_not_a_recursion_error():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        SampleState.from_json(deep)


def test_an_intact_round_trip_is_exact():
    state = _state()
    back = SampleState.from_json(state.to_json())
    np.testing.assert_array_equal(back.sequences, state.sequences)
    params = SamplingParams(top_k=np.array([1, 2]), logit_bias={3: -np.inf})
    again = SamplingParams.from_json(params.to_json())
    assert again.top_k.tolist() == [1, 2] and again.logit_bias == {3: -np.inf}
