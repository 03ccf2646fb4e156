"""Partition rules matched to the loop's state, and the loop sharded over meshes of 8 CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vsampler import (
    PartitionAxis,
    SamplingParams,
    pack_allowed,
    vInference,
    vInferenceConfig,
    vInferencePreCompileConfig,
)
from vsampler.engine.partitioning import create_mesh, leaf_name, match_partition_rules, named_shardings, rule_index
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

AXIS = PartitionAxis()
RULES = vInferenceConfig(partition_axis=AXIS).get_partition_rules()
CATCH_ALL = len(RULES) - 1
# what each leaf of the loop's state must be matched by (index into RULES), by name
INTENDED = [
    (r"^(sequences|running_token)$", 0),
    (r"^model_kwargs/(attention_mask|position_ids)$", 1),
    (r"^model_kwargs/past_key_values/views/\d+/(key|value)/(weight|scale)$", 2),
    (r"^model_kwargs/past_key_values/views/\d+/(key|value)/(packed|absmax)$", 3),
    (r"^model_kwargs/past_key_values/views/\d+/(key|value)$", 4),
    (r"^(allowed_tokens|token_logprobs|top_logprob_ids|top_logprobs|token_ranks|stop_token_ids)$", 5),
    (
        r"^(current_length|is_sequence_finished|prng_key|model_kwargs/cache_index|tokens_per_second|"
        r"generated_tokens|_time_spent_computing)$",
        CATCH_ALL,
    ),
]
MODEL = TinyDecoderConfig(num_heads=8, num_kv_heads=4, head_dim=64)  # 4 kv heads: shardable over tp=4


def intended_rule(name: str) -> int:
    import re

    matches = [i for pattern, i in INTENDED if re.search(pattern, name)]
    assert len(matches) == 1, f"the test does not know the leaf {name!r}"
    return matches[0]


def loop_state(mode: str, serving: bool = False):
    model = TinyDecoder(dataclasses.replace(MODEL, cache_mode=mode), rngs=nnx.Rngs(0))
    engine = vInference(model, vInferenceConfig(max_new_tokens=2, pad_token_id=0, eos_token_id=3))
    features = {
        "allowed_tokens": pack_allowed(np.ones((2, MODEL.vocab_size), bool)),
        "logprobs": 2,
        "stop_token_ids": [[4], []],
    }
    return engine.generate_all(np.ones((2, 3), np.int32), **(features if serving else {}))


@pytest.mark.parametrize(("mode", "serving"), [("fp", False), ("int8", False), ("nf4", False), ("fp", True)])
def test_every_state_leaf_is_matched_by_its_intended_rule(mode, serving):
    state = loop_state(mode, serving)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    names = [leaf_name(path) for path, _ in leaves]
    serving_leaves = (
        "allowed_tokens",
        "token_logprobs",
        "top_logprob_ids",
        "top_logprobs",
        "token_ranks",
        "stop_token_ids",
    )
    assert sum(n in serving_leaves for n in names) == (6 if serving else 0)
    assert sum("past_key_values" in n for n in names) == 2 * 2 * (1 if mode == "fp" else 2)
    for name in names:
        assert rule_index(RULES, name) == intended_rule(name), name
    specs = match_partition_rules(RULES, state)
    kv = P(AXIS.batch_axis, AXIS.key_sequence_axis, AXIS.head_axis, AXIS.attention_dim_axis)
    for leaf in jax.tree.leaves(specs.model_kwargs["past_key_values"], is_leaf=lambda x: isinstance(x, P)):
        assert leaf == kv
    assert specs.sequences == P(AXIS.batch_axis, AXIS.sequence_axis)
    assert specs.model_kwargs["cache_index"] == P()  # a scalar: trimmed to its rank


def test_specs_are_trimmed_to_rank_and_bad_layouts_name_the_leaf():
    rules = (("a", P("dp", "tp", "sp")), ("b", P("tp")), ("c", P("nope")), (".*", P()))
    tree = {"a": np.zeros((4, 8)), "b": np.zeros((6, 2)), "c": np.zeros((4,)), "d": np.zeros((3, 3))}
    specs = match_partition_rules(rules, tree)
    assert specs == {"a": P("dp", "tp"), "b": P("tp"), "c": P("nope"), "d": P()}
    mesh = create_mesh(dp=2, tp=4)
    with pytest.raises(ValueError, match=r"leaf 'b': dimension 0 of shape \(6, 2\) \(6\) is not divisible by the 4"):
        named_shardings(rules, {"b": tree["b"]}, mesh)
    with pytest.raises(ValueError, match=r"leaf 'c': mesh axes \['nope'\]"):
        named_shardings(rules, {"c": tree["c"]}, mesh)
    with pytest.raises(ValueError, match="no partition rule matches the leaf 'd'"):
        match_partition_rules(rules[:3], {"d": tree["d"]})
    shardings = named_shardings(rules, {"a": tree["a"], "d": tree["d"]}, mesh)
    assert shardings["a"].spec == P("dp", "tp") and shardings["d"].spec == P()
    with pytest.raises(ValueError, match="needs 16 devices"):
        create_mesh(dp=2, tp=8)


# -- the loop on a mesh -------------------------------------------------------------------------------------

PROMPTS = np.random.default_rng(1).integers(1, 512, (8, 7)).astype(np.int32)
PARAMS = SamplingParams(
    max_tokens=np.array([12, 12, 5, 12, 9, 12, 12, 12]),
    temperature=np.array([0.0, 1.0, 0.7, 1.3, 0.0, 0.9, 1.0, 1.0], np.float32),
    top_k=np.array([0, 40, 0, 20, 0, 0, 100, 0]),
    top_p=np.array([1.0, 0.9, 0.8, 1.0, 1.0, 0.95, 1.0, 1.0], np.float32),
    repetition_penalty=1.2,
)


ALLOWED = pack_allowed(np.random.default_rng(2).random((8, MODEL.vocab_size)) < 0.5)


def generate(mesh, mode="fp", serving=False):
    model = TinyDecoder(dataclasses.replace(MODEL, cache_mode=mode), rngs=nnx.Rngs(0))
    cfg = vInferenceConfig(
        max_new_tokens=12, streaming_chunks=4, eos_token_id=[3], pad_token_id=0, sampling_params=PARAMS
    )
    engine = vInference(model, cfg, mesh=mesh)
    features = {"allowed_tokens": ALLOWED, "logprobs": 3, "logprobs_mode": "processed"} if serving else {}
    engine.precompile(
        vInferencePreCompileConfig(batch_size=8, prefill_length=8),
        allowed_tokens=serving,
        **{k: v for k, v in features.items() if k != "allowed_tokens"},
    )
    state = engine.generate_all(PROMPTS, key=jax.random.key(5), **features)
    return state


@pytest.fixture(scope="module")
def single_device():
    return {mode: np.asarray(generate(None, mode).sequences) for mode in ("fp", "int8")}


@pytest.mark.slow
def test_sharded_loop_with_mask_and_logprobs_gives_the_single_device_results():
    want = generate(None, serving=True)
    got = generate(create_mesh(dp=2, tp=4), serving=True)
    assert got.top_logprobs.sharding.spec == P(AXIS.batch_axis)
    assert (np.asarray(got.sequences) == np.asarray(want.sequences)).all()
    assert (np.asarray(got.top_logprob_ids) == np.asarray(want.top_logprob_ids)).all()
    np.testing.assert_allclose(np.asarray(got.top_logprobs), np.asarray(want.top_logprobs), atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.token_logprobs), np.asarray(want.token_logprobs), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "mode"), [({"dp": 2, "tp": 4}, "fp"), ({"fsdp": 8}, "fp"), ({"dp": 2, "tp": 4}, "int8")]
)
def test_sharded_loop_gives_the_single_device_tokens(single_device, layout, mode):
    mesh = create_mesh(**layout)
    state = generate(mesh, mode)
    assert state.sequences.sharding.spec == P(AXIS.batch_axis, AXIS.sequence_axis)
    cache = state.model_kwargs["past_key_values"].views[0].key
    leaf = cache if mode == "fp" else cache.weight
    assert len(leaf.sharding.device_set) == 8
    assert (np.asarray(state.sequences) == single_device[mode]).all()
