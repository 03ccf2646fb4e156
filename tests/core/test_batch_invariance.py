"""Per-request keys make a request's token independent of its batch: alone, at row 5 of 8 and at row 37 of
64 (beside requests with other parameters), every implementation gives it the same token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vsampler import SamplingParams, sample
from vsampler.core import registry

V = 32000
FIELDS = {
    "temperature": (np.float32, [0.0, 0.7, 1.0, 1.3]),
    "top_k": (np.int32, [0, 1, 40, 500]),
    "top_p": (np.float32, [1.0, 0.9, 0.5]),
    "min_p": (np.float32, [0.0, 0.05]),
    "repetition_penalty": (np.float32, [1.0, 1.2]),
    "presence_penalty": (np.float32, [0.0, 0.5]),
}


def batch(size: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, jax.Array]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((size, V)) * 3).astype(np.float32)
    params = {name: rng.choice(np.asarray(values, dtype), size) for name, (dtype, values) in FIELDS.items()}
    history = rng.integers(0, V, (size, 24)).astype(np.int32)
    keys = jax.random.split(jax.random.key(seed), size)
    return logits, params, history, keys


REQUEST = batch(1, seed=99)
REQUEST[1]["temperature"][0], REQUEST[1]["top_k"][0], REQUEST[1]["top_p"][0] = 0.9, 50, 0.8


def with_request(size: int, row: int):
    logits, params, history, keys = batch(size, seed=size)
    r_logits, r_params, r_history, r_keys = REQUEST
    logits[row], history[row] = r_logits[0], r_history[0]
    for name in params:
        params[name][row] = r_params[name][0]
    return logits, params, history, keys.at[row].set(r_keys[0])


@pytest.mark.parametrize("impl", list(registry.names()))
def test_a_request_gets_the_same_token_alone_in_8_and_in_64(impl):
    tokens = []
    for size, row in ((1, 0), (8, 5), (64, 37)):
        logits, params, history, keys = with_request(size, row)
        out = sample(logits, SamplingParams(**params), keys, history=history, prompt_len=8, impl=impl)
        tokens.append(int(out[row]))
    assert tokens[0] == tokens[1] == tokens[2]
    # and the request's token is not a constant: other keys give other tokens
    logits, params, history, _ = REQUEST
    others = {
        int(sample(logits, SamplingParams(**params), jax.random.key(s)[None], history=history, prompt_len=8)[0])
        for s in range(8)
    }
    assert len(others) > 1
