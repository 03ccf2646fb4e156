"""A serving step that calls `sample` inside its own `jax.jit`: with the stage set fixed once
(`SamplingParams.with_stages`), a batch whose mix changes every step (no greedy row any more, every top_k
0, min-p on or off) compiles once and samples exactly the tokens the per-mix stage sets give."""

import jax
import numpy as np
import pytest

from vsampler import SamplingParams, Stages, sample

SERVING = Stages(top_k=True, top_p=True, min_p=True, greedy=True, random=True)
B, V = 4, 3000
MIXES = [  # (temperature, top_k, top_p, min_p) per row
    ([0.0, 0.7, 1.0, 0.8], [0, 50, 0, 5], [0.9, 1.0, 0.8, 1.0], [0.0, 0.0, 0.05, 0.0]),
    ([0.7, 0.7, 0.7, 0.7], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]),  # temperature only
    ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]),  # all greedy
    ([1.0, 1.3, 0.5, 0.9], [3, 7, 1, 40], [0.5, 0.95, 1.0, 0.7], [0.1, 0.0, 0.2, 0.0]),
]


def params_of(mix) -> SamplingParams:
    t, k, p, m = mix
    f32 = np.float32
    return SamplingParams(
        temperature=np.array(t, f32), top_k=np.array(k, np.int32), top_p=np.array(p, f32), min_p=np.array(m, f32)
    )


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_a_fixed_stage_set_compiles_once_while_the_batch_mix_changes(impl):
    logits = jax.random.normal(jax.random.key(0), (B, V)) * 3
    keys = jax.random.split(jax.random.key(1), B)
    step = jax.jit(lambda x, params, k: sample(x, params, k, impl=impl))
    stage_sets = set()
    for i, mix in enumerate(MIXES):
        params = params_of(mix)
        stage_sets.add(params.stages)
        tokens = step(logits, params.with_stages(SERVING), keys)
        np.testing.assert_array_equal(tokens, sample(logits, params, keys, impl=impl), err_msg=f"mix {i}")
    assert len(stage_sets) == len(MIXES)  # without the fixed set each mix would be its own program
    assert step._cache_size() == 1


def test_with_stages_refuses_a_set_that_leaves_a_needed_stage_off():
    params = params_of(MIXES[0])
    with pytest.raises(ValueError, match=r"need the stages \['top_k'"):
        params.with_stages(Stages(top_p=True, min_p=True, greedy=True, random=True))
    with pytest.raises(ValueError, match="logit_bias must be True exactly when a logit_bias is set"):
        params.with_stages(Stages(**{**SERVING.__dict__, "logit_bias": True}))
    with pytest.raises(ValueError, match=r"takes a vsampler\.Stages"):
        params.with_stages({"top_k": True})
    fixed = params.with_stages(SERVING)
    assert fixed.stages == SERVING and np.array_equal(fixed.top_k, params.top_k)
    assert SERVING.covers(params.stages) and (params.stages | SERVING) == SERVING
