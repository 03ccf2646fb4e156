"""The embedded benchmark and verification workloads, shared by `vsampler bench` and `bench/`.

Logits are `normal * 3` (a spread like a real LM head's), built from a fixed seed, so every run and every
implementation sees the same inputs. The history for the penalty config holds 512 real tokens: a
prompt of 384 and 128 generated ones.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from vsampler.core.params import SamplingParams

HISTORY_LEN = 512
PROMPT_LEN = 384

# name -> description; `config_params` builds them as per-row arrays, as a serving batch has.
CONFIGS: dict[str, str] = {
    "greedy": "temperature 0 (argmax after penalties)",
    "top_k": "temperature 0.7 + top-k 50",
    "top_p": "temperature 0.7 + top-p 0.9 (full-vocabulary top-p)",
    "full": "temperature 0.7 + top-k 50 + top-p 0.9 + min-p 0.05 + repetition 1.1 over a 512-token history",
}
# configs outside the default grid: a peer's published setting, for side-by-side estimates
PEER_CONFIGS: dict[str, str] = {
    "k64_p95": "temperature 1.0 + top-k 64 + top-p 0.95 (tpu-inference's published kernel benchmark)",
}


def config_params(name: str, batch: int) -> SamplingParams:
    """The sampling parameters of a named config, as per-row (B,) arrays."""

    def rows(value: float, dtype: type = float) -> jax.Array:
        return jnp.full((batch,), value, jnp.int32 if dtype is int else jnp.float32)

    if name == "greedy":
        return SamplingParams(temperature=rows(0.0))
    if name == "top_k":
        return SamplingParams(temperature=rows(0.7), top_k=rows(50, int))
    if name == "top_p":
        return SamplingParams(temperature=rows(0.7), top_p=rows(0.9))
    if name == "k64_p95":
        return SamplingParams(temperature=rows(1.0), top_k=rows(64, int), top_p=rows(0.95))
    if name == "full":
        return SamplingParams(
            temperature=rows(0.7),
            top_k=rows(50, int),
            top_p=rows(0.9),
            min_p=rows(0.05),
            repetition_penalty=rows(1.1),
        )
    raise ValueError(f"unknown config {name!r}; known: {sorted(CONFIGS) + sorted(PEER_CONFIGS)}")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark case: a config on a (batch, vocab) logits array of one dtype."""

    config: str
    batch: int
    vocab: int
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.config} B={self.batch} V={self.vocab} {self.dtype}"

    @property
    def uses_history(self) -> bool:
        return self.config == "full"


@dataclasses.dataclass(frozen=True)
class WorkloadInputs:
    logits: jax.Array
    params: SamplingParams
    key: jax.Array
    history: jax.Array | None
    prompt_len: jax.Array | None


def make_inputs(w: Workload, seed: int = 0) -> WorkloadInputs:
    """The workload's arrays, on the default device."""
    k_logits, k_hist, k_draw = jax.random.split(jax.random.key(seed), 3)
    logits = (jax.random.normal(k_logits, (w.batch, w.vocab), jnp.float32) * 3).astype(w.dtype)
    history = prompt_len = None
    if w.uses_history:
        history = jax.random.randint(k_hist, (w.batch, HISTORY_LEN), 0, w.vocab, jnp.int32)
        prompt_len = jnp.full((w.batch,), PROMPT_LEN, jnp.int32)
    return WorkloadInputs(logits, config_params(w.config, w.batch), k_draw, history, prompt_len)


# `vsampler bench` with no scope flag: each config at one serving shape, about 2 minutes on 2 CPU cores
HEADLINE_BATCHES = (64,)
HEADLINE_VOCABS = (128256,)
HEADLINE_DTYPES = ("float32",)
# `vsampler bench --full` and `bench/`: the whole grid
DEFAULT_BATCHES = (1, 8, 64)
DEFAULT_VOCABS = (32000, 128256)
DEFAULT_DTYPES = ("float32", "bfloat16")


def grid(
    configs: tuple[str, ...] = tuple(CONFIGS),
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    vocabs: tuple[int, ...] = DEFAULT_VOCABS,
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
) -> Iterator[Workload]:
    """Every combination, configs outermost."""
    for config, vocab, batch, dtype in itertools.product(configs, vocabs, batches, dtypes):
        yield Workload(config, batch, vocab, dtype)
