"""Reference-vs-implementation verification: the grid of logits and sampling configs, the per-case
check (kept sets, kept values, token agreement for the same key) and a distribution check. Shared by
the test suite and `vsampler verify`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core import registry
from vsampler.core.inputs import draw_uniforms, pack_allowed
from vsampler.core.logprobs import MODES
from vsampler.core.numerics import weight
from vsampler.core.params import SamplingParams
from vsampler.core.sampling import process_logits, sample

HISTORY_LEN = 600  # longer than the 512-token workloads
EOS = (2, 7)
LOGPROBS_N = 5  # top entries each case checks, in both modes
LOGPROBS_TOLERANCE = 1e-4  # |log-prob - reference| (sums taken in another order round differently)


# Top-p at boundaries a person checks by hand: (probabilities, top_p, the indices exact arithmetic keeps).
# Ties exactly at p, masses above a token that sum decimal probabilities to exactly p, and just below it.
TEXTBOOK_TOP_P: tuple[tuple[tuple[float, ...], float, tuple[int, ...]], ...] = (
    ((0.3, 0.1, 0.1, 0.5), 0.8, (0, 3)),  # HF's example: the mass above the 0.1 pair is exactly 0.8
    ((0.3, 0.1, 0.1, 0.5), 0.81, (0, 1, 2, 3)),
    ((0.2, 0.2, 0.3, 0.3), 0.6, (2, 3)),  # a tie exactly at p: both dropped
    ((0.4, 0.3, 0.2, 0.1), 0.7, (0, 1)),
    ((0.4, 0.3, 0.2, 0.1), 0.9, (0, 1, 2)),
    ((0.4, 0.2, 0.2, 0.2), 0.4, (0,)),
    ((0.4, 0.2, 0.2, 0.2), 0.41, (0, 1, 2, 3)),  # ties kept together
    ((0.15, 0.25, 0.35, 0.05, 0.2), 0.6, (1, 2)),
    ((0.15, 0.25, 0.35, 0.05, 0.2), 0.8, (1, 2, 4)),
    ((0.15, 0.25, 0.35, 0.05, 0.2), 0.95, (0, 1, 2, 4)),
    ((0.7, 0.2, 0.1), 0.7, (0,)),
    ((0.6, 0.3, 0.1), 0.9, (0, 1)),
    ((0.1,) * 10, 0.3, tuple(range(10))),  # ten-way tie: the mass above each is 0
    ((0.5, 0.25, 0.125, 0.125), 0.75, (0, 1)),
)


def textbook_positions(batch: int, vocab: int) -> np.ndarray:
    """(B, V) int: where row r's textbook probabilities lie (`TEXTBOOK_TOP_P[r % n]`, -1 elsewhere):
    spread over the vocabulary, in a per-row shuffled order."""
    rng = np.random.default_rng(vocab * 13 + batch)
    where = np.full((batch, vocab), -1)
    for r in range(batch):
        probs = TEXTBOOK_TOP_P[r % len(TEXTBOOK_TOP_P)][0]
        where[r, rng.choice(vocab, len(probs), replace=False)] = np.arange(len(probs))
    return where


def textbook_kept(batch: int, vocab: int) -> np.ndarray:
    """(B, V) bool: the kept sets exact arithmetic gives the textbook rows."""
    where = textbook_positions(batch, vocab)
    kept = np.zeros((batch, vocab), bool)
    for r in range(batch):
        kept[r] = np.isin(where[r], TEXTBOOK_TOP_P[r % len(TEXTBOOK_TOP_P)][2])
    return kept


def logits(kind: str, batch: int, vocab: int, dtype: str, seed: int = 0) -> jax.Array:
    """normal: normal * 3. ties: rounded to 0.5 steps (heavy ties). one_finite: all -inf but one per row.
    nan: normal with a NaN per 50 values. textbook: row r is `log` of `TEXTBOOK_TOP_P[r % n]`'s
    probabilities (softmax gives them back), -inf elsewhere (`textbook_positions`)."""
    if kind == "textbook":
        where = textbook_positions(batch, vocab)
        probs = [np.log(np.asarray(TEXTBOOK_TOP_P[r % len(TEXTBOOK_TOP_P)][0], np.float32)) for r in range(batch)]
        x = np.stack([np.where(where[r] >= 0, probs[r][where[r]], -np.inf) for r in range(batch)])
        return jnp.asarray(x, jnp.float32).astype(dtype)
    return _generated_logits(kind, batch, vocab, dtype, seed)


# Each generator below is one program per shape: op by op they compiled a dozen small ones, about a
# second for every new shape. The same arrays as op by op, bit for bit.
def _generated_logits(kind: str, batch: int, vocab: int, dtype: str, seed: int) -> jax.Array:
    return _logits_program(kind, batch, vocab, dtype, jnp.int32(seed * 7919 + batch * 31 + vocab))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _logits_program(kind: str, batch: int, vocab: int, dtype: str, seed: jax.Array) -> jax.Array:
    key = jax.random.key(seed)
    # barriers: XLA would fold the constant factors together (and round otherwise than op by op)
    barrier = jax.lax.optimization_barrier
    x = barrier(barrier(jax.random.normal(key, (batch, vocab), jnp.float32)) * 3)
    if kind == "ties":
        x = jnp.round(x * 2) / 2
    elif kind == "one_finite":
        pos = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, vocab)
        x = jnp.where(jnp.arange(vocab)[None, :] == pos[:, None], x, -jnp.inf)
    elif kind == "nan":
        x = jnp.where(jax.random.uniform(jax.random.fold_in(key, 2), x.shape) < 0.02, jnp.nan, x)
    return x.astype(dtype)


def history(batch: int, vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """(B, HISTORY_LEN) ids with repeats and empty tail slots, and a per-row prompt length."""
    return _history_program(batch, min(vocab, 400), jnp.int32(seed + 17))  # ids < 400: repeats guaranteed


@functools.partial(jax.jit, static_argnums=(0, 1))
def _history_program(batch: int, high: int, seed: jax.Array) -> tuple[jax.Array, jax.Array]:
    key = jax.random.key(seed)
    ids = jax.random.randint(key, (batch, HISTORY_LEN), 0, high)
    real = jax.random.randint(jax.random.fold_in(key, 1), (batch, 1), HISTORY_LEN // 2, HISTORY_LEN + 1)
    ids = jnp.where(jnp.arange(HISTORY_LEN)[None, :] < real, ids, -1)
    prompt = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, HISTORY_LEN // 2)
    return ids, prompt


@functools.partial(jax.jit, static_argnums=(0,))
def _keys_program(batch: int, seed: jax.Array) -> jax.Array:
    return jax.random.split(jax.random.key(seed), batch)


def keys(batch: int, seed: int = 0) -> jax.Array:
    """A case's per-row keys: `jax.random.split(jax.random.key(seed), batch)`."""
    return _keys_program(batch, jnp.int32(seed))


