"""The verification grid shared by the fast-path tests: logits generators and sampling configs."""

import jax
import jax.numpy as jnp
import numpy as np

from vsampler import SamplingParams, process_logits, sample

HISTORY_LEN = 600  # longer than the 512-token workloads
EOS = (2, 7)


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


def compare(impl: str, kind: str, case: str, batch: int, vocab: int, dtype: str, seed: int = 0) -> None:
    """Asserts that `impl` keeps exactly the reference's tokens (values included) and draws the
    reference's token on every row for the same per-row keys."""
    x = logits(kind, batch, vocab, dtype, seed)
    sampling = params(case, batch, vocab)
    hist, prompt = history(batch, vocab, seed)
    kw = {"history": hist, "prompt_len": prompt, "eos_token_id": EOS}
    want = np.asarray(process_logits(x, sampling, impl="reference", **kw))
    got = np.asarray(process_logits(x, sampling, impl=impl, **kw))
    np.testing.assert_array_equal(got > -np.inf, want > -np.inf, err_msg="kept sets differ")
    np.testing.assert_array_equal(got, want, err_msg="kept values differ")
    key = jax.random.split(jax.random.key(seed), batch)
    ref_tokens = np.asarray(sample(x, sampling, key, impl="reference", **kw))
    tokens = np.asarray(sample(x, sampling, key, impl=impl, **kw))
    assert ((tokens >= 0) & (tokens < vocab)).all()
    agreement = np.mean(tokens == ref_tokens)
    assert agreement == 1.0, f"token agreement {agreement:.4f}: rows {np.flatnonzero(tokens != ref_tokens)}"
