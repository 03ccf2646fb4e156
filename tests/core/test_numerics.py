"""The shared threshold search (`vsampler.core.numerics.snapping_search`): its result is the largest row
value whose statistic reaches the target, whatever points the plain passes probe."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from vsampler.core.numerics import NEG_INF, largest_value_with_trips, weight

V = 512


@functools.partial(jax.jit, static_argnames=("interpolate", "plain_passes"))
def _top_p_threshold(
    s: jax.Array, p: jax.Array, *, interpolate: bool, plain_passes: int = 12
) -> tuple[jax.Array, jax.Array]:
    """The top-p threshold of rows `s` (R, V) as the resident kernel searches it, with or without the
    interpolated probes, after `plain_passes` plain passes; (threshold, snapping passes)."""
    s_max = jnp.max(s, axis=-1, keepdims=True)
    e = weight(s, s_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    target = p * total

    def mass_ge(t: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(s >= t, e, 0.0), axis=-1, keepdims=True)

    lo = s_max + jnp.log((1.0 - p) / (2.0 * s.shape[-1]))
    active = jnp.ones_like(s_max, bool)
    return largest_value_with_trips(
        mass_ge, target, s, lo, s_max, active, interpolate=total if interpolate else None, plain_passes=plain_passes
    )


def _brute_force(s: np.ndarray, p: float) -> np.ndarray:
    """Each row's largest value whose mass (the same float32 sums) reaches p * total."""
    out = []
    for row in s:
        s_max = row.max()
        e = np.asarray(weight(jnp.asarray(row), jnp.asarray(s_max)))
        total = np.asarray(jnp.sum(jnp.asarray(e)))
        target = np.float32(p) * total
        values = np.unique(row[row > NEG_INF])[::-1]
        masses = [np.asarray(jnp.sum(jnp.where(jnp.asarray(row) >= v, jnp.asarray(e), 0.0))) for v in values]
        out.append(max(v for v, m in zip(values, masses, strict=True) if m >= target))
    return np.asarray(out, np.float32)[:, None]


def _rows(seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        s = rng.normal(0.0, 3.0, (4, V))
    elif kind == "peaked":
        s = rng.normal(0.0, 1.0, (4, V))
        s[:, rng.integers(0, V, 4)] += 12.0
    elif kind == "ties":
        s = rng.integers(-6, 3, (4, V)).astype(np.float64)
    elif kind == "bfloat16":  # few distinct values, as bfloat16 logits have
        s = np.asarray(jnp.asarray(rng.normal(0.0, 3.0, (4, V)), jnp.bfloat16).astype(jnp.float32))
    else:  # "masked": most tokens -inf, a few finite
        s = np.full((4, V), NEG_INF)
        s[:, rng.choice(V, 9, replace=False)] = rng.normal(0.0, 2.0, 9)
    return s.astype(np.float32)


@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["normal", "peaked", "ties", "bfloat16", "masked"]),
    p=st.sampled_from([0.1, 0.5, 0.9, 0.95, 0.999]),
    plain_passes=st.sampled_from([0, 6, 12]),
)
def test_the_interpolated_probes_find_the_same_threshold_as_bisection(seed, kind, p, plain_passes):
    """Regula falsi moves only the plain passes' probe points: with any number of them the snapping
    passes end on the same value as plain bisection, the brute-force answer."""
    s = _rows(seed, kind)
    plain, _ = _top_p_threshold(jnp.asarray(s), jnp.float32(p), interpolate=False)
    interpolated, _ = _top_p_threshold(jnp.asarray(s), jnp.float32(p), interpolate=True, plain_passes=plain_passes)
    np.testing.assert_array_equal(np.asarray(interpolated), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(interpolated), _brute_force(s, p))
