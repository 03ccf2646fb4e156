"""Cases run twice by `tests/core/test_hardening_x64.py`, each time in a process of its own: in the default
32-bit mode and with `jax_enable_x64` on. Every public entry point is exercised; `run()` returns plain numpy
arrays by name, and the two runs must agree exactly (tokens, and float32 values bit for bit).

`python tests/core/x64_cases.py OUT.npz` writes `run()` to OUT.npz, and under `X64_KEY` whether x64 was
on."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

B, V = 4, 300
IMPLS = ("reference", "xla", "pallas", "pallas-chunked", "pallas-triton")
FULL = ("reference", "xla", "pallas")  # every entry; the other kernel variants: sample with a mask
X64_KEY = "jax_enable_x64"


def _inputs():
    from vsampler import SamplingParams, pack_allowed

    logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * 3
    params = SamplingParams(
        temperature=np.array([0.0, 0.7, 0.7, 1.0], np.float32),
        top_k=np.array([0, 5, 0, 0]),
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        min_tokens=np.array([0, 3, 0, 0]),
        logit_bias={3: 1.0, 7: -np.inf},
    )
    dense = SamplingParams(temperature=0.9, top_k=40, logit_bias=np.linspace(-1, 1, V, dtype=np.float32))
    history = np.full((B, 8), -1, np.int64)  # int64 ids, as numpy gives them
    history[:, :4] = [[7, 9, 9, 2], [1, 2, 3, 4], [5, 5, 5, 5], [299, 0, 1, 8]]
    allowed = np.ones((B, V), bool)
    allowed[1, :150] = False
    allowed[2] = False  # nothing allowed: the row samples the first EOS id
    keys = jax.random.split(jax.random.key(1), B)
    return logits, params, dense, history, pack_allowed(allowed), keys


def run() -> dict[str, np.ndarray]:
    from vsampler import process_logits, sample, sample_step

    logits, params, dense, history, allowed, keys = _inputs()
    extra = {"history": history, "prompt_len": np.array([2, 2, 1, 0]), "eos_token_id": [2, np.int64(4)]}
    out: dict[str, np.ndarray] = {}
    for impl in IMPLS:
        out[f"{impl}/masked"] = np.asarray(sample(logits, params, keys, **extra, allowed_tokens=allowed, impl=impl))
        if impl not in FULL:
            continue
        for mode in ("raw", "processed"):
            tokens, lp = sample(logits, params, keys, **extra, logprobs=3, logprobs_mode=mode, impl=impl)
            out[f"{impl}/sample/{mode}"] = np.asarray(tokens)
            out[f"{impl}/logprob/{mode}"] = np.asarray(lp.token)
            out[f"{impl}/top/{mode}"] = np.asarray(lp.top)
            out[f"{impl}/top_ids/{mode}"] = np.asarray(lp.top_ids)
        out[f"{impl}/dense"] = np.asarray(sample(logits, dense, keys[0], impl=impl))
        out[f"{impl}/process"] = np.asarray(process_logits(logits, params, **extra, impl=impl))
        finished = np.array([False, True, False, False])
        tokens, done = sample_step(logits, params, keys, finished=finished, pad_token_id=1, **extra, impl=impl)
        out[f"{impl}/step"] = np.asarray(tokens)
        out[f"{impl}/step_finished"] = np.asarray(done)
    out.update(_loop())
    return out


def _loop() -> dict[str, np.ndarray]:
    from flax import nnx

    from vsampler import SampleState, SamplingParams, vInferenceConfig
    from vsampler.engine.inference import vInference
    from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

    out = {}
    ids = np.array([[5, 6, 7], [8, 9, 0]], np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.int64)
    sampling = SamplingParams(
        max_tokens=np.array([6, 4]), temperature=np.array([0.0, 1.0]), top_k=5, repetition_penalty=1.2, min_tokens=1
    )
    for mode in ("fp", "int8", "nf4"):
        model = TinyDecoder(TinyDecoderConfig(cache_mode=mode, head_dim=64), rngs=nnx.Rngs(0))
        cfg = vInferenceConfig(
            max_new_tokens=6, streaming_chunks=3, eos_token_id=[2], pad_token_id=0, sampling_params=sampling
        )
        state = vInference(model, cfg, impl="xla").generate_all(ids, mask, key=jax.random.key(0), logprobs=2)
        out[f"loop/{mode}/sequences"] = np.asarray(state.sequences)
        out[f"loop/{mode}/logprobs"] = np.asarray(state.token_logprobs)
        again = SampleState.from_json(state.replace(model_kwargs=None).to_json())
        out[f"loop/{mode}/json"] = np.asarray(again.sequences)
    return out


if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import compile_policy  # the suite's compile policy (tests/conftest.py installs it in pytest's processes)

    compile_policy.install()
    np.savez(sys.argv[1], **run(), **{X64_KEY: np.asarray(jax.config.jax_enable_x64)})
