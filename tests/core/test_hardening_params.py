"""Parameters are validated in the dtype they are used in (int32 / float32), never in a wider one and
then silently wrapped or rounded: `SamplingParams`, `sample`, the loop's row parameters, history ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler import SamplingParams, process_logits, sample, sample_step
from vsampler.core.params import INT32_MAX, as_used
from vsampler.engine.host_inputs import row_params

V = 50
LOGITS = jax.random.normal(jax.random.key(0), (2, V), jnp.float32) * 2
KEYS = jax.random.split(jax.random.key(3), 2)


def _tokens(params: SamplingParams, impl: str, **kw) -> np.ndarray:
    return np.asarray(sample(LOGITS, params, KEYS, impl=impl, **kw))


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("huge", [2**31, 2**32 + 1, 2**40, 2**63 - 1])
def test_a_top_k_beyond_int32_is_off_as_documented_not_wrapped(impl, huge):
    """`top_k >= V` is off; a value int32 cannot hold is >= V too (it saturates), never `huge % 2**32`."""
    off = _tokens(SamplingParams(top_k=0), impl)
    for value in (huge, np.array([huge, huge], np.int64), np.array([huge, 0], np.uint64)):
        np.testing.assert_array_equal(_tokens(SamplingParams(top_k=value), impl), off)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_a_min_tokens_beyond_int32_keeps_eos_masked(impl):
    x = jnp.zeros((2, V)).at[:, 4].set(50.0)  # EOS 4 is the argmax
    history = np.full((2, 3), -1, np.int32)
    for value in (np.array([2**32, 2**32], np.int64), 2**32, 2**33 + 1):
        params = SamplingParams(min_tokens=value, max_tokens=2**40, temperature=0.0)
        tokens = np.asarray(sample(x, params, KEYS, history=history, eos_token_id=4, impl=impl))
        assert (tokens != 4).all(), value


def test_integer_fields_saturate_at_int32_and_floats_are_float32():
    assert as_used("top_k", np.array([2**32 + 1], np.int64)).tolist() == [INT32_MAX]
    assert as_used("max_tokens", 2**40).item() == INT32_MAX
    assert as_used("temperature", 0.7).dtype == np.float32
    traced = jax.jit(lambda k: as_used("top_k", k))(jnp.array([3.7, -1.0, 1e20, jnp.nan]))
    assert traced.dtype == jnp.int32
    assert traced.tolist() == [3, -1, INT32_MAX, 0]  # truncation toward zero, saturation, NaN -> 0


def test_the_loop_rows_saturate_too():
    params = SamplingParams(top_k=np.array([2**32 + 1, 3]), max_tokens=2**40)
    rows = row_params(params, params.stages, 2, 1, 2, V)
    assert rows.top_k.dtype == np.int32 and rows.top_k.tolist() == [INT32_MAX, 3]
    assert rows.max_tokens.tolist() == [INT32_MAX, INT32_MAX]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", 1e-46, "0 or subnormal in float32"),
        ("temperature", 1e-40, "0 or subnormal in float32"),
        ("min_p", 1e-40, "0 or subnormal in float32"),
        ("temperature", np.array([0.5, 1e-50]), "at row 1 is not 0 but is 0 or subnormal"),
        ("temperature", 1e39, "beyond the float32 range"),
        ("repetition_penalty", 1e39, "beyond the float32 range"),
        ("repetition_penalty", 1e-50, "0 or subnormal in float32"),
        ("top_p", 1e-50, "0 or subnormal in float32"),
        ("top_p", np.array([1.0, 1e-46]), "at row 1"),
        ("top_k", 2.0, "an integer >= 0"),
        ("top_k", "3", "of type str"),
        ("top_k", [1, "a"], "top_k"),
        ("min_tokens", np.array([-(2**40)]), "an integer >= 0"),
    ],
)
def test_values_that_change_in_float32_or_int32_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}") as e:
        SamplingParams(**{field: value})
    assert message in str(e.value)


def test_stages_are_read_off_the_float32_values():
    """A temperature that is 0 in float32 would be a greedy row the 'random' stage set did not expect:
    such values are refused; a value that stays positive in float32 is a sampled row."""
    tiny = SamplingParams(temperature=np.float32(1e-30))
    assert tiny.stages.random and not tiny.stages.greedy


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_history_ids_beyond_int32_are_empty_slots_not_wrapped_onto_a_token(impl):
    params = SamplingParams(repetition_penalty=100.0, temperature=0.0)
    x = jnp.zeros((2, V)).at[:, 10].set(5.0).at[:, 12].set(4.0)
    for dtype in (np.int64, np.uint64):
        history = np.array([[2**32 + 10, 2**32 + 12], [2**33 + 10, np.iinfo(dtype).max]], dtype)
        tokens = np.asarray(sample(x, params, KEYS, history=history, impl=impl))
        np.testing.assert_array_equal(tokens, [10, 10])  # 10 is not in the history: not penalised
        warped = process_logits(x, params, history=history, impl=impl)
        assert np.asarray(warped)[:, 10].tolist() == [5.0, 5.0]
    # the same ids as int32 ids *are* penalised
    history = np.array([[10, -1], [10, -1]], np.int32)
    assert (np.asarray(sample(x, params, KEYS, history=history, impl=impl)) != 10).all()


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_huge_params_inside_a_users_jit_are_used_as_validated(impl):
    params = SamplingParams(top_k=np.array([2**32 + 1, 2**32 + 1]))

    @jax.jit
    def step(x, keys):
        return sample(x, params, keys, impl=impl)

    np.testing.assert_array_equal(np.asarray(step(LOGITS, KEYS)), _tokens(SamplingParams(), impl))


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("pad", [V, V + 950, -1])
def test_sample_step_refuses_a_pad_id_outside_the_vocabulary(impl, pad):
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, V=50\)|pad_token_id must be"):
        sample_step(LOGITS, SamplingParams(), KEYS, finished=jnp.ones(2, bool), pad_token_id=pad, impl=impl)


@pytest.mark.parametrize("pad", [[1], np.array([1, 2]), 1.0, True, "1"])
def test_sample_step_refuses_a_pad_id_that_is_not_one_integer(pad):
    with pytest.raises(ValueError, match="pad_token_id must be one token id"):
        sample_step(LOGITS, SamplingParams(), KEYS, finished=jnp.ones(2, bool), pad_token_id=pad, impl="xla")


def test_sample_step_refuses_a_traced_pad_id():
    with pytest.raises(ValueError, match="pad_token_id must be a concrete integer"):
        jax.jit(lambda p: sample_step(LOGITS, SamplingParams(), KEYS, finished=jnp.ones(2, bool), pad_token_id=p))(1)


def test_numpy_integer_pad_ids_are_taken():
    tokens, _ = sample_step(
        LOGITS, SamplingParams(), KEYS, finished=jnp.ones(2, bool), pad_token_id=np.int64(7), impl="xla"
    )
    assert np.asarray(tokens).tolist() == [7, 7]


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_min_tokens_without_history_is_refused_naming_history_as_the_penalties_are(impl):
    """One rule for the stages that count tokens: `min_tokens` needs the history it counts, like the penalties."""
    params = SamplingParams(min_tokens=2)
    calls = [
        lambda: sample(LOGITS, params, KEYS, eos_token_id=1, impl=impl),
        lambda: process_logits(LOGITS, params, eos_token_id=1, impl=impl),
        lambda: sample_step(
            LOGITS, params, KEYS, finished=jnp.zeros(2, bool), pad_token_id=0, eos_token_id=1, impl=impl
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="min_tokens > 0 is set but history is None"):
            call()
    # an empty history is "nothing generated yet": the EOS ids stay masked
    x = jnp.zeros((2, V)).at[:, 1].set(50.0)
    empty = np.full((2, 4), -1, np.int32)
    tokens = sample(x, SamplingParams(min_tokens=2, temperature=0.0), KEYS, history=empty, eos_token_id=1, impl=impl)
    assert (np.asarray(tokens) != 1).all()


def test_traced_subnormal_floats_are_zero():
    from vsampler.core.inputs import sanitise_row_params

    @jax.jit
    def rows(t, mp):
        return sanitise_row_params(SamplingParams(temperature=t, min_p=mp), 2, V)

    out = rows(jnp.array([1e-40, 0.5], jnp.float32), jnp.array([1e-41, 0.1], jnp.float32))
    assert out.temperature.tolist() == [0.0, 0.5]  # greedy
    assert out.min_p.tolist() == [0.0, np.float32(0.1)]


@pytest.mark.parametrize(
    "bias, message",
    [
        ({5: "x"}, r"logit_bias\[5\] must be a real number"),
        ({5: None}, r"logit_bias\[5\] must be a real number"),
        ({5: True}, r"logit_bias\[5\] must be a real number"),
        ({5: 1e39}, r"logit_bias\[5\] must be finite or -inf .*beyond the float32 range"),
        ({"5": 1.0}, "logit_bias keys must be token ids"),
        ([[0.0, "a"]], "logit_bias as a list"),
        ("abc", "logit_bias must be a mapping"),
        (np.full(V, 1e39), "logit_bias must hold finite values or -inf \\(a ban\\), found NaN or \\+inf \\(in float32"),
    ],
)
def test_bad_logit_bias_is_refused_naming_the_entry(bias, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(logit_bias=bias)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_python_lists_are_taken_at_the_boundary(impl):
    from vsampler import pack_allowed

    bias = np.linspace(-2, 2, V, dtype=np.float32)
    base = _tokens(SamplingParams(logit_bias=bias), impl)
    np.testing.assert_array_equal(_tokens(SamplingParams(logit_bias=bias.tolist()), impl), base)
    allowed = np.ones((2, V), bool)
    allowed[:, ::2] = False
    words = pack_allowed(allowed)
    masked = _tokens(SamplingParams(), impl, allowed_tokens=words, eos_token_id=1)
    np.testing.assert_array_equal(
        _tokens(SamplingParams(), impl, allowed_tokens=words.tolist(), eos_token_id=1), masked
    )
    assert (masked % 2 == 1).all()
    history = [[1, 2, -1], [3, 3, 3]]
    params = SamplingParams(repetition_penalty=1.5)
    np.testing.assert_array_equal(
        _tokens(params, impl, history=history), _tokens(params, impl, history=np.asarray(history, np.int32))
    )


def test_numpy_integers_where_an_int_is_expected():
    _, lp = sample(LOGITS, SamplingParams(), KEYS, logprobs=np.int64(3), eos_token_id=[np.int64(1), np.int32(2)])
    assert lp.top_ids.shape == (2, 3)
    with pytest.raises(ValueError, match="logprobs must be an int in"):
        sample(LOGITS, SamplingParams(), KEYS, logprobs=np.float64(3))


def test_an_empty_eos_list_is_refused_naming_eos_token_id():
    with pytest.raises(ValueError, match="eos_token_id is empty"):
        sample(LOGITS, SamplingParams(), KEYS, eos_token_id=[])
