"""`sample(..., logprobs=n)`: the reference against a plain numpy statement of the definition, every fast
path against the reference in both modes, and the edges (greedy, empty rows, finished rows, bad input)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grid import EOS, Case, check, history, logits, params

from vsampler import SamplingParams, process_logits, sample, sample_step
from vsampler.core import registry
from vsampler.core.logprobs import MAX_LOGPROBS
from vsampler.tools.verification import logprobs_close

FAST = list(registry.names(fast=True))


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    out = np.full(rows.shape, -np.inf)
    for r, row in enumerate(rows.astype(np.float64)):
        finite = row > -np.inf
        if finite.any():
            m = row[finite].max()
            out[r, finite] = row[finite] - m - np.log(np.exp(row[finite] - m).sum())
    return out


def test_reference_is_the_definition():
    x = logits("ties", 8, 1000, "float32")
    sampling = params("heterogeneous", 8, 1000)
    hist, prompt = history(8, 1000)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": EOS, "impl": "reference"}
    key = jax.random.split(jax.random.key(0), 8)
    tokens = np.asarray(sample(x, sampling, key, **kw))
    # the penalised logits are process_logits of the same params at temperature 1 without filters
    unfiltered = SamplingParams(
        temperature=1.0,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        prompt_ignore_length=sampling.prompt_ignore_length,
    )
    penalised = np.asarray(process_logits(x, unfiltered, **kw))
    order = np.argsort(-penalised, axis=1, kind="stable")[:, :6]
    for mode, distribution in (("raw", penalised), ("processed", np.asarray(process_logits(x, sampling, **kw)))):
        got_tokens, lp = sample(x, sampling, key, logprobs=6, logprobs_mode=mode, **kw)
        want = _log_softmax(distribution)
        assert np.array_equal(np.asarray(got_tokens), tokens)
        assert np.array_equal(np.asarray(lp.top_ids), order)
        assert logprobs_close(lp.top, np.take_along_axis(want, order, axis=1))
        assert logprobs_close(lp.token, want[np.arange(8), tokens])
        # rank: how many tokens are at least as likely as the sampled one (vLLM's selected_token_ranks)
        want_rank = np.sum(want >= want[np.arange(8), tokens][:, None], axis=1)
        assert np.asarray(lp.rank).tolist() == want_rank.tolist()
    greedy_rows = np.asarray(sampling.temperature) == 0
    _, lp = sample(x, sampling, key, logprobs=3, logprobs_mode="processed", **kw)
    assert np.all(np.asarray(lp.token)[greedy_rows] == 0.0)  # a greedy row's token is certain
    assert np.all(np.asarray(lp.rank)[greedy_rows] == 1)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_token_rank_by_hand(impl):
    """Ties count against the token (vLLM's >=); a greedy row is rank 1 in the processed distribution,
    and in the raw one ranks behind the tokens tied with it."""
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0, -jnp.inf]] * 2)
    greedy = SamplingParams(temperature=0.0)
    for mode, want in (("raw", 2), ("processed", 1)):
        tokens, lp = sample(x, greedy, None, logprobs=1, logprobs_mode=mode, impl=impl)
        assert np.asarray(tokens).tolist() == [1, 1] and np.asarray(lp.rank).tolist() == [want, want]
    # sampled rows: top-k 3 keeps {1, 2, 3}; whatever is drawn, its rank is fixed by its logit
    keys = jax.random.split(jax.random.key(0), 64)
    x = jnp.broadcast_to(jnp.asarray([1.0, 3.0, 3.0, 2.0, -jnp.inf]), (64, 5))
    by_token = {"raw": {0: 4, 1: 2, 2: 2, 3: 3}, "processed": {1: 2, 2: 2, 3: 3}}
    for mode, table in by_token.items():
        tokens, lp = sample(x, SamplingParams(top_k=3), keys, logprobs=0, logprobs_mode=mode, impl=impl)
        assert set(np.asarray(tokens).tolist()) == {1, 2, 3}
        assert np.asarray(lp.rank).tolist() == [table[t] for t in np.asarray(tokens).tolist()]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(
    ("kind", "config", "masked"),
    [
        ("normal", "heterogeneous", False),
        ("ties", "combined", False),
        ("one_finite", "heterogeneous", True),
        ("nan", "top_p", False),
        ("normal", "greedy", False),
    ],
)
def test_both_modes_equal_reference(impl, kind, config, masked):
    result = check(impl, Case(kind, config, 8, 1000, "float32", masked))
    assert result.logprobs_equal and result.ok


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_both_modes_equal_reference_at_serving_size(impl):
    result = check(impl, Case("normal", "heterogeneous", 64, 128256, "bfloat16"))
    assert result.logprobs_equal and result.ok


@pytest.mark.parametrize("impl", ["reference", *FAST])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_top_entries_of_any_width_and_edge_rows(impl, n):
    x = jax.random.normal(jax.random.key(3), (4, 300)) * 2
    x = x.at[1].set(-jnp.inf)  # empty row
    x = x.at[2].set(jnp.round(x[2]))  # ties: lower id first
    x = x.at[3, 17].set(jnp.inf)  # a +inf token takes all the mass
    sampling = SamplingParams(temperature=np.array([0.9, 0.9, 0.0, 1.0], np.float32), top_k=20)
    for mode in ("raw", "processed"):
        tokens, lp = sample(x, sampling, jax.random.key(4), logprobs=n, logprobs_mode=mode, impl=impl)
        want_tokens, want = sample(x, sampling, jax.random.key(4), logprobs=n, logprobs_mode=mode, impl="reference")
        assert lp.top_ids.shape == (4, n) and lp.top.shape == (4, n) and lp.token.shape == (4,)
        assert np.array_equal(np.asarray(tokens), np.asarray(want_tokens))
        assert np.array_equal(np.asarray(lp.top_ids), np.asarray(want.top_ids))
        assert logprobs_close(lp.top, want.top) and logprobs_close(lp.token, want.token)
        assert np.all(np.asarray(lp.top)[1] == -np.inf) and np.asarray(lp.token)[1] == -np.inf
        assert np.asarray(lp.token)[3] == 0.0 and np.asarray(tokens)[3] == 17
        assert np.array_equal(np.asarray(lp.rank), np.asarray(want.rank)), mode
        assert np.asarray(lp.rank)[1] == 300 and np.asarray(lp.rank)[3] == 1  # empty row: V; +inf: certain


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sample_step_reports_finished_rows_as_certain_pads(impl):
    x = jax.random.normal(jax.random.key(5), (3, 500))
    sampling = SamplingParams(temperature=0.8, top_p=0.9)
    finished = jnp.array([False, True, False])
    kw = {"logprobs": 4, "logprobs_mode": "processed"}
    tokens, done, lp = sample_step(x, sampling, jax.random.key(6), finished=finished, pad_token_id=499, impl=impl, **kw)
    want_tokens, want = sample(x, sampling, jax.random.key(6), logprobs=4, logprobs_mode="processed", impl="reference")
    assert np.asarray(tokens)[1] == 499 and np.asarray(done).tolist() == [False, True, False]
    assert np.asarray(lp.token)[1] == 0.0 and np.all(np.asarray(lp.top_ids)[1] == 499)
    assert np.asarray(lp.rank)[1] == 1
    assert np.array_equal(np.asarray(lp.rank)[[0, 2]], np.asarray(want.rank)[[0, 2]])
    assert np.all(np.asarray(lp.top)[1] == -np.inf)
    live = [0, 2]
    assert np.array_equal(np.asarray(tokens)[live], np.asarray(want_tokens)[live])
    assert logprobs_close(np.asarray(lp.top)[live], np.asarray(want.top)[live])


def test_bad_requests_are_refused_with_the_argument_named():
    x = jnp.zeros((2, 50))
    key = jax.random.key(0)
    for bad in (-1, MAX_LOGPROBS + 1, True, 2.0):
        with pytest.raises(ValueError, match=r"logprobs must be an int in \[0, 64\]"):
            sample(x, SamplingParams(), key, logprobs=bad)
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        sample(x, SamplingParams(), key, logprobs=2, logprobs_mode="softmax")
    with pytest.raises(ValueError, match="more top entries than the vocabulary has"):
        sample(jnp.zeros((2, 8)), SamplingParams(), key, logprobs=9)
    with pytest.raises(ValueError, match="logprobs cannot be combined with vocab_axis"):
        sample(x, SamplingParams(), key, logprobs=2, vocab_axis="tp")


def test_the_reference_orders_top_entries_as_a_stable_descending_sort():
    """The spec's top entries: largest penalised logit first, equal values (-0.0 equals 0.0) lower id
    first, -inf entries last."""
    x = jnp.array([[0.0, -0.0, 1.0, -jnp.inf, 1.0, -0.0, -jnp.inf, 0.5]], jnp.float32)
    want = np.argsort(-np.asarray(x), axis=1, kind="stable")
    assert want.tolist() == [[2, 4, 7, 0, 1, 5, 3, 6]]
    _, lp = sample(x, SamplingParams(temperature=0.0), jax.random.key(0), logprobs=8, impl="reference")
    assert np.asarray(lp.top_ids).tolist() == want.tolist()
