"""Reference-vs-implementation verification: the grid of logits and sampling configs, the per-case
check (kept sets, kept values, token agreement for the same key) and a distribution check. Shared by
the test suite and `vsampler verify`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.inputs import pack_allowed
from vsampler.logprobs import MODES
from vsampler.params import SamplingParams
from vsampler.sampling import process_logits, sample

HISTORY_LEN = 600  # longer than the 512-token workloads
EOS = (2, 7)
LOGPROBS_N = 5  # top entries each case checks, in both modes
LOGPROBS_TOLERANCE = 1e-4  # |log-prob - reference| (sums taken in another order round differently)


def logits(kind: str, batch: int, vocab: int, dtype: str, seed: int = 0) -> jax.Array:
    """normal: normal * 3. ties: rounded to 0.5 steps (heavy ties). one_finite: all -inf but one per row.
    nan: normal with a NaN per 50 values."""
    key = jax.random.key(seed * 7919 + batch * 31 + vocab)
    x = jax.random.normal(key, (batch, vocab), jnp.float32) * 3
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
    key = jax.random.key(seed + 17)
    ids = jax.random.randint(key, (batch, HISTORY_LEN), 0, min(vocab, 400))  # repeats guaranteed
    real = jax.random.randint(jax.random.fold_in(key, 1), (batch, 1), HISTORY_LEN // 2, HISTORY_LEN + 1)
    ids = jnp.where(jnp.arange(HISTORY_LEN)[None, :] < real, ids, -1)
    prompt = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, HISTORY_LEN // 2)
    return ids, prompt


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
    if name == "heterogeneous":
        return SamplingParams(
            temperature=_rows(batch, [0.0, 0.7, 1.0, 1.5, 0.3, 1.0, 0.0, 2.0]).astype(f32),
            top_k=_rows(batch, [0, 50, 0, 1, 300, 64, 5, 0]),
            top_p=_rows(batch, [1.0, 0.9, 0.95, 1.0, 0.5, 0.99, 1.0, 0.8]).astype(f32),
            min_p=_rows(batch, [0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.0, 0.02]).astype(f32),
            repetition_penalty=_rows(batch, [1.0, 1.1, 1.0, 1.3, 1.0, 0.9, 1.2, 1.0]).astype(f32),
            frequency_penalty=_rows(batch, [0.0, 0.2, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5]).astype(f32),
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
    logprobs_equal: bool = True  # both modes: the same top ids, log-probs within LOGPROBS_TOLERANCE
    mask_respected: bool = True  # no token the mask disallows (a row it empties: EOS[0])

    @property
    def agreement(self) -> float:
        return self.agreeing_rows / self.case.batch

    @property
    def ok(self) -> bool:
        return (
            self.kept_equal
            and self.values_equal
            and self.in_range
            and self.agreeing_rows == self.case.batch
            and self.logprobs_equal
            and self.mask_respected
        )


def logprobs_close(got: np.ndarray, want: np.ndarray) -> bool:
    """-inf exactly where the reference has it, finite values within LOGPROBS_TOLERANCE."""
    got, want = np.asarray(got), np.asarray(want)
    same_inf = np.array_equal(np.isneginf(got), np.isneginf(want)) and not np.isnan(got).any()
    finite = np.isfinite(want)
    return bool(same_inf and np.all(np.abs(got[finite] - want[finite]) <= LOGPROBS_TOLERANCE))


def _mask_respected(tokens: np.ndarray, allowed: np.ndarray, warped: np.ndarray) -> bool:
    """Every token is one the mask allows, except on rows the reference leaves empty (the mask allows
    nothing, or nothing finite), which must sample EOS[0]."""
    bits = (allowed[np.arange(len(tokens)), tokens // 32].view(np.uint32) >> (tokens % 32).astype(np.uint32)) & 1
    empty = ~(warped > -np.inf).any(axis=1)
    return bool(np.all(np.where(empty, tokens == EOS[0], bits == 1)))


def check(impl: str, case: Case, seed: int = 0, logprobs_modes: tuple[str, ...] = MODES) -> CaseResult:
    """Runs `impl` and the reference on one case with the same per-row keys: warped logits, tokens, and
    log-probs in `logprobs_modes` (their tokens must be the plain call's)."""
    x = logits(case.kind, case.batch, case.vocab, case.dtype, seed)
    sampling = params(case.config, case.batch, case.vocab)
    hist, prompt = history(case.batch, case.vocab, seed)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": EOS}
    allowed = allowed_mask(case.batch, case.vocab, seed) if case.masked else None
    if allowed is not None:
        kw["allowed_tokens"] = allowed
    want = np.asarray(process_logits(x, sampling, impl="reference", **kw))
    got = np.asarray(process_logits(x, sampling, impl=impl, **kw))
    key = jax.random.split(jax.random.key(seed), case.batch)
    tokens = np.asarray(sample(x, sampling, key, impl=impl, **kw))
    ref_tokens = None
    logprobs_equal = True
    for mode in logprobs_modes:
        # the reference's tokens come from its log-prob call (the same tokens by construction: one sort less)
        want_tokens, want_lp = sample(x, sampling, key, impl="reference", logprobs=LOGPROBS_N, logprobs_mode=mode, **kw)
        ref_tokens = np.asarray(want_tokens) if ref_tokens is None else ref_tokens
        got_tokens, got_lp = sample(x, sampling, key, impl=impl, logprobs=LOGPROBS_N, logprobs_mode=mode, **kw)
        logprobs_equal &= (
            np.array_equal(np.asarray(got_tokens), tokens)
            and np.array_equal(np.asarray(got_lp.top_ids), np.asarray(want_lp.top_ids))
            and logprobs_close(got_lp.top, want_lp.top)
            and logprobs_close(got_lp.token, want_lp.token)
        )
    if ref_tokens is None:
        ref_tokens = np.asarray(sample(x, sampling, key, impl="reference", **kw))
    in_range = bool(((tokens >= 0) & (tokens < case.vocab)).all())
    return CaseResult(
        case=case,
        impl=impl,
        kept_equal=bool(np.array_equal(got > -np.inf, want > -np.inf)),
        values_equal=bool(np.array_equal(got, want)),
        agreeing_rows=int(np.sum(tokens == ref_tokens)),
        in_range=in_range,
        logprobs_equal=bool(logprobs_equal),
        mask_respected=allowed is None or (in_range and _mask_respected(tokens, allowed, want)),
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


def bound_mappings() -> bool:
    """Drops jax's compiled programs if this process holds more than MAPPINGS_BOUND mappings; whether
    it did."""
    if mappings() <= MAPPINGS_BOUND:
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
