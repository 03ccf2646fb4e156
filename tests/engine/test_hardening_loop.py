"""The decode loop's boundary: keys, pad and EOS ids, masks sent between chunks (a bad one is refused
and the stream goes on), one mask dtype rule with `sample`, and the config's own fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from vsampler import SamplingParams, pack_allowed, vInferenceConfig
from vsampler.engine.inference import vInference
from vsampler.engine.state import SampleState
from vsampler.engine.step import create_sampling_step
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

MAX_NEW = 6
EOS = 2
SAMPLING = SamplingParams(max_tokens=MAX_NEW, temperature=np.array([0.0, 0.9], np.float32), top_k=20)
IDS = np.array([[5, 6, 7], [8, 9, 0]], np.int32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.int32)


@pytest.fixture(scope="module")
def engine() -> vInference:
    model = TinyDecoder(TinyDecoderConfig(), rngs=nnx.Rngs(0))
    cfg = vInferenceConfig(max_new_tokens=MAX_NEW, streaming_chunks=2, eos_token_id=EOS, pad_token_id=0)
    return vInference(model, cfg, impl="xla")


def _allowed(vocab: int, upto: int) -> np.ndarray:
    allowed = np.zeros((2, vocab), bool)
    allowed[:, :upto] = True
    return pack_allowed(allowed)


def test_a_bad_mask_sent_is_refused_and_the_stream_goes_on(engine):
    vocab = engine.vocab_size
    good = _allowed(vocab, 100)
    gen = engine.generate(IDS, MASK, sampling_params=SAMPLING, key=jax.random.key(0), allowed_tokens=good)
    first = next(gen)
    for bad, message in (
        (good[:, :3], r"allowed_tokens must be an int32 packed bitmask \(B, ceil\(V / 32\)\)"),
        (good.astype(np.float32), "allowed_tokens must be int32"),
        (good.astype(np.int64) + 2**33, "allowed_tokens holds values outside 32-bit words"),
    ):
        with pytest.raises(ValueError, match=message):
            gen.send(bad)
    later = gen.send(_allowed(vocab, 10))  # still alive: the next chunk under the new mask
    assert later.generated_tokens > first.generated_tokens
    rest = list(gen)
    final = rest[-1] if rest else later
    start = final.padded_length
    tokens = np.asarray(final.sequences)[:, start:]
    after = tokens[:, int(np.asarray(first.generated_tokens)) // 2 :]
    assert ((after < 100) | (after == 0)).all()


def test_one_mask_dtype_rule_for_sample_and_generate(engine):
    """int64 words (numpy's default) whose values are 32-bit words are taken as those words by both."""
    vocab = engine.vocab_size
    words = _allowed(vocab, 50)
    wide = words.view(np.uint32).astype(np.int64)  # values in [0, 2**32)
    runs = []
    for mask in (words, wide, words.view(np.uint32)):
        state = engine.generate_all(IDS, MASK, sampling_params=SAMPLING, key=jax.random.key(1), allowed_tokens=mask)
        runs.append(np.asarray(state.sequences))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    from vsampler import sample

    x = jax.random.normal(jax.random.key(0), (2, vocab))
    base = sample(x, SAMPLING, jax.random.key(2), allowed_tokens=words, eos_token_id=EOS, impl="xla")
    for mask in (wide, words.view(np.uint32), words.tolist()):
        np.testing.assert_array_equal(
            sample(x, SAMPLING, jax.random.key(2), allowed_tokens=mask, eos_token_id=EOS, impl="xla"), base
        )
    with pytest.raises(ValueError, match="allowed_tokens must be int32"):
        sample(x, SAMPLING, jax.random.key(2), allowed_tokens=words.astype(bool), eos_token_id=EOS)


@pytest.mark.parametrize("key", [5, "seed", [1, 2], None.__class__])
def test_a_key_that_is_not_a_prng_key_is_refused_naming_key(engine, key):
    with pytest.raises(ValueError, match="key must be"):
        engine.generate_all(IDS, MASK, sampling_params=SAMPLING, key=key)


def test_numpy_integer_ids_in_the_config_are_plain_ints():
    cfg = vInferenceConfig(eos_token_id=[np.int64(2), np.int32(3)], pad_token_id=np.int64(0), bos_token_id=np.int64(1))
    assert cfg.eos_token_id == [2, 3] and cfg.pad_token_id == 0 and cfg.bos_token_id == 1
    assert all(type(i) is int for i in (*cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id))
    assert vInferenceConfig.from_json(cfg.to_json()).eos_token_id == [2, 3]
    assert vInferenceConfig(eos_token_id=np.array([4, 5])).eos_token_id == [4, 5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eos_token_id": []}, "eos_token_id is empty"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
        ({"eos_token_id": [True]}, "eos_token_id must be a token id"),
        ({"pad_token_id": [0]}, "pad_token_id must be a token id"),
        ({"pad_token_id": 1.0}, "pad_token_id must be a token id"),
        ({"partition_rules": "abc"}, "partition_rules must be a sequence of"),
        ({"partition_rules": [("a",)]}, r"partition_rules\[0\] must be a \(regex, PartitionSpec\) pair"),
        ({"partition_rules": [("(", PartitionSpec())]}, r"partition_rules\[0\] has an invalid regex"),
        ({"partition_rules": [(".*", "tp")]}, r"partition_rules\[0\] must pair its regex with a PartitionSpec"),
    ],
)
def test_bad_config_fields_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=f"vInferenceConfig.{message}"):
        vInferenceConfig(**kwargs)


def test_partition_rules_of_the_right_form_are_kept():
    rules = ((".*", PartitionSpec()), ("model_kwargs/.*", PartitionSpec("dp")))
    assert vInferenceConfig(partition_rules=rules).get_partition_rules() == rules


@pytest.mark.parametrize("pad", [[0], np.array([0, 1]), 1.5, -1])
def test_create_sampling_step_refuses_a_pad_id_that_is_not_one_token_id(pad):
    with pytest.raises(ValueError, match="pad_token_id must be"):
        create_sampling_step(SAMPLING, EOS, pad)


def test_sample_state_refuses_fields_that_are_not_arrays():
    with pytest.raises(ValueError, match=r"SampleState\.sequences"):
        SampleState(
            current_length=jnp.zeros(2, jnp.int32),
            sequences="x",
            running_token=jnp.zeros((2, 1), jnp.int32),
            is_sequence_finished=jnp.zeros(2, bool),
            prng_key=jax.random.key(0),
            model_kwargs={},
        )
