"""Timing and checking vsampler's implementations and the peers a user would otherwise pick.

Used by `vsampler bench` and `bench/`. Every timed function is jitted and compiled before it is timed;
a measurement is the median wall time of `repeats` calls, each waited on (`block_until_ready`).
Speed is reported as ratios measured in one run, never asserted.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core import sampling
from vsampler.tools.workloads import Workload, WorkloadInputs

Runner = Callable[[WorkloadInputs], jax.Array]


SLOW_CALL_S = 0.5  # calls slower than this (the sort-based reference at large shapes) are repeated 3 times


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls (3 at most for calls over `SLOW_CALL_S`), after one
    untimed warm-up (compilation) call."""
    jax.block_until_ready(fn())
    samples = []
    for i in range(repeats):
        if i == 3 and min(samples) > SLOW_CALL_S:
            break
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Timing:
    """The timed calls of one function (seconds), and the last call's output."""

    samples: tuple[float, ...]
    output: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how much the machine's speed moved during the measurement."""
        return (max(self.samples) - min(self.samples)) / self.median


def time_interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[Timing]:
    """Each of `fns` timed in turn within every repetition, after one untimed warm-up call each
    (compilation), so that drift in the machine's speed falls on all of them alike: for ratios.
    A function whose calls all took over `SLOW_CALL_S` stops after 3 (the sort-based reference, the
    peers' sorts at serving sizes); the others run `repeats` times. Each `Timing` keeps its last output
    (a timed call's, so a check needs no extra call)."""
    for fn in fns:
        jax.block_until_ready(fn())
    samples: list[list[float]] = [[] for _ in fns]
    outputs: list[Any] = [None] * len(fns)
    for i in range(repeats):
        for j, fn in enumerate(fns):
            if i >= 3 and min(samples[j]) > SLOW_CALL_S:
                continue
            start = time.perf_counter()
            outputs[j] = jax.block_until_ready(fn())
            samples[j].append(time.perf_counter() - start)
    return [Timing(tuple(s), out) for s, out in zip(samples, outputs, strict=True)]


def paired_ratios(numerator: Timing, denominator: Timing) -> list[float]:
    """Per repetition, numerator / denominator from the same round of `time_interleaved`: a ratio that
    a slow moment of the machine moves much less than a ratio of medians."""
    return [a / b for a, b in zip(numerator.samples, denominator.samples, strict=False)]


# --------------------------------------------------------------------------------------- our impls


def impl_runner(impl: str) -> Runner:
    def run(inp: WorkloadInputs) -> jax.Array:
        return sampling.sample(
            inp.logits, inp.params, inp.key, history=inp.history, prompt_len=inp.prompt_len, impl=impl
        )

    return run


# ------------------------------------------------------------------------------ serving features

LOGPROBS_N = 5  # top entries the log-prob features ask for (OpenAI's API allows up to 20)
FEATURES: dict[str, str] = {
    "logprobs raw": f"sample(..., logprobs={LOGPROBS_N}, logprobs_mode='raw')",
    "logprobs processed": f"sample(..., logprobs={LOGPROBS_N}, logprobs_mode='processed')",
    "allowed_tokens": "sample(..., allowed_tokens=mask): a packed mask allowing a random half of the vocabulary",
}
FEATURE_EOS = 0  # the EOS id the masked runs name (a row the mask empties would end on it)


def feature_kwargs(feature: str, batch: int, vocab: int) -> dict[str, Any]:
    """The extra `sample` arguments of a serving feature (the mask is seeded: the same every run)."""
    if feature.startswith("logprobs"):
        return {"logprobs": LOGPROBS_N, "logprobs_mode": feature.split()[1]}
    if feature == "allowed_tokens":
        from vsampler.core.inputs import pack_allowed

        allowed = np.random.default_rng(batch * 7 + vocab).random((batch, vocab)) < 0.5
        return {"allowed_tokens": jnp.asarray(pack_allowed(allowed)), "eos_token_id": FEATURE_EOS}
    raise ValueError(f"unknown feature {feature!r}; known: {sorted(FEATURES)}")


def feature_runner(impl: str, feature: str, batch: int, vocab: int) -> Runner:
    """`impl` with one serving feature on; returns the tokens (log-probs are computed and discarded
    after the wait, as a server would read them)."""
    kwargs = feature_kwargs(feature, batch, vocab)

    def run(inp: WorkloadInputs) -> Any:
        return sampling.sample(
            inp.logits, inp.params, inp.key, history=inp.history, prompt_len=inp.prompt_len, impl=impl, **kwargs
        )

    return run


def check_feature(inp: WorkloadInputs, impl: str, feature: str, batch: int, vocab: int) -> bool:
    """The feature's output equals the reference's on the same inputs and key: tokens, and log-probs
    (ids exactly, values within `vsampler.tools.verification.LOGPROBS_TOLERANCE`)."""
    from vsampler.tools.verification import logprobs_close

    got = feature_runner(impl, feature, batch, vocab)(inp)
    want = feature_runner("reference", feature, batch, vocab)(inp)
    if not feature.startswith("logprobs"):
        return bool(np.array_equal(np.asarray(got), np.asarray(want)))
    (tokens, lp), (want_tokens, want_lp) = got, want
    return bool(
        np.array_equal(np.asarray(tokens), np.asarray(want_tokens))
        and np.array_equal(np.asarray(lp.top_ids), np.asarray(want_lp.top_ids))
        and logprobs_close(lp.top, want_lp.top)
        and logprobs_close(lp.token, want_lp.token)
    )


