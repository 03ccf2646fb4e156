"""The spec, stage by stage, on hand-computed cases (vsampler.core.reference through the public API)."""

import jax
import jax.numpy as jnp
import numpy as np

from vsampler import SamplingParams, process_logits, sample
from vsampler.core import reference as ref
from vsampler.tools.verification import TEXTBOOK_TOP_P

NEG = -np.inf
KEY = jax.random.key(0)


def kept(row_logits, **kw):
    """Indices kept by process_logits for a one-row batch."""
    params = SamplingParams(**kw.pop("params", {}))
    out = np.asarray(process_logits(jnp.asarray([row_logits], jnp.float32), params, **kw))
    return [int(i) for i in np.flatnonzero(out[0] > NEG)], out[0]


def test_logit_bias_mapping_array_and_ban():
    x = [1.0, 2.0, 3.0]
    _, out = kept(x, params={"logit_bias": {0: 5.0, 2: -np.inf}})
    np.testing.assert_allclose(out, [6.0, 2.0, NEG])
    _, out = kept(x, params={"logit_bias": np.array([0.5, 0.5, -1.0], np.float32)})
    np.testing.assert_allclose(out, [1.5, 2.5, 2.0])
    per_row = SamplingParams(logit_bias=np.array([[1, 0, 0], [0, 0, 2]], np.float32))
    two_rows = process_logits(jnp.zeros((2, 3)), per_row)
    np.testing.assert_allclose(two_rows, [[1, 0, 0], [0, 0, 2]])


def test_repetition_penalty_once_per_distinct_token_both_signs():
    x = [2.0, -2.0, 1.0, 0.5]
    _, out = kept(x, params={"repetition_penalty": 2.0}, history=jnp.array([[0, 1, 0, 0, -1]]))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    _, out = kept(x, params={"repetition_penalty": 0.5}, history=jnp.array([[0, 1]]))
    np.testing.assert_allclose(out, [4.0, -1.0, 1.0, 0.5])


def test_presence_and_frequency_count_only_generated_real_tokens():
    x = [0.0, 0.0, 0.0, 0.0]
    history = jnp.array([[0, 1, 1, 2, -1, 9]])  # prompt = [0]; -1 is an empty slot; 9 is out of vocabulary
    _, out = kept(x, params={"presence_penalty": 0.5, "frequency_penalty": 0.25}, history=history, prompt_len=1)
    np.testing.assert_allclose(out, [0.0, -0.5 - 0.5, -0.5 - 0.25, 0.0])
    # repetition uses the prompt too; presence does not
    _, out = kept(
        [1.0, 1.0, 1.0, 1.0], params={"repetition_penalty": 2.0, "presence_penalty": 1.0}, history=history, prompt_len=1
    )
    np.testing.assert_allclose(out, [0.5, -0.5, -0.5, 1.0])


def test_prompt_ignore_length_leaves_the_first_prompt_tokens_out_of_the_repetition_penalty():
    x = [2.0, -2.0, 2.0, 2.0, 1.0]
    # left padding, prompt tokens 0 1 3 (real ones), generated 2 and 1: prompt_len 4
    history = jnp.array([[-1, 0, 1, 3, 2, 1, -1]])
    rep = {"repetition_penalty": 2.0}
    _, everything = kept(x, params=rep, history=history, prompt_len=4)
    np.testing.assert_allclose(everything, [1.0, -4.0, 1.0, 1.0, 1.0])
    # the first real prompt token (0) is left out; padding never uses up the count
    _, out = kept(x, params={**rep, "prompt_ignore_length": 1}, history=history, prompt_len=4)
    np.testing.assert_allclose(out, [2.0, -4.0, 1.0, 1.0, 1.0])
    # generated tokens only: 1 is still penalised (generated too), 3 is not
    for n in (3, 4, 2**31 - 1):
        _, out = kept(x, params={**rep, "prompt_ignore_length": n}, history=history, prompt_len=4)
        np.testing.assert_allclose(out, [2.0, -4.0, 1.0, 2.0, 1.0], err_msg=f"prompt_ignore_length={n}")
    # presence and frequency count generated tokens whatever it says; per-row values
    both = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, prompt_ignore_length=np.array([0, 2**31 - 1]))
    two_rows = jnp.concatenate([history, history])
    two = np.asarray(process_logits(jnp.asarray([x, x]), both, history=two_rows, prompt_len=4))
    np.testing.assert_allclose(two, [[1.0, -4.5, 0.5, 1.0, 1.0], [2.0, -4.5, 0.5, 2.0, 1.0]])


