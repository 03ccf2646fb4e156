"""Per-request stop ids: `eos_token_id` as a (B, S) array (-1 = padding), each row's `min_tokens` mask,
finished rule and empty-row token on its own ids; the kernel implementations run such calls on xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grid import history, logits

from vsampler import SamplingParams, pack_allowed, process_logits, sample, sample_step, verify_draft

IMPLS = ["reference", "xla", "pallas"]
STOPS = np.array([[2, -1], [5, 9], [-1, -1]])  # row 2 has no stop id


def peaked():
    x = np.zeros((3, 12), np.float32)
    x[:, 2], x[:, 5], x[:, 9], x[:, 7] = 4.0, 3.0, 2.0, 1.0
    return jnp.asarray(x)


@pytest.mark.parametrize("impl", IMPLS)
def test_min_tokens_masks_each_rows_own_stop_ids(impl):
    params = SamplingParams(temperature=0.0, min_tokens=1)
    none_yet = jnp.full((3, 4), -1, jnp.int32)  # min_tokens counts generated tokens: none so far
    tokens = np.asarray(sample(peaked(), params, None, history=none_yet, eos_token_id=STOPS, impl=impl))
    assert tokens.tolist() == [5, 2, 2]  # row 0 loses 2; row 1 loses 5 and 9 (2 is not its stop id)
    warped = np.asarray(
        process_logits(peaked(), SamplingParams(min_tokens=1), history=none_yet, eos_token_id=STOPS, impl=impl)
    )
    assert (
        np.isneginf(warped[0, 2]) and np.isneginf(warped[1, [5, 9]]).all() and np.isfinite(warped[2, [2, 5, 9]]).all()
    )
    assert np.isfinite(warped[0, [5, 9]]).all() and np.isfinite(warped[1, 2])
    traced = jax.jit(lambda e: sample(peaked(), params, None, history=none_yet, eos_token_id=e, impl=impl))(
        jnp.asarray(STOPS)
    )
    assert np.asarray(traced).tolist() == tokens.tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_each_row_finishes_on_its_own_stop_ids(impl):
    finished = jnp.zeros((3,), bool)
    tokens, done = sample_step(
        peaked(),
        SamplingParams(temperature=0.0),
        None,
        finished=finished,
        pad_token_id=0,
        eos_token_id=STOPS,
        impl=impl,
    )
    assert np.asarray(tokens).tolist() == [2, 2, 2] and np.asarray(done).tolist() == [True, False, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_its_mask_empties_samples_its_own_first_stop_id(impl):
    allowed = np.zeros((3, 12), bool)
    allowed[2, 7] = True
    tokens = sample(
        peaked(),
        SamplingParams(),
        jax.random.key(0),
        allowed_tokens=pack_allowed(allowed),
        eos_token_id=STOPS,
        impl=impl,
    )
    assert np.asarray(tokens).tolist() == [2, 5, 7]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_heterogeneous_rows_equal_the_reference(impl):
    b, v = 8, 1000
    x = logits("normal", b, v, "float32")
    hist, prompt = history(b, v)
    stops = np.full((b, 3), -1)
    for r in range(b):
        stops[r, : r % 4] = np.argsort(-np.asarray(x[r]))[: r % 4]  # each row's own likeliest tokens
    params = SamplingParams(
        temperature=np.array([0.0, 0.7, 1.0, 0.0, 1.2, 0.9, 0.0, 0.5], np.float32),
        top_p=0.9,
        min_tokens=np.array([0, 1000, 1000, 1000, 0, 1000, 1000, 1000]),
        max_tokens=2000,
        repetition_penalty=1.2,
    )
    keys = jax.random.split(jax.random.key(1), b)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": stops}
    want = np.asarray(sample(x, params, keys, impl="reference", **kw))
    assert np.asarray(sample(x, params, keys, impl=impl, **kw)).tolist() == want.tolist()
    masked = [r for r in range(b) if int(params.min_tokens[r]) and r % 4]
    assert all(want[r] not in stops[r] for r in masked)


def test_bad_stop_ids_are_refused_naming_the_argument():
    x = peaked()
    for bad in (
        np.array([[2, -1]]),
        np.array([[2.0], [5.0], [1.0]]),
        np.array([[2], [12], [1]]),
        np.array([[2], [-2], [1]]),
    ):
        with pytest.raises(ValueError, match="eos_token_id"):
            sample(x, SamplingParams(min_tokens=1, temperature=0.0), None, eos_token_id=bad)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    with pytest.raises(ValueError, match="per-request stop ids"):
        sample(x, SamplingParams(), jax.random.key(0), eos_token_id=STOPS, mesh=mesh, vocab_axis="tp")


def test_verify_draft_masks_each_rows_own_stop_ids():
    logits3 = jnp.broadcast_to(peaked()[:, None, :], (3, 2, 12))
    out, n = verify_draft(
        logits3,
        jnp.asarray([[2], [2], [2]]),
        None,
        SamplingParams(temperature=0.0, min_tokens=5),
        None,
        eos_token_id=STOPS,
    )
    assert np.asarray(n).tolist() == [0, 1, 1] and np.asarray(out)[:, 0].tolist() == [5, 2, 2]
