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


@pytest.mark.parametrize("bad", [-1, 100, 105])
def test_traced_draft_ids_outside_the_vocabulary_are_rejected_and_never_emitted(bad):
    b, k, v = 3, 2, 100
    logits = jnp.zeros((b, k + 1, v)).at[:, :, v - 1].set(5.0).at[:, :, 0].set(5.0)  # wrap/clamp targets have mass
    draft = jnp.asarray([[1, bad], [bad, 1], [bad, bad]])
    params = SamplingParams(temperature=1.0)
    for probs in (None, jnp.full((b, k, v), 1.0 / v)):
        fn = jax.jit(lambda lg, d, q, key: verify_draft(lg, d, q, params, key))
        for seed in range(8):
            out, n = (np.asarray(a) for a in fn(logits, draft, probs, jax.random.key(seed)))
            assert n[1] == 0 and n[2] == 0 and n[0] <= 1  # an invalid id is never accepted
            for r in range(b):
                emitted = out[r, : n[r] + 1]
                assert ((emitted >= 0) & (emitted < v)).all(), out
                assert (out[r, n[r] + 1 :] == -1).all()


def test_greedy_row_rejects_a_padded_draft_and_emits_the_target_argmax():
    logits = jnp.zeros((1, 3, 10)).at[0, :, 9].set(3.0)  # -1 would wrap to 9, the argmax
    out, n = jax.jit(lambda d: verify_draft(logits, d, None, SamplingParams(temperature=0.0), None))(
        jnp.asarray([[9, -1]])
    )
    assert np.asarray(n).tolist() == [1] and np.asarray(out).tolist() == [[9, 9, -1]]


def test_zero_draft_tokens_without_history():
    logits = jax.random.normal(jax.random.key(0), (2, 1, 20))
    no_draft = jnp.zeros((2, 0), jnp.int32)
    out, n = verify_draft(logits, no_draft, None, SamplingParams(temperature=0.0), jax.random.key(0))
    assert np.asarray(n).tolist() == [0, 0]
    assert np.asarray(out)[:, 0].tolist() == np.asarray(jnp.argmax(logits[:, 0], axis=-1)).tolist()
    with pytest.raises(ValueError, match="prompt_len was given without history"):
        verify_draft(logits, jnp.zeros((2, 0), jnp.int32), None, SamplingParams(), jax.random.key(0), prompt_len=1)


def test_key_none_on_an_all_greedy_batch_and_bad_keys():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 20))
    draft = jnp.asarray(jnp.argmax(logits[:, :2], axis=-1), jnp.int32)
    out, n = verify_draft(logits, draft, None, SamplingParams(temperature=0.0), None)
    assert np.asarray(n).tolist() == [2, 2]
    assert np.asarray(out).tolist() == np.asarray(jnp.argmax(logits, axis=-1)).tolist()
    with pytest.raises(ValueError, match="key is None but some row samples"):
        verify_draft(logits, draft, None, SamplingParams(temperature=np.array([0.0, 1.0])), None)
    for bad in (5, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0), 3)):
        with pytest.raises(ValueError, match="key must be"):
            verify_draft(logits, draft, None, SamplingParams(temperature=1.0), bad)


def test_float_draft_ids_are_refused():
    logits = jnp.zeros((1, 3, 10))
    with pytest.raises(ValueError, match="draft_tokens must hold integer token ids"):
        verify_draft(logits, jnp.asarray([[1.0, 2.0]]), None, SamplingParams(), jax.random.key(0))
    with pytest.raises(ValueError, match="draft_tokens must hold integer token ids"):
        jax.jit(lambda d: verify_draft(logits, d, None, SamplingParams(), jax.random.key(0)))(jnp.asarray([[1.0, 2.0]]))


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (np.log(np.full((1, 2, 10), 0.1)), "negative"),  # log-probabilities passed by mistake
        (np.full((1, 2, 10), np.nan), "finite"),
        (np.full((1, 2, 10), np.inf), "finite"),
        (np.full((1, 2, 10), 0.2), "sum to 1"),
        (np.zeros((1, 2, 10)), "sum to 1"),
        (np.zeros((1, 2, 10), np.int32), "float"),
    ],
)
def test_concrete_draft_probs_are_checked(probs, message):
    with pytest.raises(ValueError, match=f"draft_probs.*{message}"):
        verify_draft(jnp.zeros((1, 3, 10)), jnp.asarray([[1, 2]]), probs, SamplingParams(), jax.random.key(0))


