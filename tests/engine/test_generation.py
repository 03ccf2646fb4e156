"""The decode loop (`vInference`, `create_sampling_step`) against generation by full recomputation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from generation_reference import decode_row

from vsampler import SamplingParams, vInferenceConfig, vInferencePreCompileConfig
from vsampler.core.params import NUMERIC_FIELDS
from vsampler.engine.inference import vInference
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

MAX_NEW = 10
PAD = 0
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27]]
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def model() -> TinyDecoder:
    return TinyDecoder(TinyDecoderConfig(), rngs=nnx.Rngs(0))


def padded(prompts: list[list[int]], side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), 99, np.int32)  # 99: junk under the mask, never read
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        sl = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[r, sl], mask[r, sl] = p, 1
    return ids, mask


def engine(model, chunks: int, *, eos=None, sampling=None, n: int = 1, precompile: bool = True) -> vInference:
    cfg = vInferenceConfig(
        max_new_tokens=MAX_NEW,
        streaming_chunks=chunks,
        eos_token_id=eos,
        pad_token_id=PAD,
        num_return_sequences=n,
        sampling_params=sampling or SamplingParams(max_tokens=MAX_NEW, temperature=1.0),
    )
    e = vInference(model, cfg)
    if precompile:
        e.precompile(vInferencePreCompileConfig(batch_size=4, prefill_length=8))
    return e


def generated(state, row: int) -> list[int]:
    """Row `row`'s generated tokens up to its current length (pad after that is checked separately)."""
    seq = np.asarray(state.sequences[row])
    return seq[state.padded_length : int(state.current_length[row])].tolist()


def expected(model, params_per_row, *, eos=None, key=KEY, prompts=PROMPTS, n=1) -> list[list[int]]:
    return [
        decode_row(model, prompts[r // n], params_per_row[r], row=r, key=key, copies=n, max_new_tokens=MAX_NEW, eos=eos)
        for r in range(len(prompts) * n)
    ]


def stacked(rows: list[SamplingParams]) -> SamplingParams:
    return SamplingParams(**{f: np.asarray([np.asarray(getattr(p, f)) for p in rows]) for f in NUMERIC_FIELDS})


@pytest.fixture(scope="module")
def chunked_engines(model):
    return {c: engine(model, c) for c in (1, 3, 16)}


# -- correctness against recomputation -------------------------------------------------------------------


def test_greedy_loop_equals_recomputation_without_cache(model, chunked_engines):
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    ids, mask = padded(PROMPTS, side="left")
    state = chunked_engines[3].generate_all(ids, mask, sampling_params=greedy, key=KEY)
    want = expected(model, [greedy] * 3)
    assert [generated(state, r) for r in range(3)] == want
    assert state.padded_length == 8 and state._compile_config.prefill_length == 8
    assert int(state.generated_tokens) == 3 * MAX_NEW


@pytest.mark.parametrize("chunks", [1, 3, 16])
def test_same_key_same_tokens_for_any_chunking(model, chunked_engines, chunks):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.3)
    ids, mask = padded(PROMPTS)
    state = chunked_engines[chunks].generate_all(ids, mask, sampling_params=params, key=KEY)
    assert [generated(state, r) for r in range(3)] == expected(model, [params] * 3)


def test_heterogeneous_rows_and_penalties_over_real_tokens_only(model, chunked_engines):
    rows = [
        SamplingParams(max_tokens=4, temperature=0.0, presence_penalty=1.5),
        SamplingParams(max_tokens=MAX_NEW, temperature=0.8, top_p=0.7, frequency_penalty=0.7),
        SamplingParams(max_tokens=7, temperature=1.5, min_p=0.05, repetition_penalty=2.0),
    ]
    ids, mask = padded(PROMPTS)
    state = chunked_engines[3].generate_all(ids, mask, sampling_params=stacked(rows), key=KEY)
    want = expected(model, rows)
    assert [generated(state, r) for r in range(3)] == want
    assert [len(w) for w in want] == [4, MAX_NEW, 7]  # each row stops at its own max_tokens
    assert np.asarray(state.is_sequence_finished).all()
    assert int(state.generated_tokens) == 4 + MAX_NEW + 7
    seq = np.asarray(state.sequences)
    for r, n in enumerate((4, MAX_NEW, 7)):
        assert (seq[r, 8 + n :] == PAD).all()  # finished rows emit pad and never change again
    assert (seq[3] == PAD).all()  # the row that only fills the bucket


def test_eos_ids_stop_rows_and_min_tokens_delays_them(model):
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    free = expected(model, [greedy] * 3)
    # two EOS ids: the 3rd greedy token of row 0 and the 5th of row 2 (tokens that occur earlier in a row
    # stop it there, which the recomputation reproduces too)
    eos = [free[0][2], free[2][4]]
    e = engine(model, 4, eos=eos, sampling=greedy)
    ids, mask = padded(PROMPTS)
    state = e.generate_all(ids, mask, key=KEY)
    want = expected(model, [greedy] * 3, eos=eos)
    assert [generated(state, r) for r in range(3)] == want
    assert want[0][-1] in eos and len(want[0]) <= 3
    seq = np.asarray(state.sequences)
    for r in range(3):
        assert (seq[r, 8 + len(want[r]) :] == PAD).all()

    delayed = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, min_tokens=6)
    state = e.generate_all(ids, mask, sampling_params=delayed, key=KEY)
    want = expected(model, [delayed] * 3, eos=eos)
    assert [generated(state, r) for r in range(3)] == want
    assert all(t not in eos for w in want for t in w[:6])


