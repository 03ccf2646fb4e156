"""The vocabulary-parallel sampler (`sample(..., mesh=, vocab_axis=)`) against the unsharded reference:
the same token for the same key on 2, 4 and 8 shards, for a V the shards divide and one they do not,
on a heterogeneous batch; and its compiled HLO moves nothing vocabulary-sized (an all-gather or
all-to-all of the logits, or any collective with a vocabulary-sized dimension), a check shown to
catch programs that do gather."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vsampler import SamplingParams, sample
from vsampler.tools import communication
from vsampler.tools import verification as ver

B = 8
SEEDS = (0, 1, 2)
BIG_VOCABS = (128256, 50257)  # divisible by 2, 4 and 8; by none of them (padded with -inf)
SHARD_COUNTS = (2, 4, 8)


def _eos(vocab: int) -> tuple[int, ...]:
    return (2, 7, vocab - 3)  # one EOS id in the last shard


def heterogeneous_batch(vocab: int, dtype: str = "float32"):
    """B=8 rows, each its own case (logits kind and parameters), every stage of the spec active:

    0 greedy with a repetition penalty that moves its argmax     4 T 0.3, top-k 300, top-p 0.5, min-p 0.1
    1 T 0.7, top-k 50, top-p 0.9, min-p 0.05, all penalties      5 NaNs, T 1, top-k 64, top-p 0.99, rep 0.9
    2 two +inf tokens in different shards, top-p 0.95            6 all -inf but the last id (beside the padding)
    3 top-k 1, min_tokens masks a dominant EOS in the last shard 7 heavy ties (0.5 steps), top-k 20, top-p 0.8
    """
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((B, vocab)) * 3).astype(np.float32)
    x[2, [vocab // 3, vocab - 10]] = np.inf
    x[3, vocab - 3] = 40.0  # an EOS id: masked while the row is below min_tokens
    x[5, rng.random(vocab) < 0.02] = np.nan
    x[6, :] = -np.inf
    x[6, vocab - 1] = 1.5
    x[7] = np.round(x[7] * 2) / 2
    # history: ids over the whole vocabulary (every shard gets some), repeats, empty slots, an id >= V
    history = rng.integers(0, vocab, (B, 64))
    history[:, 40:48] = history[:, 32:40]  # repeats in the generated part
    history[:, 60:] = -1
    history[:, 59] = vocab + 5  # ignored like an empty slot
    history[0, 50:53] = int(np.argmax(x[0]))  # the greedy row's favourite, penalised
    history[1, 34:37] = np.argsort(-x[1])[:3]  # row 1's top tokens: presence / frequency move them
    prompt_len = np.array([16, 8, 0, 32, 16, 24, 8, 0])
    f32 = np.float32
    params = SamplingParams(
        temperature=np.array([0.0, 0.7, 1.0, 1.5, 0.3, 1.0, 1.0, 0.8], f32),
        top_k=np.array([0, 50, 0, 1, 300, 64, 0, 20]),
        top_p=np.array([1.0, 0.9, 0.95, 1.0, 0.5, 0.99, 1.0, 0.8], f32),
        min_p=np.array([0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0], f32),
        repetition_penalty=np.array([1.5, 1.1, 1.0, 1.0, 1.0, 0.9, 1.2, 1.0], f32),
        presence_penalty=np.array([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5], f32),
        frequency_penalty=np.array([0.0, 0.2, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0], f32),
        min_tokens=np.array([0, 3, 0, 1000, 0, 0, 0, 0]),
        max_tokens=2000,
        logit_bias={1: 1.0, vocab // 2 + 1: 2.5, vocab - 2: -np.inf},
        prompt_ignore_length=np.array([0, 0, 0, 0, 0, 2**31 - 1, 5, 0]),  # counted on the global history
    )
    return jnp.asarray(x, dtype), params, jnp.asarray(history, jnp.int32), jnp.asarray(prompt_len, jnp.int32)


def keys_for(seed: int) -> jax.Array:
    return jax.random.split(jax.random.key(seed), B)


def vocab_mesh(shards: int, axis: str = "tp") -> Mesh:
    return Mesh(np.array(jax.devices()[:shards]), (axis,))


def place(x: jax.Array, mesh: Mesh, axis: str = "tp") -> jax.Array:
    """Sharded over the vocabulary when the shards divide V (as a tensor-parallel lm head leaves it);
    JAX cannot lay out an uneven V that way, so such logits come replicated."""
    spec = P(None, axis) if x.shape[1] % mesh.shape[axis] == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))


def compile_sharded(mesh: Mesh, x, params, history, prompt_len, eos, axis: str = "tp"):
    """The AOT executable of the sharded `sample` (the same one runs the tokens and gives the HLO)."""

    def run(x, params, keys, history, prompt_len):
        kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": eos}
        return sample(x, params, keys, mesh=mesh, vocab_axis=axis, **kw)

    return jax.jit(run).lower(x, params, keys_for(0), history, prompt_len).compile()


def vocab_sized(
    found: list[communication.Collective], width: int, ops=("all-gather", "all-to-all")
) -> list[communication.Collective]:
    """The collectives among `ops` with an operand or result dimension >= one shard's vocabulary width."""
    return [c for c in found if c.op in ops and c.largest_dim >= width]


