"""Quantized KV caches: round-trip error bounds, memory, and generation against the fp cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vsampler import SamplingParams, vInference, vInferenceConfig
from vsampler.engine.kv_cache import CACHE_MODES, NF4_CODES, Int8Tensor, KVCache, NF4Tensor
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

BASE = TinyDecoderConfig(head_dim=64)  # the NF4 cache needs head_dim a multiple of its 64-value blocks
BF16_ROUNDING = 1 + 2.0**-7  # scales are bfloat16, rounded up


def vectors(shape=(3, 17, 2, 64), seed=0):
    x = jax.random.normal(jax.random.key(seed), shape) * 2.5
    return x.at[0, 0, 0, 5].set(40.0).at[1, 2, 1].set(0.0)  # an outlier; an all-zero vector


def test_int8_round_trip_is_within_half_a_step_of_each_vector():
    x = vectors()
    q = Int8Tensor.quantize(x)
    assert q.weight.dtype == jnp.int8 and q.weight.shape == x.shape and q.scale.shape == (*x.shape[:-1], 1)
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    err = jnp.abs(q.dequantize() - x)
    assert bool(jnp.all(err <= 0.5 * absmax / 127 * BF16_ROUNDING + 1e-7))
    assert float(jnp.abs(q.dequantize()[1, 2, 1]).max()) == 0.0  # zeros stay zeros, no NaN


def test_nf4_round_trip_is_within_half_the_widest_code_gap_of_each_block():
    x = vectors()
    q = NF4Tensor.quantize(x)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (*x.shape[:-1], 32) and q.absmax.shape[-1] == 1
    half_gap = float(np.max(np.diff(NF4_CODES))) / 2
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    err = jnp.abs(q.dequantize() - x)
    assert bool(jnp.all(err <= half_gap * absmax * BF16_ROUNDING + 1e-6))
    # the documented nibble order: element 2j in the low nibble, 2j + 1 in the high one
    codes = np.argmin(np.abs(np.asarray(x / q.absmax.astype(jnp.float32))[..., None] - NF4_CODES), axis=-1)
    assert (np.asarray(q.packed) == (codes[..., 0::2] | (codes[..., 1::2] << 4))).all()


def test_nf4_blocks_along_the_head_dimension():
    x = vectors((2, 3, 1, 128))
    q = NF4Tensor.quantize(x)
    assert q.absmax.shape == (2, 3, 1, 2)
    blocks = np.asarray(jnp.max(jnp.abs(x.reshape(2, 3, 1, 2, 64)), axis=-1))
    assert np.all(np.asarray(q.absmax.astype(jnp.float32)) >= blocks)


def test_cache_memory_int8_about_2x_and_nf4_about_4x_smaller_than_bf16():
    sizes = {
        mode: KVCache.init(
            num_layers=2, batch=4, length=256, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16, mode=mode
        ).nbytes()
        for mode in CACHE_MODES
    }
    elements = 2 * 2 * 4 * 256 * 2 * 64  # layers x (key, value) x B x T x heads x D
    assert sizes["fp"] == 2 * elements
    assert sizes["int8"] == elements + 2 * elements // 64  # int8 weights + one bf16 scale per vector
    assert sizes["nf4"] == elements // 2 + 2 * elements // 64  # two codes per byte + one bf16 absmax per block
    assert sizes["fp"] / sizes["int8"] == pytest.approx(1.94, abs=0.01)
    assert sizes["fp"] / sizes["nf4"] == pytest.approx(3.76, abs=0.01)


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match=r"head_dim \(16\) must be a multiple of 64"):
        TinyDecoderConfig(head_dim=16, cache_mode="nf4")
    with pytest.raises(ValueError, match=r"head_dim \(48\) must be a multiple of 64"):
        NF4Tensor.quantize(jnp.ones((1, 1, 1, 48)))
    with pytest.raises(ValueError, match="cache_mode must be one of"):
        TinyDecoderConfig(cache_mode="int4")


# -- generation with a quantized cache ---------------------------------------------------------------------

PROMPTS = np.random.default_rng(0).integers(1, 512, (4, 6)).astype(np.int32)
STEPS = 24
INT8_LOGIT_BOUND = 0.1  # int8 moves no logit by more than this (measured ~0.06; logits span ~8)
NF4_KL_BOUND = 0.1  # NF4: KL(fp || nf4) of the next-token distribution per step (measured ~0.06)


def model(mode: str) -> TinyDecoder:
    return TinyDecoder(dataclasses.replace(BASE, cache_mode=mode), rngs=nnx.Rngs(0))


def teacher_forced_log_probs(m: TinyDecoder, tokens: np.ndarray) -> jax.Array:
    """(B, steps, V) next-token log-probs along `tokens` (prompt then the fp greedy continuation),
    decoding through `m`'s cache one token at a time after a prefill of the prompt."""
    b, total = tokens.shape
    p = PROMPTS.shape[1]
    mask = np.ones((b, total), np.int32)
    out = m(
        jnp.asarray(tokens[:, :p]),
        attention_mask=mask,
        position_ids=np.tile(np.arange(p), (b, 1)),
        past_key_values=m.init_cache(b, total),
        cache_index=0,
    )
    logps = [jax.nn.log_softmax(out.logits[:, -1])]
    cache = out.past_key_values
    for t in range(p, total - 1):
        out = m(
            jnp.asarray(tokens[:, t : t + 1]),
            attention_mask=mask,
            position_ids=np.full((b, 1), t),
            past_key_values=cache,
            cache_index=t,
        )
        cache = out.past_key_values
        logps.append(jax.nn.log_softmax(out.logits[:, -1]))
    return jnp.stack(logps, axis=1)