def test_min_tokens_masks_every_eos_until_enough_generated():
    x = [0.0, 5.0, 1.0, 4.0]
    params = {"min_tokens": 2, "temperature": 0.0}
    # one token generated after a prompt of 2: EOS ids 1 and 3 masked, greedy picks token 2
    idx, _ = kept(x, params=params, history=jnp.array([[0, 0, 2, -1]]), prompt_len=2, eos_token_id=[1, 3])
    assert idx == [2]
    idx, _ = kept(x, params=params, history=jnp.array([[0, 0, 2, 2]]), prompt_len=2, eos_token_id=[1, 3])
    assert idx == [1]
    # nothing generated yet: an empty history (no history at all is an error, as for the penalties)
    assert kept(x, params=params, history=jnp.full((1, 4), -1), eos_token_id=1)[0] == [3]


def test_temperature_scales_kept_logits_and_zero_is_greedy_lowest_index():
    _, out = kept([1.0, 2.0, -4.0], params={"temperature": 0.5})
    np.testing.assert_allclose(out, [2.0, 4.0, -8.0])
    idx, out = kept([1.0, 3.0, 3.0], params={"temperature": 0.0})
    assert idx == [1] and out[1] == 3.0
    tokens = sample(jnp.asarray([[1.0, 3.0, 3.0]] * 4), SamplingParams(temperature=0.0), KEY)
    assert tokens.tolist() == [1, 1, 1, 1]


def test_top_k_keeps_ties_at_the_boundary_and_zero_or_large_k_is_off():
    x = [3.0, 2.0, 2.0, 1.0, 0.0]
    assert kept(x, params={"top_k": 2})[0] == [0, 1, 2]
    assert kept(x, params={"top_k": 1})[0] == [0]
    assert kept(x, params={"top_k": 0})[0] == [0, 1, 2, 3, 4]
    assert kept(x, params={"top_k": 5})[0] == [0, 1, 2, 3, 4]
    assert kept(x, params={"top_k": 50})[0] == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_token_that_crosses_p_and_ties_together():
    x = np.log([0.5, 0.3, 0.2])
    assert kept(x, params={"top_p": 0.45})[0] == [0]
    assert kept(x, params={"top_p": 0.55})[0] == [0, 1]
    assert kept(x, params={"top_p": 0.85})[0] == [0, 1, 2]
    assert kept(x, params={"top_p": 1.0})[0] == [0, 1, 2]
    ties = np.log([0.3, 0.4, 0.3])
    assert kept(ties, params={"top_p": 0.5})[0] == [0, 1, 2]  # mass above each 0.3 is 0.4 < 0.5
    assert kept(ties, params={"top_p": 0.35})[0] == [1]
    assert kept(np.log([0.25] * 4), params={"top_p": 0.01})[0] == [0, 1, 2, 3]


def test_top_p_at_textbook_boundaries_is_exact():
    """A mass above a token of exactly p (in decimals) drops it, whatever float32 rounding of log, softmax
    and the sums says (HF's example: the reference's float32 running sum reached 0.79999995 and kept the
    0.1 pair); just above p keeps it."""
    for probs, top_p, want in TEXTBOOK_TOP_P:
        assert kept(np.log(np.asarray(probs, np.float32)), params={"top_p": top_p})[0] == list(want), (probs, top_p)
    assert kept(np.log([0.3, 0.1, 0.1, 0.5]), params={"top_p": 0.8 + 1e-5})[0] == [0, 1, 2, 3]