def assert_moves_nothing_vocabulary_sized(hlo_text: str, vocab: int, shards: int) -> None:
    width = -(-vocab // shards)
    found = communication.collectives(hlo_text)
    gathers = vocab_sized(found, width)
    assert not gathers, f"an all-gather / all-to-all moves a vocabulary-sized array: {gathers}"
    others = vocab_sized(found, width, ops=communication.COLLECTIVE_OPS)
    assert not others, f"a collective moves a vocabulary-sized array: {others}"
    ops = {c.op for c in found}
    assert {"all-reduce", "all-gather"} <= ops, f"expected the sampler's collectives, found {ops}"  # parsed
    # a few scalars per row: every collective moves at most (B, n) or (B, 2) values
    assert all(c.largest_dim <= max(B, shards) for c in found), [c for c in found if c.largest_dim > max(B, shards)]
    fixed = sum(c.operand_bytes * c.runs for c in found if c.runs is not None)
    assert fixed < 16 * B * 64, fixed  # ~ 40 (B, 1) collectives outside the data-dependent loops


# ------------------------------------------------------------------------------ the shared shapes


@pytest.fixture(scope="module", params=BIG_VOCABS, ids=lambda v: f"V{v}")
def big_case(request):
    """One heterogeneous batch per V and the reference's tokens for each seed."""
    vocab = request.param
    x, params, history, prompt_len = heterogeneous_batch(vocab)
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": _eos(vocab)}
    reference = {seed: np.asarray(sample(x, params, keys_for(seed), impl="reference", **kw)) for seed in SEEDS}
    return vocab, (x, params, history, prompt_len), reference


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_same_tokens_as_the_reference_and_no_vocabulary_sized_collective(big_case, shards):
    vocab, (x, params, history, prompt_len), reference = big_case
    mesh = vocab_mesh(shards)
    xs = place(x, mesh)
    compiled = compile_sharded(mesh, xs, params, history, prompt_len, _eos(vocab))
    for seed in SEEDS:
        tokens = np.asarray(compiled(xs, params, keys_for(seed), history, prompt_len))
        assert tokens.shape == (B,) and tokens.dtype == np.int32
        np.testing.assert_array_equal(tokens, reference[seed], err_msg=f"seed {seed}, {shards} shards")
    assert_moves_nothing_vocabulary_sized(compiled.as_text(), vocab, shards)


def test_the_batch_exercises_what_it_claims():
    """Guards the fixture: the rows' special cases hold in the reference's tokens (V = 50257)."""
    vocab = 50257
    x, params, history, prompt_len = heterogeneous_batch(vocab)
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": _eos(vocab)}
    tokens = np.asarray(sample(x, params, keys_for(0), impl="reference", **kw))
    assert tokens[0] != int(np.argmax(np.asarray(x[0])))  # the penalty moved the greedy row's argmax
    assert tokens[2] in (vocab // 3, vocab - 10)  # +inf tokens share the mass
    assert tokens[3] != vocab - 3  # the dominant EOS is masked (min_tokens)
    assert tokens[6] == vocab - 1  # the only finite token, beside the padding
    unmasked = dataclasses.replace(params, min_tokens=0)
    assert np.asarray(sample(x, unmasked, keys_for(0), impl="reference", **kw))[3] == vocab - 3  # top-k 1 picks it


# ------------------------------------------------------------------- dtypes, dense bias, greedy only


@pytest.mark.parametrize(
    ("vocab", "shards", "dtype", "config"),
    [(50257, 4, "bfloat16", "bias_dense"), (32000, 8, "float32", "greedy"), (1001, 8, "bfloat16", "combined")],
)
def test_other_stage_sets_and_bfloat16(vocab, shards, dtype, config):
    x = ver.logits("ties" if dtype == "bfloat16" else "normal", B, vocab, dtype)
    params = ver.params(config, B, vocab)
    history, prompt_len = ver.history(B, vocab)
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": ver.EOS}
    mesh = vocab_mesh(shards)
    xs = place(x, mesh)
    for seed in SEEDS[:2]:
        want = np.asarray(sample(x, params, keys_for(seed), impl="reference", **kw))
        got = np.asarray(sample(xs, params, keys_for(seed), mesh=mesh, vocab_axis="tp", **kw))
        np.testing.assert_array_equal(got, want, err_msg=f"{config} seed {seed}")


def test_hard_logits_over_many_keys():
    """Many draws on a small odd vocabulary (each row's u covers its CDF): ties, NaN, one finite token."""
    vocab, mesh = 1001, vocab_mesh(8)
    params = ver.params("heterogeneous", B, vocab)
    for seed, kind in enumerate(["ties", "nan", "one_finite", "normal"] * 3):
        x = ver.logits(kind, B, vocab, "float32", seed)
        history, prompt_len = ver.history(B, vocab, seed)
        kw = {"history": history, "prompt_len": prompt_len}
        want = np.asarray(sample(x, params, keys_for(seed), impl="reference", **kw))
        got = np.asarray(sample(place(x, mesh), params, keys_for(seed), mesh=mesh, vocab_axis="tp", **kw))
        np.testing.assert_array_equal(got, want, err_msg=f"{kind} seed {seed}")


def test_prompt_ignore_length_counts_the_rows_whole_prompt_not_each_shards():
    """The prompt tokens the repetition penalty leaves out are the row's first n real ones over the whole
    vocabulary: each shard sees only its own ids, so counting them there would leave out others."""
    vocab, shards = 1000, 4
    mesh = vocab_mesh(shards)
    x = np.zeros((B, vocab), np.float32)
    favourite = 900  # the last shard's id, the row's maximum
    x[:, favourite] = 3.0
    x[:, 901] = 2.0
    history = np.full((B, 5), -1, np.int32)
    history[:, 1:4] = [10, 300, favourite]  # left padding, then a prompt whose third real token is the favourite
    ignore = np.array([0, 1, 2, 3, 2**31 - 1, 2, 3, 0])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, prompt_ignore_length=ignore)
    kw = {"history": jnp.asarray(history), "prompt_len": 4}
    want = np.asarray(sample(jnp.asarray(x), params, None, impl="reference", **kw))
    assert want.tolist() == [901, 901, 901, favourite, favourite, 901, favourite, 901]
    got = np.asarray(sample(place(jnp.asarray(x), mesh), params, None, mesh=mesh, vocab_axis="tp", **kw))
    np.testing.assert_array_equal(got, want)


def test_min_p_one_keeps_the_maximum():
    """min_p = 1 keeps exactly the maximum (its e is exp(0) = 1, whatever the compiler fuses)."""
    vocab, mesh = 1000, vocab_mesh(8)
    x = jax.random.normal(jax.random.key(0), (B, vocab)) * 3
    params = SamplingParams(temperature=0.7, min_p=1.0)
    got = np.asarray(sample(place(x, mesh), params, keys_for(0), mesh=mesh, vocab_axis="tp"))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(x), axis=1))


