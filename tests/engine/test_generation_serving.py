"""The decode loop's serving features: log-probs written beside each token, and an allowed-token mask
applied at every step (and replaced between chunks by `send`), against full recomputation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from generation_reference import decode_row

from vsampler import SamplingParams, pack_allowed, vInferenceConfig, vInferencePreCompileConfig
from vsampler.engine.inference import vInference
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

MAX_NEW = 8
PAD = 0
EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24]]
KEY = jax.random.key(3)
SAMPLING = SamplingParams(
    max_tokens=MAX_NEW, temperature=np.array([0.0, 0.9, 1.2], np.float32), top_k=np.array([0, 40, 0]), top_p=0.95
)


@pytest.fixture(scope="module")
def model() -> TinyDecoder:
    return TinyDecoder(TinyDecoderConfig(), rngs=nnx.Rngs(1))


def make_engine(model, chunks: int = 3) -> vInference:
    cfg = vInferenceConfig(max_new_tokens=MAX_NEW, streaming_chunks=chunks, eos_token_id=EOS, pad_token_id=PAD)
    return vInference(model, cfg)


def inputs() -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((3, 5), np.int32)
    mask = np.zeros_like(ids)
    for r, p in enumerate(PROMPTS):
        ids[r, : len(p)], mask[r, : len(p)] = p, 1
    return ids, mask


def test_logprobs_are_written_beside_each_token(model):
    engine = make_engine(model)
    engine.precompile(vInferencePreCompileConfig(batch_size=4, prefill_length=8), logprobs=3, logprobs_mode="processed")
    state = engine.generate_all(*inputs(), sampling_params=SAMPLING, key=KEY, logprobs=3, logprobs_mode="processed")
    start = state.padded_length
    for r in range(3):
        row_params = SamplingParams(
            max_tokens=MAX_NEW, temperature=float(SAMPLING.temperature[r]), top_k=int(SAMPLING.top_k[r]), top_p=0.95
        )
        tokens, steps = decode_row(
            model,
            PROMPTS[r],
            row_params,
            row=r,
            key=KEY,
            max_new_tokens=MAX_NEW,
            eos=[EOS],
            logprobs=3,
            logprobs_mode="processed",
        )
        end = start + len(tokens)
        assert np.asarray(state.sequences[r, start:end]).tolist() == tokens
        want_token = np.array([float(s.token[0]) for s in steps])
        np.testing.assert_allclose(np.asarray(state.token_logprobs[r, start:end]), want_token, atol=1e-4)
        want_ids = np.stack([np.asarray(s.top_ids[0]) for s in steps])
        assert np.array_equal(np.asarray(state.top_logprob_ids[r, start:end]), want_ids)
        want_top = np.stack([np.asarray(s.top[0]) for s in steps])
        np.testing.assert_allclose(np.asarray(state.top_logprobs[r, start:end]), want_top, atol=1e-4)
        want_ranks = [int(s.rank[0]) for s in steps]
        assert np.asarray(state.token_ranks[r, start:end]).tolist() == want_ranks
        ranks = np.asarray(state.token_ranks[r])
        assert np.all(ranks[:start] == 0) and np.all(ranks[end:] == 0)  # prompt and unwritten slots
        assert np.all(np.asarray(state.token_logprobs[r, :start]) == 0.0)  # prompt slots
        assert np.all(np.asarray(state.token_logprobs[r, end:]) == 0.0)  # never written
    assert np.all(np.asarray(state.token_logprobs)[0, start : start + 1] == 0.0)  # greedy row: certain


def test_a_mask_holds_at_every_step_and_can_be_replaced_between_chunks(model):
    vocab = model.vocab_size
    allowed = np.zeros((3, vocab), bool)
    allowed[:, 100:140] = True
    allowed[1, :] = False
    allowed[1, [EOS, 300]] = True
    mask = pack_allowed(allowed)
    engine = make_engine(model, chunks=1)
    gen = engine.generate(*inputs(), sampling_params=SAMPLING, key=KEY, allowed_tokens=mask)
    state = next(gen)
    states = [state]
    later = np.zeros((3, vocab), bool)
    later[:, 200:210] = True
    state = gen.send(pack_allowed(later))  # from the next chunk on
    states.append(state)
    states.extend(gen)
    start = states[0].padded_length
    first = np.asarray(states[0].sequences[:, start])
    for r in range(3):
        assert allowed[r, first[r]]
        tokens = [t for t in np.asarray(states[-1].sequences[r, start + 1 : int(states[-1].current_length[r])])]
        assert all(200 <= t < 210 for t in tokens), tokens
    # the first step equals full recomputation under the same mask
    for r in range(3):
        row_params = SamplingParams(
            max_tokens=1, temperature=float(SAMPLING.temperature[r]), top_k=int(SAMPLING.top_k[r]), top_p=0.95
        )
        want = decode_row(
            model, PROMPTS[r], row_params, row=r, key=KEY, max_new_tokens=1, eos=[EOS], allowed=mask[r : r + 1]
        )
        assert first[r] == want[0]


def test_bad_masks_and_sends_are_refused(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match=r"allowed_tokens must be an int32 packed bitmask \(B, ceil\(V / 32\)\)"):
        next(engine.generate(*inputs(), sampling_params=SAMPLING, allowed_tokens=np.zeros((3, 5), np.int32)))
    gen = engine.generate(*inputs(), sampling_params=SAMPLING)
    next(gen)
    with pytest.raises(ValueError, match="a mask was sent to a generation started without allowed_tokens"):
        gen.send(np.zeros((3, 1000), np.int32))


def test_each_request_stops_on_its_own_stop_ids(model):
    """Per-request stop ids: each prompt's rows finish on the config's EOS or their own ids, and
    min_tokens masks both, as full recomputation with that row's stop set says."""
    params = SamplingParams(
        max_tokens=MAX_NEW,
        min_tokens=np.array([2, 0, 1]),
        temperature=np.array([0.0, 0.9, 1.2], np.float32),
        top_k=np.array([0, 40, 0]),
        top_p=0.95,
    )

    def reference(r: int, eos: list[int]) -> list[int]:
        row = SamplingParams(
            max_tokens=MAX_NEW,
            min_tokens=int(params.min_tokens[r]),
            temperature=float(params.temperature[r]),
            top_k=int(params.top_k[r]),
            top_p=0.95,
        )
        return decode_row(model, PROMPTS[r], row, row=r, key=KEY, max_new_tokens=MAX_NEW, eos=eos)

    free = [reference(r, [EOS]) for r in range(3)]
    # row 0 stops on its first token (masked by min_tokens 2) and its fourth; row 2 on its third
    stops = [[free[0][0], free[0][3]], [], [free[2][2]]]
    want = [reference(r, [EOS, *stops[r]]) for r in range(3)]
    assert want[0] != free[0] and want[2] != free[2]  # the stop ids matter to this case
    assert len(want[0]) > 2 and free[0][0] not in want[0][:2]  # masked while min_tokens holds, not a stop
    engine = make_engine(model)
    engine.precompile(vInferencePreCompileConfig(batch_size=4, prefill_length=8), params, stop_token_ids=2)
    compiled = len(engine._executables)
    for given in (stops, np.array([stops[0], [-1, -1], [stops[2][0], -1]])):
        state = engine.generate_all(*inputs(), sampling_params=params, key=KEY, stop_token_ids=given)
        start = state.padded_length
        for r in range(3):
            got = np.asarray(state.sequences[r, start : int(state.current_length[r])]).tolist()
            assert got == want[r], f"row {r}"
        assert np.asarray(state.is_sequence_finished).all()
    assert len(engine._executables) == compiled  # up to 2 ids a request: the precompiled width serves


def test_bad_stop_ids_are_refused(model):
    engine = make_engine(model)
    ids, mask = inputs()
    for bad, message in (
        ([[3], [4]], "2 entries but there are 3 prompts"),
        ([[3], [-2], []], r"stop_token_ids\[1\] must hold token ids"),
        ([[3], [1.5], []], r"stop_token_ids\[1\] must be a token id"),
        ([[3], [10**6], []], r"stop_token_ids\[1\] holds \[1000000\] outside the model's vocabulary"),
        (7, "one entry per prompt"),
    ):
        with pytest.raises(ValueError, match=message):
            next(engine.generate(ids, mask, sampling_params=SAMPLING, key=KEY, stop_token_ids=bad))
    with pytest.raises(ValueError, match="stop_token_ids is the most stop ids"):
        engine.precompile(vInferencePreCompileConfig(batch_size=4, prefill_length=8), stop_token_ids=-1)
