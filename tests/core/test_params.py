"""SamplingParams: defaults, validation at construction, stages, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsampler
from vsampler import SamplingParams, Stages


def test_defaults_match_easydel():
    p = SamplingParams()
    assert (p.max_tokens, p.min_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 0, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.logit_bias) == (1.0, 0.0, 0.0, None)
    assert p.stages == Stages(random=True)  # the default top_k=0 means "off", never greedy
    assert p.prompt_ignore_length == 0  # vsampler's own field: the whole prompt counts, as EasyDeL's does


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be a finite float >= 0"),
        ("temperature", float("nan"), "temperature"),
        ("temperature", float("inf"), "temperature"),
        ("top_p", 0.0, r"top_p must be a float in \(0, 1\]"),
        ("top_p", 1.5, "top_p"),
        ("min_p", -0.01, r"min_p must be a float in \[0, 1\]"),
        ("min_p", 1.01, "min_p"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("top_k", True, "boolean"),
        ("repetition_penalty", 0.0, "repetition_penalty must be a finite float > 0"),
        ("presence_penalty", 2.5, r"presence_penalty must be a float in \[-2, 2\]"),
        ("frequency_penalty", -3.0, "frequency_penalty"),
        ("max_tokens", 0, "max_tokens must be an integer >= 1"),
        ("min_tokens", -1, "min_tokens must be an integer >= 0"),
        ("prompt_ignore_length", -1, "prompt_ignore_length must be an integer >= 0"),
        ("prompt_ignore_length", 1.5, "prompt_ignore_length must be an integer"),
    ],
)
def test_invalid_scalar_names_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_invalid_row_value_names_the_row():
    with pytest.raises(ValueError, match=r"top_p must be .* got 0\.0 at row 2"):
        SamplingParams(top_p=np.array([0.5, 1.0, 0.0]))


def test_per_row_lengths_must_agree():
    with pytest.raises(ValueError, match="disagree on the batch size"):
        SamplingParams(temperature=[0.5, 0.7], top_k=[1, 2, 3])


def test_rank_two_parameter_rejected():
    with pytest.raises(ValueError, match=r"scalar or a \(B,\) array"):
        SamplingParams(temperature=np.ones((2, 2)))


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match=r"min_tokens .* must be <= max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=[1, 9], max_tokens=[4, 8])


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({-1: 1.0}, "keys must be token ids"),
        ({"a": 1.0}, "keys must be token ids"),
        ({3: float("nan")}, r"logit_bias\[3\] must be finite or -inf"),
        ({3: float("inf")}, r"logit_bias\[3\]"),
        (np.zeros((2, 3, 4), np.float32), r"mapping \{token_id: bias\} or a float \(V,\) or \(B, V\)"),
        (np.array([0.0, np.nan], np.float32), r"NaN or \+inf"),
    ],
)
def test_invalid_logit_bias(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_stages_follow_values():
    s = SamplingParams(temperature=[0.0, 0.7], top_k=[0, 5], repetition_penalty=1.0, min_p=0.1).stages
    assert s.greedy and s.random and s.top_k and s.min_p
    assert not (s.top_p or s.repetition or s.presence or s.frequency or s.logit_bias or s.min_tokens)
    assert SamplingParams(temperature=0.0).stages.random is False


def test_pytree_leaves_are_values_and_stages_are_static():
    p = SamplingParams(temperature=0.7, top_k=50, logit_bias={5: -1.0})
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 11  # ten numeric fields + the one bias value
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    assert q.stages == p.stages and q.temperature == 0.7
    same = SamplingParams(temperature=0.9, top_k=20, logit_bias={5: 2.0})
    assert jax.tree_util.tree_structure(same) == treedef
    other = SamplingParams(temperature=0.9, top_k=0, logit_bias={5: 2.0})
    assert jax.tree_util.tree_structure(other) != treedef  # top-k switched off: a different program


def test_new_values_never_recompile():
    from vsampler.core import sampling

    logits = jax.random.normal(jax.random.key(0), (3, 257))
    key = jax.random.key(1)
    before = sampling._sample_jit._cache_size()
    for t, k, p in [(0.7, 5, 0.9), (1.3, 17, 0.5), (0.2, 300, 0.99)]:
        vsampler.sample(logits, SamplingParams(temperature=t, top_k=k, top_p=p), key, impl="reference")
    assert sampling._sample_jit._cache_size() == before + 1
    for rows in ([0.5, 0.6, 0.7], [1.0, 2.0, 0.1]):
        vsampler.sample(logits, SamplingParams(temperature=np.array(rows), top_k=5, top_p=0.9), key, impl="reference")
    assert sampling._sample_jit._cache_size() == before + 2  # per-row arrays: one new shape, then none


def test_params_can_be_built_from_traced_values():
    @jax.jit
    def f(t):
        return SamplingParams(temperature=t, top_p=t / 2).temperature * 2

    assert float(f(jnp.float32(0.5))) == 1.0