# --------------------------------------------------------------------------------- the mesh argument


def test_ambient_mesh_with_other_axes():
    """The mesh of `jax.set_mesh`, with a second axis the batch is replicated over; one key for all rows."""
    vocab = 1000
    mesh = jax.make_mesh((2, 4), ("dp", "tp"), devices=jax.devices()[:8])
    x = ver.logits("normal", B, vocab, "float32")
    params = ver.params("combined", B, vocab)
    history, prompt_len = ver.history(B, vocab)
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": ver.EOS}
    want = np.asarray(sample(x, params, jax.random.key(5), impl="reference", **kw))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "tp")))
        got = np.asarray(sample(xs, params, jax.random.key(5), vocab_axis="tp", **kw))
    np.testing.assert_array_equal(got, want)


def test_argument_errors():
    x = jnp.zeros((2, 16))
    params = SamplingParams(temperature=0.5)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="needs a mesh"):
        sample(x, params, key, vocab_axis="tp")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        sample(x, params, key, mesh=vocab_mesh(2), vocab_axis="model")
    with pytest.raises(ValueError, match="without vocab_axis"):
        sample(x, params, key, mesh=vocab_mesh(2))
    with pytest.raises(ValueError, match="cannot be combined with vocab_axis"):
        sample(x, params, key, mesh=vocab_mesh(2), vocab_axis="tp", impl="xla")
    with pytest.raises(ValueError, match=r"must be a jax\.sharding\.Mesh"):
        sample(x, params, key, mesh="tp", vocab_axis="tp")


# ------------------------------------------------------------- the HLO check catches a gathering program