def test_num_return_sequences_gives_adjacent_independent_samples(model):
    params = SamplingParams(max_tokens=6, temperature=2.0)
    e = engine(model, 4, sampling=params, n=2)
    ids, mask = padded(PROMPTS[:2])
    state = e.generate_all(ids, mask, key=KEY)
    assert state.sequences.shape[0] == 8  # batch_size 4 prompts x 2 copies
    got = [generated(state, r) for r in range(4)]
    assert got == expected(model, [params] * 4, prompts=PROMPTS[:2], n=2)
    assert got[0] != got[1] and got[2] != got[3]
    seq = np.asarray(state.sequences)
    assert (seq[0, :8] == seq[1, :8]).all() and (seq[2, :8] == seq[3, :8]).all()


# -- the loop's mechanics ---------------------------------------------------------------------------------


def test_streams_chunks_and_stops_launching_once_all_rows_finished(chunked_engines):
    ids, mask = padded(PROMPTS)
    states = list(chunked_engines[3].generate(ids, mask, sampling_params=SamplingParams(max_tokens=MAX_NEW)))
    assert len(states) == 1 + 3  # prefill, then ceil((10 - 1) / 3) chunks
    lengths = [int(np.asarray(s.current_length)[0]) for s in states]
    assert lengths == [9, 12, 15, 18]
    assert states[-1].tokens_per_second > 0 and states[-1]._time_spent_computing > 0
    short = list(chunked_engines[3].generate(ids, mask, sampling_params=SamplingParams(max_tokens=2)))
    assert len(short) == 2  # one chunk finished every row: no further chunk launched


def test_no_recompilation_for_new_values_prompts_and_keys(model, chunked_engines):
    e = chunked_engines[3]
    # the stages these calls use (top-k, top-p, repetition penalty) are compiled in once, up front
    bucket = vInferencePreCompileConfig(batch_size=4, prefill_length=8)
    e.precompile(bucket, sampling_params=SamplingParams(top_k=1, top_p=0.5, repetition_penalty=1.2))
    events: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    keys = [jax.random.key(s) for s in (1, 2, 3)]
    calls = [
        (PROMPTS, SamplingParams(max_tokens=5, temperature=0.7, top_k=3)),
        ([[1, 2], [3], [4, 5, 6, 7, 8, 9, 10, 11]], SamplingParams(max_tokens=MAX_NEW, temperature=0.0)),
        ([[40, 41, 42, 43]], SamplingParams(max_tokens=3, temperature=1.1, top_p=0.5, repetition_penalty=1.2)),
    ]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for key, (prompts, params) in zip(keys, calls, strict=True):
            ids, mask = padded(prompts)
            e.generate_all(ids, mask, sampling_params=params, key=key)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []


def test_on_demand_bucket_and_stage_widening(model):
    e = engine(model, 4, sampling=SamplingParams(max_tokens=3, temperature=0.0), precompile=False)
    ids, mask = padded(PROMPTS)
    state = e.generate_all(ids, mask)
    assert state.padded_length == 8 and state.sequences.shape[0] == 3
    # a stage outside the compiled set (top_k) compiles once more, then is reused
    e.generate_all(ids, mask, sampling_params=SamplingParams(max_tokens=3, top_k=5), key=KEY)
    assert len(e._executables) == 2
    e.generate_all(ids, mask, sampling_params=SamplingParams(max_tokens=3, top_k=9), key=KEY)
    assert len(e._executables) == 2


