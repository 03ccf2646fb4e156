"""The EasyDeL vinference classes: fields, defaults, methods, pytrees and exact serialisation."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from vsampler import PartitionAxis, SampleState, SamplingParams, vInferenceConfig, vInferencePreCompileConfig


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(x)) == str(jax.random.key_impl(y))
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def make_state():
    return SampleState(
        current_length=jnp.array([3, 5], jnp.int32),
        sequences=jnp.arange(16, dtype=jnp.int32).reshape(2, 8),
        running_token=jnp.array([[2], [4]], jnp.int32),
        is_sequence_finished=jnp.array([False, True]),
        prng_key=jax.random.key(7),
        model_kwargs={
            "attention_mask": jnp.ones((2, 8), jnp.bool_),
            "past_key_values": {"views": [{"key": jnp.full((2, 8, 1, 4), 1.5, jnp.bfloat16)}]},
        },
        tokens_per_second=float("-inf"),
        generated_tokens=3,
        padded_length=8,
        _compile_config=vInferencePreCompileConfig(batch_size=2, prefill_length=[8, 16]),
    )


def test_inference_config_defaults_and_loop_rows():
    c = vInferenceConfig()
    assert (c.max_new_tokens, c.streaming_chunks, c.num_return_sequences) == (64, 16, 1)
    assert c._loop_rows == 4
    assert c.sampling_params.max_tokens == 64
    assert vInferenceConfig(max_new_tokens=33, streaming_chunks=16)._loop_rows == 3
    assert vInferenceConfig(max_new_tokens=33).replace(streaming_chunks=1)._loop_rows == 33


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"streaming_chunks": -2}, "streaming_chunks"),
        ({"eos_token_id": [2, -1]}, "eos_token_id"),
        ({"pad_token_id": 1.5}, "pad_token_id"),
        ({"sampling_params": {"temperature": 1.0}}, "sampling_params must be a SamplingParams"),
    ],
)
def test_inference_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vInferenceConfig(**kwargs)


def test_standalones_expand_lists_repeating_last_element():
    cfg = vInferencePreCompileConfig(batch_size=[1, 4], prefill_length=[64, 128, 256])
    got = [(s.batch_size, s.prefill_length) for s in cfg.get_standalones()]
    assert got == [(1, 64), (4, 128), (4, 256)]
    single = vInferencePreCompileConfig(batch_size=2, prefill_length=32)
    assert single.get_standalones() == [single]


def test_create_optimized_compo_doubles_prefill_lengths():
    cfg = vInferencePreCompileConfig.create_optimized_compo(
        batch_size=8, max_prefill_length=1000, min_prefill_length=64
    )
    assert cfg.prefill_length == [64, 128, 256, 512]
    assert cfg.batch_size == 8
    with pytest.raises(ValueError, match="min_prefill_length"):
        vInferencePreCompileConfig.create_optimized_compo(max_prefill_length=32, min_prefill_length=64)


def test_precompile_config_validates_and_extracts():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        vInferencePreCompileConfig(batch_size=0)
    cfg = vInferencePreCompileConfig(batch_size=2, prefill_length=16)
    assert cfg.extract()["prefill_length"] == 16 and set(cfg.extract()) >= {"batch_size", "vision_included"}


def test_default_hash_is_stable_across_processes():
    cfg = vInferencePreCompileConfig(batch_size=[1, 2], prefill_length=128)
    code = (
        "from vsampler import vInferencePreCompileConfig as C;"
        "print(C(batch_size=[1, 2], prefill_length=128).get_default_hash())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert int(out.stdout.strip()) == cfg.get_default_hash()
    assert cfg.get_default_hash() != cfg.replace(prefill_length=256).get_default_hash()


def test_partition_axis_defaults():
    ax = PartitionAxis()
    assert ax.batch_axis == ("fsdp", "dp") and ax.sequence_axis == "sp" and ax.key_sequence_axis == "sp"
    assert (ax.head_axis, ax.kv_head_axis, ax.hidden_state_axis, ax.vocab_axis) == ("tp",) * 4
    assert ax.attention_dim_axis is None
    with pytest.raises(ValueError, match="head_axis must be a mesh axis name"):
        PartitionAxis(head_axis=3)


def test_default_partition_rules_need_an_axis():
    with pytest.raises(ValueError, match="needs partition_axis"):
        vInferenceConfig().get_partition_rules()
    rules = vInferenceConfig(partition_axis=PartitionAxis()).get_partition_rules()
    assert rules[0] == ("(sequences|running_token)", PartitionSpec(("fsdp", "dp"), "sp"))
    assert rules[-1] == (".*", PartitionSpec())
    custom = (("x", PartitionSpec("dp")),)
    assert vInferenceConfig(partition_rules=custom).get_partition_rules() == custom


@pytest.mark.parametrize("codec", ["dict", "json"])
def test_sample_state_round_trips_exactly(codec):
    state = make_state()
    back = SampleState.from_dict(state.to_dict()) if codec == "dict" else SampleState.from_json(state.to_json())
    assert_trees_equal(state, back)
    assert back._compile_config == state._compile_config and back.padded_length == 8


def test_configs_round_trip_through_json():
    params = SamplingParams(
        temperature=np.array([0.0, 0.7], np.float32),
        top_k=np.array([0, 5]),
        logit_bias={3: -np.inf, 7: 1.25},
        max_tokens=9,
    )
    cfg = vInferenceConfig(
        max_new_tokens=9,
        eos_token_id=[1, 2],
        partition_axis=PartitionAxis(),
        partition_rules=(("a/b", PartitionSpec(("dp", "fsdp"), None)),),
        sampling_params=params,
        num_return_sequences={12345: 2},
    )
    back = vInferenceConfig.from_json(cfg.to_json())
    assert back.partition_rules == cfg.partition_rules and back.partition_axis == cfg.partition_axis
    assert back.num_return_sequences == {12345: 2} and back.eos_token_id == [1, 2] and back._loop_rows == 1
    assert back.sampling_params.logit_bias == {3: -np.inf, 7: 1.25}
    assert_trees_equal(back.sampling_params, params)
    pc = vInferencePreCompileConfig(batch_size=[1, 2], required_props={"x": {"shape": (1, 2)}})
    assert vInferencePreCompileConfig.from_json(pc.to_json()) == pc
    assert vInferencePreCompileConfig.from_dict(pc.to_dict()) == pc


def test_from_json_refuses_other_types_and_unknown_fields():
    with pytest.raises(ValueError, match="was given a serialised vInferenceConfig"):
        SampleState.from_json(vInferenceConfig().to_json())
    with pytest.raises(ValueError, match="unknown field"):
        vInferencePreCompileConfig.from_dict({"batch_size": 1, "bogus": 2})


def test_state_is_a_pytree_with_static_bucket():
    state = make_state()
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 10  # 5 arrays + mask + one cache view + 3 counters
    doubled = jax.jit(lambda s: s.replace(current_length=s.current_length * 2))(state)
    np.testing.assert_array_equal(doubled.current_length, [6, 10])
    assert doubled.padded_length == 8 and doubled._compile_config == state._compile_config
