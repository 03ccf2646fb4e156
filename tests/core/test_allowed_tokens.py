"""Structured output: the packed `allowed_tokens` bitmask (xgrammar / llguidance layout) on every
implementation, inside the fused kernel on impl="pallas"."""

import grid
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grid import compare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsampler import SamplingParams, pack_allowed, process_logits, sample, sample_step, unpack_allowed
from vsampler.core import registry

IMPLS = list(registry.names())
EOS = 3


def test_layout_is_the_grammar_engines_one():
    # token j is bit j % 32 (least significant first) of word j // 32; 1 = allowed
    allowed = np.zeros((1, 70), bool)
    allowed[0, [0, 33, 31, 69]] = True
    words = pack_allowed(allowed)
    assert words.shape == (1, 3) and words.dtype == np.int32
    assert words[0, 0] == np.uint32(1 | (1 << 31)).view(np.int32)
    assert words[0, 1] == 1 << 1
    assert words[0, 2] == 1 << (69 - 64)
    assert np.array_equal(np.asarray(unpack_allowed(jnp.asarray(words), 70)), allowed)


def test_bits_past_the_vocabulary_are_ignored():
    allowed = np.random.default_rng(0).random((3, 50)) < 0.5
    words = pack_allowed(allowed)
    words[:, -1] |= np.int32(-(1 << 18))  # set every bit above token 49 (bit 17 of word 1)
    assert np.array_equal(np.asarray(unpack_allowed(jnp.asarray(words), 50)), allowed)


@pytest.mark.parametrize("impl", list(registry.names(fast=True)))
@pytest.mark.parametrize("config", ["heterogeneous", "combined"])
def test_masked_grid_equals_reference(impl, config):
    compare(impl, "normal", config, 8, 1000, "float32", masked=True)


@pytest.mark.parametrize("impl", list(registry.names(fast=True)))
@pytest.mark.parametrize("kind", ["ties", "one_finite"])
def test_masked_hard_logits_equal_reference(impl, kind):
    compare(impl, kind, "heterogeneous", 3, 5000, "bfloat16", masked=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("impl", "batch", "vocab", "dtype"),
    [
        *[(impl, 8, 50257, "bfloat16") for impl in ("xla", "pallas", "pallas-chunked")],
        *[(impl, 64, 128256, "float32") for impl in ("xla", "pallas")],
    ],
)
def test_masked_large_vocabularies_equal_reference(impl, batch, vocab, dtype):
    compare(impl, "normal", "heterogeneous", batch, vocab, dtype, masked=True)


BATCH, VOCAB = 4, 97  # V not a multiple of 32: the last word is partial
PROPERTY_PARAMS = SamplingParams(
    temperature=np.array([0.0, 0.7, 1.0, 1.5], np.float32),
    top_k=np.array([0, 5, 0, 40]),
    top_p=np.array([1.0, 0.9, 0.5, 1.0], np.float32),
    min_p=np.array([0.0, 0.0, 0.1, 0.0], np.float32),
)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    allowed=st.lists(st.lists(st.booleans(), min_size=VOCAB, max_size=VOCAB), min_size=BATCH, max_size=BATCH),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_a_disallowed_token_is_never_sampled(impl, allowed, seed, ties):
    allowed = np.array(allowed)
    x = jax.random.normal(jax.random.key(seed), (BATCH, VOCAB)) * 3
    if ties:
        x = jnp.round(x)
    kw = {"eos_token_id": EOS, "allowed_tokens": pack_allowed(allowed), "impl": impl}
    tokens = np.asarray(sample(x, PROPERTY_PARAMS, jax.random.key(seed + 1), **kw))
    for row, token in enumerate(tokens):
        if allowed[row].any():
            assert allowed[row, token], f"row {row} sampled disallowed token {token}"
        else:
            assert token == EOS


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_with_nothing_allowed_ends_with_the_first_eos(impl):
    x = jax.random.normal(jax.random.key(0), (3, 300))
    allowed = np.ones((3, 300), bool)
    allowed[1] = False  # nothing allowed
    allowed[2] = False
    allowed[2, 50] = True  # only token 50, which the bias bans: nothing finite left
    params = SamplingParams(temperature=np.array([0.8, 0.8, 0.0], np.float32), logit_bias={50: -np.inf})
    kw = {"eos_token_id": [7, 9], "allowed_tokens": pack_allowed(allowed), "impl": impl}
    tokens = np.asarray(sample(x, params, jax.random.key(1), **kw))
    assert tokens[1] == 7 and tokens[2] == 7
    assert tokens[0] != 50
    step_tokens, finished = sample_step(x, params, jax.random.key(1), finished=jnp.zeros(3, bool), pad_token_id=0, **kw)
    assert np.array_equal(np.asarray(step_tokens), tokens)
    assert np.asarray(finished).tolist() == [False, True, True]
    warped = np.asarray(process_logits(x, params, eos_token_id=[7, 9], allowed_tokens=kw["allowed_tokens"], impl=impl))
    assert np.all(warped[1:] == -np.inf)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_a_huge_bias_cannot_bring_a_disallowed_token_back(impl):
    x = jnp.zeros((2, 64))
    allowed = np.zeros((2, 64), bool)
    allowed[:, 10:20] = True
    params = SamplingParams(temperature=np.array([0.0, 1.0], np.float32), logit_bias={5: 1e30})
    mask = pack_allowed(allowed)
    tokens = np.asarray(sample(x, params, jax.random.key(0), eos_token_id=0, allowed_tokens=mask, impl=impl))
    assert tokens[0] == 10  # greedy: the first allowed maximum
    assert 10 <= tokens[1] < 20


def test_bad_masks_are_refused_with_the_argument_named():
    x = jnp.zeros((2, 100))
    good = pack_allowed(np.ones((2, 100), bool))
    with pytest.raises(ValueError, match=r"allowed_tokens must be the packed bitmask \(B, ceil\(V / 32\)\) = \(2, 4\)"):
        sample(x, SamplingParams(), jax.random.key(0), eos_token_id=1, allowed_tokens=good[:, :3])
    with pytest.raises(ValueError, match="allowed_tokens must be int32"):
        sample(x, SamplingParams(), jax.random.key(0), eos_token_id=1, allowed_tokens=good.astype(np.float32))
    with pytest.raises(ValueError, match="allowed_tokens needs eos_token_id"):
        sample(x, SamplingParams(), jax.random.key(0), allowed_tokens=good)


def test_grid_helper_masks_rows_as_documented():
    words = grid.allowed_mask(4, 1000)
    allowed = np.asarray(unpack_allowed(jnp.asarray(words), 1000))
    assert not allowed[-1].any() and all(0.15 < allowed[r].mean() < 0.35 for r in range(3))