def allowed_mask(batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A structured-output mask, packed (B, ceil(V / 32)) int32: each row allows a random quarter of the
    vocabulary; with more than one row, the last row allows nothing (it must end with EOS[0])."""
    rng = np.random.default_rng(seed * 31 + vocab)
    allowed = rng.random((batch, vocab)) < 0.25
    if batch > 1:
        allowed[-1] = False
    return pack_allowed(allowed)


def _rows(batch: int, values: list) -> np.ndarray:
    return np.array([values[i % len(values)] for i in range(batch)])


def params(name: str, batch: int, vocab: int) -> SamplingParams:
    """Each stage alone, all combined, and a heterogeneous batch (greedy rows beside sampled ones)."""
    f32 = np.float32
    if name == "bias":
        return SamplingParams(temperature=0.9, logit_bias={0: 5.0, vocab - 1: -np.inf, vocab // 2: 2.5})
    if name == "bias_dense":
        return SamplingParams(logit_bias=np.linspace(-2, 2, vocab, dtype=f32))
    if name == "repetition":
        return SamplingParams(repetition_penalty=1.3)
    if name == "presence_frequency":
        return SamplingParams(presence_penalty=0.7, frequency_penalty=0.4)
    if name == "min_tokens":
        return SamplingParams(min_tokens=_rows(batch, [0, 400, 1000]), max_tokens=2000)
    if name == "temperature":
        return SamplingParams(temperature=0.7)
    if name == "greedy":
        return SamplingParams(temperature=0.0, repetition_penalty=1.2)
    if name == "top_k":
        return SamplingParams(top_k=50)
    if name == "top_k_large":
        return SamplingParams(top_k=300)
    if name == "top_p":
        return SamplingParams(temperature=0.7, top_p=0.9)
    if name == "min_p":
        return SamplingParams(min_p=0.05)
    if name == "combined":
        return SamplingParams(
            temperature=0.7,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.3,
            frequency_penalty=0.2,
            min_tokens=3,
            logit_bias={1: 1.0},
        )
    if name in ("top_p_textbook", "top_p_textbook_top_k"):  # the textbook rows' own top_p (logits "textbook")
        top_p = _rows(batch, [case[1] for case in TEXTBOOK_TOP_P]).astype(f32)
        # top_k 20 keeps every finite textbook token, but puts the fast paths on their candidate paths
        return SamplingParams(temperature=1.0, top_p=top_p, top_k=20 if name.endswith("top_k") else 0)
    if name == "heterogeneous":
        return SamplingParams(
            temperature=_rows(batch, [0.0, 0.7, 1.0, 1.5, 0.3, 1.0, 0.0, 2.0]).astype(f32),
            top_k=_rows(batch, [0, 50, 0, 1, 300, 64, 5, 0]),
            top_p=_rows(batch, [1.0, 0.9, 0.95, 1.0, 0.5, 0.99, 1.0, 0.8]).astype(f32),
            min_p=_rows(batch, [0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.02]).astype(f32),
            repetition_penalty=_rows(batch, [1.0, 1.1, 1.0, 1.3, 1.0, 0.9, 1.2, 1.0]).astype(f32),
            frequency_penalty=_rows(batch, [0.0, 0.2, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5]).astype(f32),
            # generated tokens only (row 3), the prompt's first 3 or 1 tokens left out (rows 5, 6)
            prompt_ignore_length=_rows(batch, [0, 0, 0, 2**31 - 1, 0, 3, 1, 0]),
        )
    raise ValueError(name)


STAGE_CASES = (
    "bias",
    "bias_dense",
    "repetition",
    "presence_frequency",
    "min_tokens",
    "temperature",
    "greedy",
    "top_k",
    "top_k_large",
    "top_p",
    "min_p",
    "combined",
    "heterogeneous",
)
# configs for the "textbook" logits kind (`TEXTBOOK_TOP_P`): their kept sets are also checked against
# the hand-computed ones (float32 logits)
TEXTBOOK_CASES = ("top_p_textbook", "top_p_textbook_top_k")


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # logits generator: normal | ties | one_finite | nan
    config: str  # one of STAGE_CASES
    batch: int
    vocab: int
    dtype: str
    masked: bool = False  # with an `allowed_tokens` mask (`allowed_mask`)

    @property
    def label(self) -> str:
        mask = " masked" if self.masked else ""
        return f"{self.config}{mask} {self.kind} B={self.batch} V={self.vocab} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class CaseResult:
    case: Case
    impl: str
    kept_equal: bool  # process_logits keeps exactly the reference's tokens
    values_equal: bool  # ... with bit-identical values
    agreeing_rows: int  # rows whose token equals the reference's for the same key
    in_range: bool  # every token id in [0, V)
    logprobs_equal: bool = True  # both modes: the same top ids and ranks, log-probs within LOGPROBS_TOLERANCE
    mask_respected: bool = True  # no token the mask disallows (a row it empties: EOS[0])
    boundary_rows: int = 0  # rows drawing the reference's neighbour where rounding decides (`rounding_boundary`)
    kept_boundary_rows: int = 0  # rows whose kept set differs only at a top-p cut rounding decides (`top_p_boundary`)
    exact: bool = True  # textbook cases (float32): the kept sets exact arithmetic gives (`TEXTBOOK_TOP_P`)

    @property
    def agreement(self) -> float:
        return self.agreeing_rows / self.case.batch

    @property
    def ok(self) -> bool:
        return (
            self.kept_equal
            and self.values_equal
            and self.in_range
            and self.agreeing_rows + self.boundary_rows == self.case.batch
            and self.logprobs_equal
            and self.mask_respected
            and self.exact
        )


def logprobs_close(got: np.ndarray, want: np.ndarray) -> bool:
    """-inf exactly where the reference has it, finite values within LOGPROBS_TOLERANCE."""
    got, want = np.asarray(got), np.asarray(want)
    same_inf = np.array_equal(np.isneginf(got), np.isneginf(want)) and not np.isnan(got).any()
    finite = np.isfinite(want)
    return bool(same_inf and np.all(np.abs(got[finite] - want[finite]) <= LOGPROBS_TOLERANCE))


def draw_rounding_bound(kept: int) -> float:
    """How far, relative to the row's total kept mass, float32 arithmetic may move the draw's target
    `u * total` against a prefix of the kept mass: the worst-case error of a pairwise (tree) sum of `kept`
    float32 terms, ceil(log2(kept)) roundings of 2^-24 of the total, plus one for the product `u * total`,
    one for the comparison's operands and one for the terms themselves (each weight `exp(s - max)` is
    within an ulp of the reference's). The reference's cumsum and the fast paths' chunk sums add the same
    terms in different orders, so each may round its prefix to either side of a boundary that `u * total`
    lies this close to. This is the tree bound, not the n-term worst case of a sequential sum, which
    would accept most neighbours on rows with thousands of kept tokens."""
    return (math.ceil(math.log2(max(kept, 2))) + 3) * 2.0**-24


def kept_weights(scaled: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """One row's float32 weights `exp(s - max)` over its `kept` tokens (the reference's, `numerics.weight`),
    as float64 for exact sums; 0 elsewhere."""
    scaled = jnp.asarray(scaled, jnp.float32)
    s_max = jnp.max(jnp.where(jnp.asarray(kept), scaled, -jnp.inf))
    return np.where(kept, np.asarray(weight(scaled, s_max), np.float64), 0.0)


def rounding_boundary(warped: np.ndarray, u: np.ndarray, want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """(B,) bool: the rows where `got` differs from the reference's `want` only because rounding moved a
    boundary (the spec's draw rule, stage 10). Such a row's two tokens are both kept, with no kept token
    between them, and the exact boundary between them, the cumulative kept mass through the lower one
    (the reference's own float32 weights summed in float64), lies within `draw_rounding_bound` of
    `u * total` (float64). Any other difference is a disagreement."""
    out = np.zeros(len(want), bool)
    for row in np.flatnonzero(np.asarray(got) != np.asarray(want)):
        lo, hi = sorted((int(got[row]), int(want[row])))
        kept = warped[row] > -np.inf
        if lo < 0 or hi >= kept.size or not (kept[lo] and kept[hi]) or kept[lo + 1 : hi].any():
            continue
        weights = kept_weights(warped[row], kept)
        total = weights.sum()
        boundary = weights[: lo + 1].sum()
        out[row] = abs(float(u[row]) * total - boundary) <= draw_rounding_bound(int(kept.sum())) * total
    return out


def top_p_boundary(scaled: np.ndarray, candidates: np.ndarray, top_p: float, want: np.ndarray, got: np.ndarray) -> bool:
    """Whether one row's kept sets `want` (the reference's) and `got` ((V,) bool) differ only because
    rounding decided the top-p cut (the spec's stage 8): the tokens one keeps and the other drops all hold
    one value v, the lowest the larger set keeps; they are among `candidates`, what top-k kept before
    top-p (the row's scaled values `scaled`, float32); and the exact mass strictly above v (the float32
    weights summed in float64) lies within `draw_rounding_bound` of `top_p * total` (`top_p` as applied,
    slack included). The reference sums the masses compensated and the fast paths in float32, so such a
    cut may fall on either side; any other difference is a disagreement."""
    differ = want ^ got
    if not differ.any() or not candidates[differ].all():
        return False
    level = scaled[differ]
    if not np.all(level == level[0]):
        return False
    larger = want | got
    if (scaled[larger] < level[0]).any() or ((want & got) & (scaled <= level[0])).any():
        return False  # the differing tokens are the larger set's lowest level, and only they hold it
    weights = kept_weights(scaled, candidates)
    total, above = weights.sum(), weights[scaled > level[0]].sum()
    return abs(above - top_p * total) <= draw_rounding_bound(int(candidates.sum())) * total


def _top_p_boundary_rows(x: Any, sampling: SamplingParams, kw: dict, want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """(B,) bool: the rows whose kept sets differ only at a top-p cut rounding decides (`top_p_boundary`),
    from the reference's own stages 0-7 on the case's inputs."""
    from vsampler.core import inputs, reference

    out = np.zeros(want.shape[0], bool)
    rows = np.flatnonzero(((want > -np.inf) != (got > -np.inf)).any(axis=1))
    if not sampling.stages.top_p or rows.size == 0:
        return out
    inp = inputs.prepare(x, sampling, None, draw=False, **kw)
    before_top_p = inp._replace(stages=dataclasses.replace(inp.stages, top_p=False, min_p=False))
    candidates, scaled = (np.asarray(a) for a in reference.kept_mask(before_top_p, reference.penalised_logits(inp)))
    top_p = np.asarray(inp.params.top_p)
    greedy = np.asarray(inp.params.temperature) == 0.0
    for row in rows:
        if top_p[row] < 1.0 and not greedy[row]:
            out[row] = top_p_boundary(
                scaled[row], candidates[row], float(top_p[row]), want[row] > -np.inf, got[row] > -np.inf
            )
    return out


def _mask_respected(tokens: np.ndarray, allowed: np.ndarray, warped: np.ndarray) -> bool:
    """Every token is one the mask allows, except on rows the reference leaves empty (the mask allows
    nothing, or nothing finite), which must sample EOS[0]."""
    bits = (allowed[np.arange(len(tokens)), tokens // 32].view(np.uint32) >> (tokens % 32).astype(np.uint32)) & 1
    empty = ~(warped > -np.inf).any(axis=1)
    return bool(np.all(np.where(empty, tokens == EOS[0], bits == 1)))


# ---------------------------------------------------------------------------- reference results


@dataclasses.dataclass(frozen=True, eq=False)
class _Warped:
    """A reference `process_logits` result, stored losslessly: the array itself, or, where fewer than half
    of its entries are kept, the flat positions and values of every entry that is not -inf (NaN, -0.0 and
    +inf included: `unpack` gives back the same bits)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    dense: np.ndarray | None = None
    index: np.ndarray | None = None
    values: np.ndarray | None = None

    @classmethod
    def pack(cls, warped: np.ndarray) -> _Warped:
        flat = warped.reshape(-1)
        index = np.flatnonzero(flat != -np.inf)
        if 2 * index.size >= flat.size:  # the positions cost as much as the values they save
            dense = warped.copy()
            dense.setflags(write=False)
            return cls(warped.shape, warped.dtype, dense=dense)
        index = index.astype(np.int32 if flat.size < 2**31 else np.int64)
        return cls(warped.shape, warped.dtype, index=index, values=flat[index])

    def unpack(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        out = np.full(self.shape, -np.inf, self.dtype)
        out.reshape(-1)[self.index] = self.values
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.dense, self.index, self.values) if a is not None)


def _nbytes(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if value is None:
        return 0
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(value).nbytes
    return int(value.nbytes)


class ResultCache:
    """Results by key, least recently used dropped first beyond `max_bytes` (0: nothing is kept), with
    hit and miss counts. Values are arrays (numpy or jax, never written to) or tuples of them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()  # `check` asks from several threads (never computing under it)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
            self.misses += 1
        value = compute()
        self._put(key, value)
        return value

    def get_many(self, keys: list[Any], compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """`[get(key) for key in keys]`, with the keys not held computed together: `compute(missing)`
        returns their values in that order."""
        found: dict[Any, Any] = {}
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    found[key] = self._entries[key][0]
                else:
                    self.misses += 1
        missing = [key for key in keys if key not in found]
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                found[key] = value
                self._put(key, value)
        return [found[key] for key in keys]

    def _put(self, key: Any, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self.nbytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


# The reference's results per (case, seed, call), reused by every implementation `check` compares with
# them: the sort-based reference is the slow side of each comparison at serving sizes (and its compiles
# the slow side at small ones), and `vsampler verify` or the test suite checks several implementations
# on the same cases. Its warped logits are kept in `_Warped`'s compact form. The key holds the reference
# functions the dispatcher calls, so a replaced reference is never answered from here.
REFERENCE_CACHE = ResultCache(max_bytes=1 << 30)
# `check`'s inputs per (generator, arguments): logits, histories, masks and keys are the same arrays for
# every config and implementation of a case, and generating them compiles a dozen small programs.
INPUT_CACHE = ResultCache(max_bytes=1 << 30)


# threads `check` runs a case's calls on (1: one after the other)
CHECK_WORKERS = min(4, os.cpu_count() or 1)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _reference_key(*key: Any) -> tuple:
    reference = registry.get("reference")  # a replaced reference (a test's) is cached apart
    return (*key, reference.sample, reference.process_logits)


def _concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """`[call() for call in calls]`, on up to `CHECK_WORKERS` threads: XLA compiles (most of a small case)
    and runs (most of a large one) without holding the GIL, and a case's calls are independent."""
    if CHECK_WORKERS <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=min(CHECK_WORKERS, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def _together(
    impl: str, modes: tuple[str, ...], warped: bool, plain: bool, x: jax.Array, sampling: SamplingParams, key, kw
) -> tuple[Any, Any, list]:
    """`impl`'s calls on one case, compiled as one program: `process_logits` (if `warped`), a plain `sample`
    (if `plain`) and `sample` with log-probs in each of `modes`. They are the public entries, traced inside
    one `jax.jit` (as a user's own jit calls them), so XLA compiles the stages they share once instead of
    once a call: the calls' own programs cost about twice as much compile time, most of a small case.
    The EOS ids stay static, as the public entries make concrete ones. Returns numpy arrays:
    `(warped or None, tokens or None, [(tokens, top_ids, top, token, rank) per mode])`."""
    arrays = {name: value for name, value in kw.items() if name != "eos_token_id"}
    # the public entries' own boundary conversion first, on the concrete values (`SamplingParams.in_used_dtypes`)
    out = _together_program(
        x,
        sampling.in_used_dtypes(),
        key,
        arrays,
        impl=impl,
        modes=tuple(modes),
        warped=warped,
        plain=plain,
        eos=tuple(kw["eos_token_id"]),
    )
    return jax.tree.map(np.asarray, out)


@functools.partial(jax.jit, static_argnames=("impl", "modes", "warped", "plain", "eos"))
def _together_program(x, sampling, key, arrays, *, impl, modes, warped, plain, eos):
    entry = {"impl": impl, "eos_token_id": eos, **arrays}
    out_warped = process_logits(x, sampling, **entry) if warped else None
    out_tokens = sample(x, sampling, key, **entry) if plain else None
    with_logprobs = []
    for mode in modes:
        tokens, lp = sample(x, sampling, key, logprobs=LOGPROBS_N, logprobs_mode=mode, **entry)
        with_logprobs.append((tokens, lp.top_ids, lp.top, lp.token, lp.rank))
    return out_warped, out_tokens, with_logprobs


def check(impl: str, case: Case, seed: int = 0, logprobs_modes: tuple[str, ...] = MODES) -> CaseResult:
    """Runs `impl` and the reference on one case with the same per-row keys: warped logits, tokens, and
    log-probs in `logprobs_modes` (their tokens must be the plain call's). Inputs and the reference's
    results come from `INPUT_CACHE` and `REFERENCE_CACHE` when this case and seed were checked before (on
    any implementation); each side's calls are one program (`_together`), the two run side by side
    (`_concurrently`)."""
    b, v = case.batch, case.vocab
    generator = (case.kind, b, v, case.dtype, seed)
    x = INPUT_CACHE.get(("logits", *generator), lambda: logits(*generator))
    sampling = params(case.config, b, v)
    hist, prompt = INPUT_CACHE.get(("history", b, v, seed), lambda: history(b, v, seed))
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": EOS}
    allowed = None
    if case.masked:
        allowed = INPUT_CACHE.get(("allowed", b, v, seed), lambda: _frozen(allowed_mask(b, v, seed)))
        kw["allowed_tokens"] = allowed
    key = INPUT_CACHE.get(("keys", b, seed), lambda: keys(b, seed))

    # the reference's tokens come from its first log-prob call (the same tokens by construction: one sort
    # less); without log-probs, from a plain call. Each call's result is cached apart; the missing ones
    # are computed together.
    reference_calls = [("process_logits",)]
    reference_calls += [("sample", LOGPROBS_N, mode) for mode in logprobs_modes] or [("sample",)]

    def reference_compute(missing: list[tuple]) -> list[Any]:
        modes = tuple(call[2] for call in missing if len(call) == 3)
        warped, tokens, with_logprobs = _together(
            "reference", modes, ("process_logits",) in missing, ("sample",) in missing, x, sampling, key, kw
        )
        by_mode = dict(zip(modes, with_logprobs, strict=True))
        out = []
        for call in missing:
            if call == ("process_logits",):
                out.append(_Warped.pack(warped))
            elif call == ("sample",):
                out.append((_frozen(tokens),))
            else:
                out.append(tuple(_frozen(a) for a in by_mode[call[2]]))
        return out

    def reference() -> list[Any]:
        keys = [_reference_key(case, seed, *call) for call in reference_calls]
        return REFERENCE_CACHE.get_many(
            keys, lambda missing: reference_compute([reference_calls[keys.index(k)] for k in missing])
        )

    def implementation() -> tuple[Any, Any, list]:
        return _together(impl, tuple(logprobs_modes), True, True, x, sampling, key, kw)

    (warped, *reference_samples), (got, tokens, impl_samples) = _concurrently([reference, implementation])
    want = warped.unpack()
    ref_tokens = reference_samples[0][0]
    in_range = bool(((tokens >= 0) & (tokens < case.vocab)).all())
    # rows whose kept sets differ only where rounding decides the top-p cut: their values are compared on
    # the tokens both keep; their tokens and log-probs come from other kept sets, so are not compared
    kept_boundary = _top_p_boundary_rows(x, sampling, kw, want, got)
    same = ~kept_boundary
    both = (got > -np.inf) & (want > -np.inf)
    boundary = np.zeros(b, bool)
    if in_range and not np.array_equal(tokens[same], ref_tokens[same]):
        boundary = rounding_boundary(want, np.asarray(draw_uniforms(key, b)), ref_tokens, tokens) & same
    boundary |= kept_boundary & (tokens != ref_tokens)
    compared = ~boundary & same
    logprobs_equal = True
    for (_, want_top_ids, want_top, want_token, want_rank), (
        got_tokens,
        got_top_ids,
        got_top,
        got_token,
        got_rank,
    ) in zip(reference_samples if logprobs_modes else [], impl_samples, strict=True):
        # a boundary row's token is another token than the reference's: its log-prob and rank are others
        logprobs_equal &= (
            np.array_equal(got_tokens, tokens)
            and np.array_equal(got_top_ids[same], want_top_ids[same])
            and logprobs_close(got_top[same], want_top[same])
            and logprobs_close(got_token[compared], want_token[compared])
            and np.array_equal(got_rank[compared], want_rank[compared])
        )
    return CaseResult(
        case=case,
        impl=impl,
        kept_equal=bool(np.array_equal(got[same] > -np.inf, want[same] > -np.inf)),
        values_equal=bool(np.array_equal(got[same], want[same]) and np.array_equal(got[both], want[both])),
        agreeing_rows=int(np.sum(tokens == ref_tokens)),
        in_range=in_range,
        logprobs_equal=bool(logprobs_equal),
        mask_respected=allowed is None or (in_range and _mask_respected(tokens, allowed, want)),
        boundary_rows=int(boundary.sum()),
        kept_boundary_rows=int(kept_boundary.sum()),
        exact=case.kind != "textbook"
        or case.dtype != "float32"
        or bool(np.array_equal(got > -np.inf, textbook_kept(b, v)) and np.array_equal(want > -np.inf, got > -np.inf)),
    )


# Each compiled CPU program keeps memory mappings, and Linux refuses new ones past vm.max_map_count
# (65,530 by default): XLA's compiler then fails ("LLVM compilation error: Cannot allocate memory") and
# crashes. A long verification run (and the test suite, tests/conftest.py) drops the compiled programs
# whenever its mappings pass MAPPINGS_BOUND.
MAPPINGS_BOUND = 30_000


def mappings() -> int:
    """This process's memory mappings (lines of /proc/self/maps; 0 where there is no such file)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:
        return 0


def bound_mappings(held: int | None = None) -> bool:
    """Drops jax's compiled programs if this process holds more than MAPPINGS_BOUND mappings (`held`:
    the count `mappings()` just gave, so a caller that keeps it reads /proc/self/maps once, about 10 ms
    at 20,000 mappings); whether it did."""
    if (mappings() if held is None else held) <= MAPPINGS_BOUND:
        return False
    jax.clear_caches()
    return True


def grid(
    batches: tuple[int, ...] = (1, 3, 8, 64),
    vocabs: tuple[int, ...] = (1000, 32000, 50257, 128256, 152064, 256000),
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    configs: tuple[str, ...] = ("combined", "heterogeneous"),
    kinds: tuple[str, ...] = ("normal",),
    masked: tuple[bool, ...] = (False,),
) -> Iterator[Case]:
    for config, mask, kind, vocab, batch, dtype in itertools.product(configs, masked, kinds, vocabs, batches, dtypes):
        yield Case(kind, config, batch, vocab, dtype, mask)


# ---------------------------------------------------------------------------------- distribution


def tv_bound(n_draws: int, support: int, failure: float = 1e-6) -> float:
    """A bound the total variation between empirical and true frequencies exceeds with probability
    < `failure`: E[TV] <= 0.5 * sqrt(K / N), and McDiarmid (one draw moves TV by <= 1/N) adds
    sqrt(ln(1 / failure) / 2N)."""
    return 0.5 * math.sqrt(support / n_draws) + math.sqrt(math.log(1 / failure) / (2 * n_draws))


DISTRIBUTION_PARAMS = {
    "topk-topp": SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
    "minp-penalties": SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4),
    "plain": SamplingParams(temperature=1.0),
}


def distribution(impl: str, name: str, n_draws: int = 40000, vocab: int = 12) -> tuple[float, float, bool]:
    """(total variation, its bound, whether a dropped token was drawn) for `n_draws` draws of one row."""
    sampling = DISTRIBUTION_PARAMS[name]
    row = jax.random.normal(jax.random.key(11), (1, vocab)) * 1.5
    hist = jnp.asarray([[0, 3, 3, 7, -1]])
    tokens = sample(
        jnp.repeat(row, n_draws, axis=0),
        sampling,
        jax.random.key(12),
        history=jnp.repeat(hist, n_draws, axis=0),
        impl=impl,
    )
    probs = np.asarray(jax.nn.softmax(process_logits(row, sampling, history=hist)[0]))
    freq = np.bincount(np.asarray(tokens), minlength=vocab) / n_draws
    tv = 0.5 * float(np.abs(freq - probs).sum())
    return tv, tv_bound(n_draws, int((probs > 0).sum())), bool(freq[probs == 0].sum() > 0)