# -- errors -----------------------------------------------------------------------------------------------


def test_bad_inputs_get_specific_errors(model, chunked_engines):
    e = chunked_engines[3]
    ids, mask = padded(PROMPTS)
    with pytest.raises(ValueError, match="longer than the largest precompiled prefill_length"):
        e.generate_all(np.arange(1, 10, dtype=np.int32)[None], None)
    with pytest.raises(ValueError, match="no precompiled bucket fits batch 5"):
        e.generate_all(np.ones((5, 2), np.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        e.generate_all(ids, mask[:, :2])
    with pytest.raises(ValueError, match="no real token"):
        e.generate_all(ids, np.zeros_like(mask))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        e.generate_all(np.array([[1, 512]], np.int32))
    with pytest.raises(ValueError, match=r"exceeds vInferenceConfig\.max_new_tokens"):
        e.generate_all(ids, mask, sampling_params=SamplingParams(max_tokens=MAX_NEW + 1))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, length\)"):
        e.generate_all(np.ones(3, np.int32))
    with pytest.raises(ValueError, match=r"eos_token_id \[600\] outside the model's vocabulary"):
        vInference(model, vInferenceConfig(eos_token_id=[2, 600], pad_token_id=0))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        vInferenceConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="needs pad_token_id"):
        vInference(model, vInferenceConfig())


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
def test_loop_on_each_impl_equals_recomputation(model, impl):
    """The loop with each sampler implementation (the kernel in interpret mode, through its own
    finished/EOS/pad entry) gives the recomputation's tokens."""
    rows = [
        SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(max_tokens=MAX_NEW, temperature=1.2, top_k=30, top_p=0.8, min_tokens=3),
        SamplingParams(max_tokens=MAX_NEW, temperature=0.9, min_p=0.1, presence_penalty=1.0),
    ]
    params = stacked(rows)
    greedy = expected(model, [SamplingParams(max_tokens=MAX_NEW, temperature=0.0)] * 3)
    eos = [greedy[1][4]]  # a token row 1 is likely to meet
    e = vInference(
        model,
        vInferenceConfig(
            max_new_tokens=MAX_NEW, streaming_chunks=4, eos_token_id=eos, pad_token_id=PAD, sampling_params=params
        ),
        impl=impl,
    )
    ids, mask = padded(PROMPTS)
    state = e.generate_all(ids, mask, key=KEY)
    assert [generated(state, r) for r in range(3)] == expected(model, rows, eos=eos)


def test_per_request_keys_make_a_request_independent_of_its_batch(model):
    """With one key per request, a request's tokens do not depend on its neighbours, its place in the batch
    or the bucket size (rows that only fill the bucket included)."""
    params = SamplingParams(max_tokens=6, temperature=1.2, top_p=0.9)
    e = engine(model, 3, sampling=params, precompile=False)
    e.precompile(vInferencePreCompileConfig(batch_size=[1, 8, 64], prefill_length=8))
    request, key = [4, 8, 15, 16], jax.random.key(42)
    alone = e.generate_all(np.array([request], np.int32), key=key[None])
    others = np.random.default_rng(3).integers(1, 500, (7, 4)).astype(np.int32)
    batch = np.insert(others, 5, request, axis=0)  # the request at row 5 of 8
    keys = jax.random.split(jax.random.key(0), 8).at[5].set(key)
    crowded = e.generate_all(batch, key=keys)
    assert generated(alone, 0) == generated(crowded, 5)
    many = np.random.default_rng(4).integers(1, 500, (50, 4)).astype(np.int32)  # 50 prompts: bucket 64
    many[37] = request
    keys = jax.random.split(jax.random.key(1), 50).at[37].set(key)
    assert generated(alone, 0) == generated(e.generate_all(many, key=keys), 37)
    assert alone.sequences.shape[0] == 1 and crowded.sequences.shape[0] == 8
    want = decode_row(model, request, params, row=0, key=key, per_request_key=True, max_new_tokens=MAX_NEW, eos=None)
    assert generated(alone, 0) == want
    with pytest.raises(ValueError, match="one per prompt"):
        e.generate_all(batch, key=jax.random.split(key, 3))
