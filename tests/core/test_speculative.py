"""Speculative verification (`verify_draft`): greedy keeps exactly the prefix matching the target's argmax,
and every emitted token is distributed as the target's warped distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams, process_logits
from vsampler.core.speculative import verify_draft

IMPLS = ["reference", "xla", "pallas"]


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_keeps_exactly_the_prefix_that_matches_the_target_argmax(impl):
    b, k, v = 4, 4, 300
    logits = jax.random.normal(jax.random.key(0), (b, k + 1, v)) * 3
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    draft = argmax[:, :k].copy()
    matched = [0, 2, 4, 1]  # row r's draft agrees with the target on its first matched[r] tokens
    for r, m in enumerate(matched):
        if m < k:
            draft[r, m] = (argmax[r, m] + 1) % v
    params = SamplingParams(temperature=0.0)
    for probs in (None, jax.nn.softmax(jax.random.normal(jax.random.key(1), (b, k, v)), axis=-1)):
        out, n = verify_draft(logits, draft, probs, params, jax.random.key(2), impl=impl)
        assert np.asarray(n).tolist() == matched
        out = np.asarray(out)
        for r, m in enumerate(matched):
            assert out[r, :m].tolist() == draft[r, :m].tolist()
            assert out[r, m] == argmax[r, m]  # the target's own choice at the first disagreement (or bonus)
            assert (out[r, m + 1 :] == -1).all()


def target_distribution(logits, params, impl):
    """The warped distribution at each position, without penalties (so no history dependence)."""
    b, positions, v = logits.shape
    warped = process_logits(logits.reshape(-1, v), params, impl=impl).reshape(b, positions, v)
    return np.asarray(jax.nn.softmax(warped, axis=-1))


@pytest.mark.statistics
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stochastic_draft", [True, False])
def test_emitted_tokens_follow_the_target_distribution(impl, stochastic_draft):
    n, k, v = 20000, 2, 6
    base = jnp.asarray(
        [[1.0, 0.5, 0.2, -0.3, 2.0, 0.0], [0.3, 1.5, -1.0, 0.8, 0.1, 0.4], [0.0, 0.2, 0.9, 0.1, 1.2, -0.5]]
    )
    logits = jnp.broadcast_to(base, (n, k + 1, v))
    params = SamplingParams(temperature=0.8, top_k=5)
    p = target_distribution(logits[:1], params, impl)[0]  # (K + 1, V)
    rng = np.random.default_rng(0)
    if stochastic_draft:
        q = np.array([[0.4, 0.1, 0.1, 0.1, 0.2, 0.1], [0.05, 0.05, 0.3, 0.3, 0.2, 0.1]], np.float32)
        draft = np.stack([rng.choice(v, n, p=q[j]) for j in range(k)], axis=1)
        probs = jnp.broadcast_to(jnp.asarray(q), (n, k, v))
    else:
        draft = np.stack([rng.choice(v, n) for _ in range(k)], axis=1)  # whatever the draft proposes
        probs = None
    keys = jax.random.split(jax.random.key(3), n)
    out, accepted = verify_draft(logits, draft, probs, params, keys, impl=impl)
    out, accepted = np.asarray(out), np.asarray(accepted)
    bound = 4 * np.sqrt(v / n)  # total-variation noise at n draws, generously
    first = np.bincount(out[:, 0], minlength=v) / n
    assert 0.5 * np.abs(first - p[0]).sum() < bound
    dropped = p[0] == 0
    assert dropped.sum() == 1 and (first[dropped] == 0).all()  # top-k's dropped token is never emitted
    reached = accepted >= 1  # rows whose position 1 was emitted (accepted draft or drawn by the target)
    second = np.bincount(out[reached, 1], minlength=v) / reached.sum()
    assert 0.5 * np.abs(second - p[1]).sum() < bound * np.sqrt(n / reached.sum())
    assert 0 < accepted.mean() < k  # the test exercises acceptance, rejection and bonus tokens
    assert (accepted == k).any() and (accepted == 0).any()


def test_penalties_see_the_draft_tokens_before_each_position():
    b, k, v = 2, 3, 50
    logits = jnp.zeros((b, k + 1, v)).at[:, :, 7].set(2.0).at[:, :, 9].set(1.9)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    history = jnp.full((b, 4), -1, jnp.int32).at[:, 0].set(3)
    draft = jnp.asarray([[7, 9, 9], [7, 7, 9]])
    out, n = verify_draft(logits, draft, None, params, jax.random.key(0), history=history, prompt_len=4)
    # position 0: argmax 7 (accepted); position 1: 7 is penalised (2.0 / 2 = 1.0 < 1.9): 9
    # row 0 drafted 9 at position 1: accepted; position 2: 7 and 9 both penalised (1.0 vs 0.95): 7 != 9
    assert np.asarray(n).tolist() == [2, 1]
    assert np.asarray(out).tolist() == [[7, 9, 7, -1], [7, 9, -1, -1]]


def test_bad_shapes_are_named():
    logits = jnp.zeros((2, 3, 10))
    with pytest.raises(ValueError, match=r"draft_tokens must be \(B, K\)"):
        verify_draft(logits, jnp.zeros((2, 3), jnp.int32), None, SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"draft_probs must be \(B, K, V\)"):
        verify_draft(logits, jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2, 9)), SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_draft(logits, jnp.full((2, 2), 10), None, SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"target_logits must be \(B, K \+ 1, V\)"):
        verify_draft(logits[0], jnp.zeros((2, 2), jnp.int32), None, SamplingParams(), jax.random.key(0))