# ------------------------------------------------------------------------------------------- peers


@jax.jit
def _floor(logits: jax.Array) -> jax.Array:
    x = logits.astype(jnp.float32)
    return jnp.sum(jnp.exp(x - jnp.max(x, axis=1, keepdims=True)), axis=1)


def floor_runner(inp: WorkloadInputs) -> jax.Array:
    """One `sum(exp(x - max))` pass: about the least any exact sampler must do."""
    return _floor(inp.logits)


@jax.jit
def _categorical(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    x = logits.astype(jnp.float32)
    greedy = temperature == 0
    sampled = jax.random.categorical(key, x / jnp.where(greedy, 1.0, temperature)[:, None], axis=-1)
    return jnp.where(greedy, jnp.argmax(x, axis=-1), sampled)


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1)


def categorical_runner(inp: WorkloadInputs) -> jax.Array:
    """Full-vocabulary `jax.random.categorical` after temperature: no filtering, no penalties.
    An all-greedy batch is a plain `jnp.argmax`, as a user would write it."""
    if not inp.params.stages.random:
        return _argmax(inp.logits)
    return _categorical(
        inp.logits, jnp.broadcast_to(jnp.asarray(inp.params.temperature), inp.logits.shape[:1]), inp.key
    )


def hf_flax_runner() -> Runner | None:
    """HF transformers' Flax warpers (temperature, top-k, top-p) + `jax.random.categorical`.

    HF has no Flax min-p or repetition penalty: for the "full" config it runs the rest. None when
    transformers is not installed.
    """
    try:
        from transformers.generation import flax_logits_process as hf
    except Exception:
        return None
    cache: dict[tuple[float, int, float], Callable[..., jax.Array]] = {}

    def build(temperature: float, top_k: int, top_p: float) -> Callable[..., jax.Array]:
        warpers = [hf.FlaxTemperatureLogitsWarper(temperature)] if temperature > 0 else []
        if top_k > 0:
            warpers.append(hf.FlaxTopKLogitsWarper(top_k))
        if top_p < 1:
            warpers.append(hf.FlaxTopPLogitsWarper(top_p))

        @jax.jit
        def run(logits: jax.Array, key: jax.Array) -> jax.Array:
            scores = logits.astype(jnp.float32)
            if temperature == 0:
                return jnp.argmax(scores, axis=-1)
            for warper in warpers:
                scores = warper(None, scores, 0)
            return jax.random.categorical(key, scores, axis=-1)

        return run

    def run(inp: WorkloadInputs) -> jax.Array:
        p = inp.params
        setting = tuple(float(np.asarray(v).reshape(-1)[0]) for v in (p.temperature, p.top_k, p.top_p))
        if setting not in cache:
            cache[setting] = build(setting[0], int(setting[1]), setting[2])
        return cache[setting](inp.logits, inp.key)

    return run


# ---------------------------------------------------------------------------------------- checking


@dataclasses.dataclass
class Check:
    """Verification of one implementation's tokens on one workload."""

    rows: int
    agree: int  # rows whose token equals the reference's for the same key
    in_kept_set: int  # rows whose token the reference keeps
    greedy_ok: bool  # greedy rows equal the penalised argmax
    boundary: int = 0  # rows drawing the reference's kept neighbour where rounding decides (verify's rule)

    @property
    def ok(self) -> bool:
        return self.agree + self.boundary == self.rows and self.in_kept_set == self.rows and self.greedy_ok


def check_tokens(w: Workload, inp: WorkloadInputs, tokens: jax.Array, reference_tokens: jax.Array) -> Check:
    """Compares `tokens` with the reference's on the same inputs and key."""
    warped = np.asarray(sampling.process_logits(inp.logits, inp.params, history=inp.history, prompt_len=inp.prompt_len))
    tokens = np.asarray(tokens)
    rows = np.arange(w.batch)
    in_range = (tokens >= 0) & (tokens < w.vocab)
    kept = in_range & (warped[rows, np.clip(tokens, 0, w.vocab - 1)] > -np.inf)
    greedy = np.asarray(jnp.broadcast_to(jnp.asarray(inp.params.temperature), (w.batch,))) == 0
    greedy_ok = bool(np.all(tokens[greedy] == np.argmax(warped[greedy], axis=1))) if greedy.any() else True
    reference_tokens = np.asarray(reference_tokens)
    boundary = 0
    if in_range.all() and not np.array_equal(tokens, reference_tokens):
        from vsampler.core.inputs import draw_uniforms
        from vsampler.tools.verification import rounding_boundary

        reference_warped = sampling.process_logits(
            inp.logits, inp.params, history=inp.history, prompt_len=inp.prompt_len, impl="reference"
        )
        u = np.asarray(draw_uniforms(inp.key, w.batch))
        boundary = int(rounding_boundary(np.asarray(reference_warped), u, reference_tokens, tokens).sum())
    return Check(
        rows=w.batch,
        agree=int(np.sum(tokens == reference_tokens)),
        in_kept_set=int(kept.sum()),
        greedy_ok=greedy_ok,
        boundary=boundary,
    )
