"""Property tests of the reference against a plain numpy statement of the definitions, an HF Flax
cross-check, and a distribution test."""

import functools

import jax
import numpy as np
import pytest
import spec_numpy
from hypothesis import given
from hypothesis import strategies as st

from vsampler import SamplingParams, process_logits, sample
from vsampler.core import registry
from vsampler.tools import verification

VOCABS = (1, 7, 64, 129)
HISTORY_LEN = 6


@functools.partial(jax.jit, static_argnames="impl")
def _run(x, history, prompt_len, t, k, p, mp, r, pres, freq, ignore, key, impl="reference"):
    # traced parameters: every stage is active, so one compile per shape serves every example
    params = SamplingParams(
        temperature=t,
        top_k=k,
        top_p=p,
        min_p=mp,
        repetition_penalty=r,
        presence_penalty=pres,
        frequency_penalty=freq,
        prompt_ignore_length=ignore,
    )
    kwargs = {"history": history, "prompt_len": prompt_len}
    return process_logits(x, params, impl=impl, **kwargs), sample(x, params, key, impl=impl, **kwargs)


def _args(c):
    keys = ("x", "history", "prompt_len", "t", "k", "p", "mp", "r", "pres", "freq", "ignore")
    return (*(c[k] for k in keys), jax.random.key(c["seed"]))


@st.composite
def cases(draw):
    batch = draw(st.sampled_from((1, 3)))
    vocab = draw(st.sampled_from(VOCABS))
    grid = st.integers(-160, 160).map(lambda i: i / 8)  # exact ties and well-separated values
    value = st.one_of(grid, grid, grid, st.just(-np.inf))
    x = np.array(draw(st.lists(value, min_size=batch * vocab, max_size=batch * vocab)), np.float32)
    history = np.array(
        draw(st.lists(st.integers(-1, vocab + 1), min_size=batch * HISTORY_LEN, max_size=batch * HISTORY_LEN)), np.int32
    )

    def rows(strategy, dtype):
        return np.array(draw(st.lists(strategy, min_size=batch, max_size=batch)), dtype)

    return dict(
        x=x.reshape(batch, vocab),
        history=history.reshape(batch, HISTORY_LEN),
        prompt_len=rows(st.integers(0, HISTORY_LEN), np.int32),
        t=rows(st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0, 1.5, 2.0]), np.float32),
        k=rows(st.sampled_from([0, 1, 2, 3, 5, 10, 200]), np.int32),
        p=rows(st.sampled_from([0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0]), np.float32),
        mp=rows(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.33, 0.8]), np.float32),
        r=rows(st.sampled_from([1.0, 1.25, 2.0, 0.5]), np.float32),
        pres=rows(st.sampled_from([0.0, 0.5, -1.0, 2.0]), np.float32),
        freq=rows(st.sampled_from([0.0, 0.25, -0.5, 1.0]), np.float32),
        ignore=rows(st.sampled_from([0, 0, 1, 2, HISTORY_LEN, 2**31 - 1]), np.int32),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(cases())
def test_reference_matches_the_numpy_definition(case):
    c = case
    out, tokens = _run(*_args(c))
    out, tokens = np.asarray(out), np.asarray(tokens)
    batch, vocab = c["x"].shape
    for i in range(batch):
        x = spec_numpy.penalised(
            c["x"][i], c["history"][i], c["prompt_len"][i], c["r"][i], c["pres"][i], c["freq"][i], vocab, c["ignore"][i]
        )
        want, ambiguous = spec_numpy.kept(x, c["t"][i], c["k"][i], c["p"][i], c["mp"][i])
        got = out[i] > -np.inf
        clear = ~ambiguous
        np.testing.assert_array_equal(got[clear], want[clear], err_msg=f"row {i}")
        # the sampled token is in range, never a dropped token, and greedy is the argmax
        assert 0 <= tokens[i] < vocab
        if got.any():
            assert got[tokens[i]]
        else:
            assert tokens[i] == 0
        if c["t"][i] == 0:
            assert tokens[i] == (int(np.argmax(x)) if np.isfinite(x).any() else 0)
            if got.any():
                assert out[i, tokens[i]] == x[tokens[i]]
        elif got.any():
            np.testing.assert_allclose(out[i][got], (x / c["t"][i])[got], rtol=1e-6)


@pytest.mark.parametrize("impl", list(registry.names(fast=True)))
@given(case=cases())
def test_fast_paths_equal_the_reference_on_random_inputs(impl, case):
    want, want_tokens = _run(*_args(case))
    got, tokens = _run(*_args(case), impl=impl)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))


# ------------------------------------------------------------------------------- HF Flax cross-check


@pytest.fixture(scope="module")
def hf_warpers():
    flax_lp = pytest.importorskip("transformers.generation.flax_logits_process")
    return flax_lp


@pytest.mark.parametrize("vocab", [50, 1000])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 10, 1.0), (0.8, 0, 0.9), (1.3, 20, 0.6)]
)
def test_kept_sets_agree_with_hf_flax_warpers(hf_warpers, vocab, temperature, top_k, top_p):
    # distinct values: HF keeps exactly k (no ties) and its top-p shift rule equals "mass above < p"
    logits = jax.random.normal(jax.random.key(vocab), (4, vocab)) * 3
    scores = logits
    for warper in (
        [hf_warpers.FlaxTemperatureLogitsWarper(temperature)]
        + ([hf_warpers.FlaxTopKLogitsWarper(top_k)] if top_k else [])
        + ([hf_warpers.FlaxTopPLogitsWarper(top_p)] if top_p < 1 else [])
    ):
        scores = warper(None, scores, 0)
    ours = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.asarray(ours) > -np.inf, np.asarray(scores) > -np.inf)
    kept = np.asarray(ours) > -np.inf
    np.testing.assert_allclose(np.asarray(ours)[kept], np.asarray(scores)[kept], rtol=1e-6)


# ---------------------------------------------------------------------------------- distribution test


@pytest.mark.statistics
@pytest.mark.parametrize("name", list(verification.DISTRIBUTION_PARAMS))
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_empirical_frequencies_match_the_renormalised_distribution(name, impl):
    tv, bound, dropped_drawn = verification.distribution(impl, name)
    assert not dropped_drawn
    assert tv < bound, (tv, bound)