def test_exact_cumsum_is_right_to_one_rounding_at_any_length():
    e = np.random.default_rng(0).random((2, 100_000)).astype(np.float32) ** 4
    want = np.cumsum(e.astype(np.float64), axis=1)
    got = np.asarray(jax.jit(ref.exact_cumsum)(jnp.asarray(e)))
    assert np.max(np.abs(got - want) / want) <= 2**-23  # a float32 cumsum drifts far past this here
    assert np.max(np.abs(np.asarray(jnp.cumsum(e, axis=1)) - want) / want) > 2**-23
    for n in (1, 2, 3, 5, 128, 1000):  # lengths around the scan's powers of two
        short = e[:, :n]
        got = np.asarray(jax.jit(ref.exact_cumsum)(jnp.asarray(short)))
        assert np.max(np.abs(got - want[:, :n]) / want[:, :n]) <= 2**-23, n


def test_top_p_applies_to_what_top_k_left_renormalised():
    x = np.log([0.4, 0.3, 0.2, 0.1])
    assert kept(x, params={"top_p": 0.5})[0] == [0, 1]  # mass above token 1 is 0.4
    assert kept(x, params={"top_p": 0.5, "top_k": 2})[0] == [0]  # after top-k it is 4/7 > 0.5


def test_temperature_applies_before_filtering():
    x = np.log([0.6, 0.3, 0.1])
    assert kept(x, params={"top_p": 0.62})[0] == [0, 1]
    assert kept(x, params={"top_p": 0.62, "temperature": 0.25})[0] == [0]  # sharper: 0.6**4 dominates


def test_min_p_is_relative_to_the_most_probable_token():
    x = np.log([0.5, 0.3, 0.15, 0.05])
    assert kept(x, params={"min_p": 0.25})[0] == [0, 1, 2]
    assert kept(x, params={"min_p": 0.4})[0] == [0, 1]
    assert kept(x, params={"min_p": 1.0})[0] == [0]
    assert kept(x, params={"min_p": 0.0})[0] == [0, 1, 2, 3]


def test_draw_is_the_inverse_cdf_in_vocabulary_order():
    scaled = jnp.log(jnp.asarray([[0.2, 0.5, 0.3, 0.9]]))
    keep = jnp.asarray([[True, True, True, False]])
    for u, want in [(0.0, 0), (0.19, 0), (0.21, 1), (0.69, 1), (0.71, 2), (0.999999, 2)]:
        assert int(ref.draw(keep, scaled, jnp.asarray([u]))[0]) == want


def test_draw_falls_back_to_the_last_kept_token_when_rounding_leaves_the_total_below_u():
    # 1 + 2^-24 sums to 1 in float32, so u * total can reach the total: the last kept token is chosen
    scaled = jnp.asarray([[0.0, -17.0, -200.0]])
    keep = jnp.asarray([[True, True, False]])
    assert int(ref.draw(keep, scaled, jnp.asarray([1.0]))[0]) == 1


def test_uniform_per_row_from_one_key_or_a_batch_of_keys():
    from vsampler.core.inputs import draw_uniforms

    keys = jax.random.split(jax.random.key(3), 5)
    np.testing.assert_array_equal(draw_uniforms(jax.random.key(3), 5), jax.random.uniform(jax.random.key(3), (5,)))
    per_row = draw_uniforms(keys, 5)
    np.testing.assert_array_equal(per_row[2], jax.random.uniform(keys[2], ()))
    np.testing.assert_array_equal(draw_uniforms(jax.random.key_data(keys), 5), per_row)  # raw PRNGKey data


def test_per_row_keys_make_a_row_independent_of_its_neighbours():
    logits = jax.random.normal(jax.random.key(1), (6, 300)) * 2
    keys = jax.random.split(jax.random.key(2), 6)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    batch = sample(logits, params, keys, impl="reference")
    for i in (0, 3, 5):
        alone = sample(logits[i : i + 1], params, keys[i : i + 1], impl="reference")
        assert int(alone[0]) == int(batch[i])


def test_greedy_rows_beside_sampled_rows():
    logits = jax.random.normal(jax.random.key(4), (4, 50)) * 3
    params = SamplingParams(temperature=np.array([0.0, 1.0, 0.0, 0.5], np.float32), top_k=5)
    tokens = np.asarray(sample(logits, params, jax.random.key(0)))
    argmax = np.argmax(np.asarray(logits), axis=1)
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    out = np.asarray(process_logits(logits, params))
    assert (out[0] > NEG).sum() == 1 and (out[1] > NEG).sum() == 5