def test_draft_probs_within_the_tolerance_are_accepted():
    q = np.full((1, 2, 10), 0.1, np.float32) * (1 + 0.9e-3)
    out, _ = verify_draft(jnp.zeros((1, 3, 10)), jnp.asarray([[1, 2]]), q, SamplingParams(), jax.random.key(0))
    assert ((np.asarray(out)[0, :1] >= 0) & (np.asarray(out)[0, :1] < 10)).all()


def test_traced_draft_probs_are_sanitised():
    """Log-probabilities traced in: no mass left, so the row counts as a deterministic draft, and a token
    the target gives probability 0 is never accepted (it was always accepted before)."""
    b, k, v = 64, 1, 10
    logits = jnp.zeros((b, k + 1, v)).at[:, :, 3].set(-jnp.inf)  # the target never emits token 3
    draft = jnp.full((b, k), 3, jnp.int32)
    log_q = jnp.log(jnp.full((b, k, v), 0.1))
    keys = jax.random.split(jax.random.key(0), b)
    out, n = jax.jit(lambda q: verify_draft(logits, draft, q, SamplingParams(temperature=1.0), keys))(log_q)
    assert (np.asarray(n) == 0).all() and (np.asarray(out)[:, 0] != 3).all()
    # unnormalised traced values are divided by their sum: same tokens as the normalised ones
    q = jax.nn.softmax(jax.random.normal(jax.random.key(1), (b, k, v)), axis=-1)
    fives = jnp.full((b, k), 5, jnp.int32)
    fn = jax.jit(lambda q: verify_draft(logits, fives, q, SamplingParams(temperature=1.0), keys))
    assert np.asarray(fn(q)[0]).tolist() == np.asarray(fn(4 * q)[0]).tolist()


def test_ragged_batches_keep_each_rows_own_drafts_and_bonus_position():
    """Row r proposes num_draft_tokens[r] drafts (padding -1 after them, as vLLM pads); greedy drafts that
    match the target are all kept and the bonus token comes from the row's own position n_r."""
    b, k, v = 3, 3, 40
    logits = jax.random.normal(jax.random.key(5), (b, k + 1, v)) * 3
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    n = np.array([3, 1, 0])
    draft = np.where(np.arange(k)[None, :] < n[:, None], argmax[:, :k], -1)
    out, accepted = verify_draft(logits, draft, None, SamplingParams(temperature=0.0), None, num_draft_tokens=n)
    assert np.asarray(accepted).tolist() == n.tolist()
    for r in range(b):
        assert np.asarray(out)[r].tolist() == [*argmax[r, : n[r] + 1].tolist(), *[-1] * (k - n[r])]


@pytest.mark.parametrize("stochastic_draft", [False, True])
def test_a_ragged_row_is_the_row_verified_with_its_own_k(stochastic_draft):
    """Same keys: a ragged row gives exactly the tokens of that row verified alone with K = n_r (also
    inside jax.jit, where the padding is traced)."""
    b, k, v = 4, 3, 30
    logits = jax.random.normal(jax.random.key(6), (b, k + 1, v))
    draft = jax.random.randint(jax.random.key(7), (b, k), 0, v)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(8), (b, k, v)), axis=-1) if stochastic_draft else None
    n = jnp.asarray([2, 0, 3, 1])
    params = SamplingParams(temperature=0.8, top_k=10)
    for seed in range(3):
        keys = jax.random.split(jax.random.key(seed), b)
        out, accepted = jax.jit(lambda d, n, keys: verify_draft(logits, d, probs, params, keys, num_draft_tokens=n))(
            jnp.where(jnp.arange(k)[None, :] < n[:, None], draft, -1), n, keys
        )
        for r in range(b):
            m = int(n[r])
            q = None if probs is None else probs[r : r + 1, :m]
            want, want_n = verify_draft(logits[r : r + 1, : m + 1], draft[r : r + 1, :m], q, params, keys[r : r + 1])
            assert int(accepted[r]) == int(want_n[0])
            assert np.asarray(out)[r, : m + 1].tolist() == np.asarray(want)[0].tolist()
            assert (np.asarray(out)[r, m + 1 :] == -1).all()