def test_hlo_check_catches_programs_that_gather_the_logits():
    """The same parse that passes the sampler fails programs that move the logits: an all-gather by
    resharding, an explicit all_gather and an all_to_all in shard_map; and the ordinary (not
    vocabulary-parallel) xla sampler on vocabulary-sharded logits, which XLA's partitioner runs by
    passing vocabulary-sized row pieces between devices (collective-permutes)."""
    vocab, shards = 8192, 8
    width = vocab // shards
    mesh = vocab_mesh(shards)
    xs = place(jax.random.normal(jax.random.key(0), (B, vocab)), mesh)

    def replicate_then_argmax(x):
        return jnp.argmax(jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())), axis=1)

    def in_shard_map(body):
        return jax.shard_map(body, mesh=mesh, in_specs=P(None, "tp"), out_specs=P(), check_vma=False)

    gather = in_shard_map(lambda x: jnp.argmax(jax.lax.all_gather(x, "tp", axis=1, tiled=True), axis=1))
    to_all = in_shard_map(lambda x: jax.lax.all_to_all(x, "tp", 0, 1, tiled=True).sum())
    params = SamplingParams(temperature=0.7, top_p=0.9)

    def xla_sampler(x):
        return sample(x, params, keys_for(0), impl="xla")

    for fn, ops in [
        (replicate_then_argmax, ("all-gather",)),
        (gather, ("all-gather",)),
        (to_all, ("all-to-all",)),
        (xla_sampler, communication.COLLECTIVE_OPS),
    ]:
        text = jax.jit(fn).lower(xs).compile().as_text()
        assert vocab_sized(communication.collectives(text), width, ops), f"{fn.__name__}: the check missed it"
        with pytest.raises(AssertionError, match="moves a vocabulary-sized array"):
            assert_moves_nothing_vocabulary_sized(text, vocab, shards)


def test_collective_parser_on_a_handwritten_module():
    """Operand shapes from the instruction or from its operand's definition; loop trip counts."""
    text = """HloModule m
%body (p: (s32[], f32[8,1])) -> (s32[], f32[8,1]) {
  %p = (s32[], f32[8,1]{1,0}) parameter(0)
  %v = f32[8,1]{1,0} get-tuple-element(%p), index=1
  %r = f32[8,1]{1,0} all-reduce(%v), channel_id=1, to_apply=%add
  ROOT %t = (s32[], f32[8,1]{1,0}) tuple(%i, %r)
}
%loop (p: (s32[], f32[8,1])) -> (s32[], f32[8,1]) {
  %p = (s32[], f32[8,1]{1,0}) parameter(0)
  %g = f32[8,8]{1,0} all-gather(f32[8,1]{1,0} %v), dimensions={1}
  ROOT %t = (s32[], f32[8,1]{1,0}) tuple(%i, %r)
}
ENTRY %main (x: bf16[8,16032]) -> f32[8] {
  %x = bf16[8,16032]{1,0} parameter(0)
  %a = bf16[8,128256]{1,0} all-gather(%x), dimensions={1}
  %w = (s32[], f32[8,1]{1,0}) while(%t0), condition=%c, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %u = (s32[], f32[8,1]{1,0}) while(%t1), condition=%c2, body=%loop
}
"""
    found = {c.name: c for c in communication.collectives(text)}
    assert set(found) == {"r", "g", "a"}
    assert found["a"].operand_shapes == ((8, 16032),) and found["a"].operand_bytes == 8 * 16032 * 2
    assert found["a"].result_shapes == ((8, 128256),) and found["a"].runs == 1
    assert found["r"].runs == 12 and found["r"].operand_bytes == 32
    assert found["g"].runs is None and found["g"].result_shapes == ((8, 8),)


# -------------------------------------------------------------------------------------- slow: more


@pytest.mark.slow
@pytest.mark.parametrize("case", ver.STAGE_CASES)
def test_each_stage_odd_vocabulary_bfloat16(case):
    vocab, mesh = 50257, vocab_mesh(8)
    x = ver.logits("ties", B, vocab, "bfloat16")
    params = ver.params(case, B, vocab)
    history, prompt_len = ver.history(B, vocab)
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": ver.EOS}
    for seed in SEEDS:
        want = np.asarray(sample(x, params, keys_for(seed), impl="reference", **kw))
        got = np.asarray(sample(place(x, mesh), params, keys_for(seed), mesh=mesh, vocab_axis="tp", **kw))
        np.testing.assert_array_equal(got, want, err_msg=f"{case} seed {seed}")


@pytest.mark.slow
@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_many_keys_big_vocabulary(shards):
    vocab = 128256
    x, params, history, prompt_len = heterogeneous_batch(vocab, "bfloat16")
    kw = {"history": history, "prompt_len": prompt_len, "eos_token_id": _eos(vocab)}
    mesh = vocab_mesh(shards)
    xs = place(x, mesh)
    for seed in range(10, 22):
        want = np.asarray(sample(x, params, keys_for(seed), impl="reference", **kw))
        got = np.asarray(sample(xs, params, keys_for(seed), mesh=mesh, vocab_axis="tp", **kw))
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
