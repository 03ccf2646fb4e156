"""What sampling costs inside a real decode loop: the tiny decoder, `vInference`, and an argmax baseline.

`measure_loop(batch, ...)` runs the loop twice on the same prompts (warm-up, then timed) and reports
decode tokens per second and the time of one decode step; with `baseline=True` the step samples with
`argmax` instead of `vsampler.sample_step`. The sampler's share of a step is `1 - baseline / sampled`
from two measurements taken in the same process. Shared by `bench/test_loop.py` and the CLI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vsampler.core.params import SamplingParams
from vsampler.engine.config import vInferenceConfig, vInferencePreCompileConfig
from vsampler.engine.inference import vInference
from vsampler.impls.xla import first_index_of_max
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig

LOOP_CONFIGS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "top_k": {"temperature": 0.8, "top_k": 50},
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "full": {
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
    },
}


def argmax_step(
    logits: jax.Array, params: Any, keys: Any, *, finished: jax.Array, pad_token_id: int, **_: Any
) -> tuple[jax.Array, jax.Array]:
    """The baseline sampler: argmax, pad for finished rows, no EOS (the loop's length limit ends rows).

    The argmax is a row maximum then the first index holding it (`xla.first_index_of_max`): on XLA CPU
    a plain `jnp.argmax` costs several times more, which would flatter the sampler."""
    logits = logits.astype(jnp.float32)
    tokens = jax.vmap(first_index_of_max)(logits, jnp.max(logits, axis=-1))
    return jnp.where(finished, jnp.int32(pad_token_id), tokens), finished


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    batch: int
    vocab: int
    config: str
    baseline: bool
    tokens_per_second: float  # decode tokens (all rows) per second of decode calls
    step_ms: float  # one decode step of the whole batch


def tiny_model(vocab: int, seed: int = 0) -> TinyDecoder:
    return TinyDecoder(TinyDecoderConfig(vocab_size=vocab), rngs=nnx.Rngs(seed))


def build_loop(
    model: TinyDecoder,
    batch: int,
    *,
    config: str = "full",
    prompt_len: int = 16,
    new_tokens: int = 33,
    chunks: int = 16,
    impl: str = "auto",
    baseline: bool = False,
) -> tuple[vInference, np.ndarray]:
    """A precompiled engine for one batch size and its prompts (random ids, fixed seed)."""
    if config not in LOOP_CONFIGS:
        raise ValueError(f"config must be one of {sorted(LOOP_CONFIGS)}, got {config!r}")
    params = SamplingParams(max_tokens=new_tokens, **LOOP_CONFIGS[config])
    engine = vInference(
        model,
        vInferenceConfig(max_new_tokens=new_tokens, streaming_chunks=chunks, pad_token_id=0, sampling_params=params),
        impl=argmax_step if baseline else impl,
    )
    engine.precompile(vInferencePreCompileConfig(batch_size=batch, prefill_length=prompt_len))
    prompts = np.random.default_rng(0).integers(1, model.vocab_size, (batch, prompt_len), dtype=np.int32)
    return engine, prompts


def measure_loop(
    batch: int,
    *,
    vocab: int = 32000,
    config: str = "full",
    new_tokens: int = 33,
    chunks: int = 16,
    impl: str = "auto",
    baseline: bool = False,
    model: TinyDecoder | None = None,
) -> LoopTiming:
    """Decode throughput of the loop at one batch size (see the module docstring)."""
    model = model or tiny_model(vocab)
    engine, prompts = build_loop(
        model, batch, config=config, new_tokens=new_tokens, chunks=chunks, impl=impl, baseline=baseline
    )
    engine.generate_all(prompts, key=jax.random.key(0))  # warm-up: first calls pay one-off costs
    state = engine.generate_all(prompts, key=jax.random.key(1))
    steps = (new_tokens - 1 + chunks - 1) // chunks * chunks
    spent = float(state._time_spent_computing)
    return LoopTiming(
        batch=batch,
        vocab=model.vocab_size,
        config=config,
        baseline=baseline,
        tokens_per_second=float(state.tokens_per_second),
        step_ms=1e3 * spent / steps,
    )