def test_num_draft_tokens_is_checked():
    logits, draft = jnp.zeros((2, 3, 10)), jnp.zeros((2, 2), jnp.int32)
    for bad, message in (
        (np.array([3, 0]), r"\[0, K=2\]"),
        (np.array([1]), r"\(2,\) integer"),
        (np.array([1.0, 1.0]), "integer"),
    ):
        with pytest.raises(ValueError, match=f"num_draft_tokens must.*{message}"):
            verify_draft(logits, draft, None, SamplingParams(), jax.random.key(0), num_draft_tokens=bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # a row's real drafts are still checked
        verify_draft(
            logits,
            jnp.asarray([[1, 10], [1, 1]]),
            None,
            SamplingParams(),
            jax.random.key(0),
            num_draft_tokens=np.array([2, 2]),
        )
    # padding past a row's drafts is never read, so -1 there is fine
    verify_draft(
        logits,
        jnp.asarray([[1, -1], [1, 1]]),
        None,
        SamplingParams(),
        jax.random.key(0),
        num_draft_tokens=np.array([1, 2]),
    )


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_allowed_tokens_hold_at_every_position_draft_and_bonus(impl):
    from vsampler import pack_allowed

    b, k, v = 32, 2, 64
    logits = jax.random.normal(jax.random.key(9), (b, k + 1, v))
    rng = np.random.default_rng(0)
    allowed = rng.random((b, k + 1, v)) < 0.3
    allowed[:, :, 5] = False  # the draft's token is never allowed: always rejected at position 0
    allowed[0, 0] = False  # row 0's first position allows nothing: it emits the first EOS id
    draft = jnp.full((b, k), 5, jnp.int32)
    keys = jax.random.split(jax.random.key(10), b)
    kw = {"allowed_tokens": pack_allowed(allowed.reshape(-1, v)).reshape(b, k + 1, -1), "eos_token_id": [7, 3]}
    out, accepted = verify_draft(logits, draft, None, SamplingParams(temperature=1.0), keys, impl=impl, **kw)
    out, accepted = np.asarray(out), np.asarray(accepted)
    assert (accepted == 0).all()
    assert out[0, 0] == 7
    assert all(allowed[r, 0, out[r, 0]] for r in range(1, b))
    # one (B, W) mask for every position: a draft the mask allows can be kept, and the bonus obeys it too
    flat = allowed[:, 1] | (np.arange(v) == 5)
    out, accepted = verify_draft(
        logits,
        draft,
        None,
        SamplingParams(temperature=1.0),
        keys,
        impl=impl,
        allowed_tokens=pack_allowed(flat),
        eos_token_id=[7],
    )
    out, accepted = np.asarray(out), np.asarray(accepted)
    for r in range(b):
        emitted = out[r, : accepted[r] + 1]
        assert all(flat[r, t] for t in emitted)
    with pytest.raises(ValueError, match="allowed_tokens needs eos_token_id"):
        verify_draft(logits, draft, None, SamplingParams(), keys, allowed_tokens=pack_allowed(flat))
    with pytest.raises(ValueError, match=r"allowed_tokens must be \(B, ceil\(V / 32\)\)"):
        verify_draft(logits, draft, None, SamplingParams(), keys, allowed_tokens=pack_allowed(flat)[:1], eos_token_id=7)