@pytest.fixture(scope="module")
def greedy_runs():
    greedy = SamplingParams(max_tokens=STEPS, temperature=0.0)
    runs = {}
    for mode in CACHE_MODES:
        e = vInference(
            model(mode),
            vInferenceConfig(max_new_tokens=STEPS, streaming_chunks=8, pad_token_id=0, sampling_params=greedy),
        )
        runs[mode] = np.asarray(e.generate_all(PROMPTS).sequences)[:, 8:]
    fp_tokens = np.concatenate([PROMPTS, runs["fp"]], axis=1)
    logps = {mode: teacher_forced_log_probs(model(mode), fp_tokens) for mode in CACHE_MODES}
    return runs, logps


@pytest.mark.slow
def test_int8_cache_keeps_every_logit_close_and_greedy_equal_wherever_the_choice_is_clear(greedy_runs):
    runs, logps = greedy_runs
    assert float(jnp.abs(logps["int8"] - logps["fp"]).max()) < INT8_LOGIT_BOUND
    # A random tiny model has near-ties (either token is then a correct greedy choice): greedy with the int8
    # cache picks the fp cache's token at every step whose fp top-2 margin exceeds twice the bound...
    top2 = jnp.sort(logps["fp"], axis=-1)[..., -2:]
    clear = np.asarray(top2[..., 1] - top2[..., 0]) > 2 * INT8_LOGIT_BOUND
    same = np.asarray(jnp.argmax(logps["int8"], axis=-1) == jnp.argmax(logps["fp"], axis=-1))
    assert same[clear].all()
    assert clear.mean() > 0.5, f"only {clear.sum()} of {clear.size} steps have a clear greedy choice"
    # ... and the int8 loop generates the fp loop's tokens up to each row's first near-tie
    for r in range(PROMPTS.shape[0]):
        first_tie = int(np.argmin(clear[r])) if not clear[r].all() else STEPS
        assert (runs["int8"][r, :first_tie] == runs["fp"][r, :first_tie]).all()


@pytest.mark.slow
def test_nf4_cache_stays_within_the_stated_kl_of_the_fp_cache(greedy_runs):
    _, logps = greedy_runs
    p = jnp.exp(logps["fp"])
    kl = jnp.sum(p * (logps["fp"] - logps["nf4"]), axis=-1)
    assert float(kl.max()) < NF4_KL_BOUND
    assert float(kl.max()) > 0  # the NF4 cache is really in use
