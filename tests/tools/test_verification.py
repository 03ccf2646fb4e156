"""`vsampler.tools.verification`'s caches: the compact form of the reference's warped logits gives back the same
bits, the caches drop their least recently used entries beyond their bound, and `check` answers the same
whether the reference's results come from the cache or not, its calls side by side or one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsampler.core import reference, registry, sampling
from vsampler.core.inputs import draw_uniforms
from vsampler.tools import verification
from vsampler.tools.verification import Case, ResultCache, _Warped, check


@pytest.mark.parametrize("kept", [0.0, 0.1, 0.9])
def test_warped_logits_round_trip_bit_for_bit(kept):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 700)).astype(np.float32)
    x[rng.random(x.shape) >= kept] = -np.inf
    x[0, :4] = [np.nan, -0.0, np.inf, 0.0]
    packed = _Warped.pack(x)
    assert (packed.dense is None) == (kept < 0.5)
    assert packed.nbytes <= x.nbytes
    back = packed.unpack()
    assert back.dtype == x.dtype and back.shape == x.shape
    assert back.tobytes() == x.tobytes()


def test_least_recently_used_entries_go_first_beyond_the_bound():
    cache = ResultCache(max_bytes=3 * 400)
    calls = []

    def compute(i):
        calls.append(i)
        return np.full(100, i, np.float32)  # 400 bytes

    for i in (0, 1, 2, 0, 3):  # 0 is used again before 3 arrives: 1 goes
        cache.get(i, lambda i=i: compute(i))
    assert calls == [0, 1, 2, 3] and cache.hits == 1 and cache.misses == 4
    assert len(cache) == 3 and cache.nbytes == 1200
    cache.get(1, lambda: compute(1))  # recomputed; 2 goes
    assert cache.get(0, lambda: compute(-1))[0] == 0
    cache.get(2, lambda: compute(2))
    assert calls == [0, 1, 2, 3, 1, 2] and len(cache) == 3
    too_big = ResultCache(max_bytes=10)
    too_big.get("x", lambda: np.zeros(100))
    assert len(too_big) == 0 and too_big.nbytes == 0


def test_check_gives_the_same_result_from_the_cache_and_without_it(monkeypatch):
    case = Case("ties", "heterogeneous", 3, 300, "float32", masked=True)
    cache = ResultCache(max_bytes=1 << 20)  # the run's own cache stays as it is
    monkeypatch.setattr(verification, "REFERENCE_CACHE", cache)
    first = check("xla", case, seed=5)
    assert (cache.hits, cache.misses) == (0, 3)  # process_logits and both log-prob modes
    again = check("xla", case, seed=5)
    assert (cache.hits, cache.misses) == (3, 3)
    monkeypatch.setattr(verification, "REFERENCE_CACHE", ResultCache(max_bytes=0))
    monkeypatch.setattr(verification, "INPUT_CACHE", ResultCache(max_bytes=0))
    monkeypatch.setattr(verification, "CHECK_WORKERS", 1)  # and one call after the other
    uncached = check("xla", case, seed=5)
    assert first == again == uncached and first.ok


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_the_calls_compiled_together_give_the_public_entries_results_bit_for_bit(impl):
    """`check` traces an implementation's calls inside one program (`verification._together`): they must
    return exactly what each public entry returns called on its own. (Checked once on every kernel
    variant and more cases, 420 arrays: the same bits.)"""
    case = Case("ties", "combined", 3, 300, "float32", masked=True)
    x = verification.logits(case.kind, case.batch, case.vocab, case.dtype)
    params = verification.params(case.config, case.batch, case.vocab)
    hist, prompt = verification.history(case.batch, case.vocab)
    kw = {
        "history": hist,
        "prompt_len": prompt,
        "eos_token_id": verification.EOS,
        "allowed_tokens": verification.allowed_mask(case.batch, case.vocab),
    }
    key = jax.random.split(jax.random.key(0), case.batch)
    warped, tokens, with_logprobs = verification._together(impl, ("raw", "processed"), True, True, x, params, key, kw)
    alone = [
        sampling.process_logits(x, params, impl=impl, **kw),
        sampling.sample(x, params, key, impl=impl, **kw),
    ]
    for mode in ("raw", "processed"):
        got, lp = sampling.sample(x, params, key, impl=impl, logprobs=5, logprobs_mode=mode, **kw)
        alone += [got, lp.top_ids, lp.top, lp.token, lp.rank]
    together = [warped, tokens, *[a for call in with_logprobs for a in call]]
    assert len(together) == len(alone) == 12
    for a, b in zip(together, alone, strict=True):
        b = np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_a_replaced_reference_is_not_answered_from_the_cache(monkeypatch):
    monkeypatch.setattr(verification, "REFERENCE_CACHE", ResultCache(max_bytes=1 << 20))
    case = Case("normal", "combined", 2, 300, "float32")
    assert check("xla", case, logprobs_modes=()).ok  # the reference's tokens are now cached

    def shifted(inp, request):
        tokens, values = reference.sample_with_logprobs(inp, request)
        return (tokens + 1) % inp.logits.shape[1], values

    with registry.replaced("reference", sample=shifted):
        assert check("xla", case, logprobs_modes=()).agreeing_rows == 0


def _two_token_row(u: float, vocab: int = 300, lo: int = 10, hi: int = 20, shift: float = 0.0) -> np.ndarray:
    """One warped row keeping `lo` and `hi` only, with `hi` the maximum (weight 1) and `lo` the weight
    that puts the boundary between them, lo's share of the mass, at `u + shift`."""
    share = u + shift
    row = np.full((1, vocab), -np.inf, np.float32)
    row[0, hi] = 0.0
    row[0, lo] = np.log(share / (1 - share))
    return row


def test_a_neighbour_drawn_where_rounding_decides_is_a_boundary_row_and_nothing_else_is():
    u = np.array([0.37], np.float32)
    at_boundary = _two_token_row(float(u[0]))
    for want, got in ((10, 20), (20, 10)):  # either side of the boundary
        assert verification.rounding_boundary(at_boundary, u, np.array([want]), np.array([got])).tolist() == [True]
    far = _two_token_row(float(u[0]), shift=1e-4)  # 1e-4 of the mass away: beyond float32 rounding
    assert verification.rounding_boundary(far, u, np.array([10]), np.array([20])).tolist() == [False]
    between = at_boundary.copy()
    between[0, 15] = -3.0  # a kept token between the two: not neighbours
    assert verification.rounding_boundary(between, u, np.array([10]), np.array([20])).tolist() == [False]
    for got in (11, 300, -1):  # a dropped token, ids outside [0, V)
        assert verification.rounding_boundary(at_boundary, u, np.array([10]), np.array([got])).tolist() == [False]
    assert verification.rounding_boundary(at_boundary, u, np.array([10]), np.array([10])).tolist() == [False]


def test_the_rounding_bound_is_the_tree_sums_and_far_below_the_gap_between_kept_tokens():
    assert verification.draw_rounding_bound(1) == verification.draw_rounding_bound(2) == 4 * 2.0**-24
    assert verification.draw_rounding_bound(5667) == 16 * 2.0**-24  # the diagnosed row: 5667 kept tokens
    # the diagnosed row's u lay 5.2e-8 of the total short of its boundary; its mean gap is 1 / 5667
    assert 5.2e-8 < verification.draw_rounding_bound(5667) < 0.01 / 5667


def test_check_reports_a_boundary_row_apart_and_fails_a_neighbour_away_from_it(monkeypatch):
    """Logits built so that u * total lies on the boundary between two kept tokens, and an xla that
    draws the reference's neighbour: a boundary row, counted apart, not a disagreement; the same xla on
    logits whose boundary lies 1e-3 of the mass away from u disagrees."""
    case = Case("normal", "temperature", 1, 300, "float32")
    key = jax.random.split(jax.random.key(0), 1)
    u = float(np.asarray(draw_uniforms(key, 1))[0])
    monkeypatch.setattr(verification, "REFERENCE_CACHE", ResultCache(max_bytes=0))
    monkeypatch.setattr(verification, "INPUT_CACHE", ResultCache(max_bytes=0))

    def neighbour(inp, request):
        tokens, values = reference.sample_with_logprobs(inp, request)
        return jnp.where(tokens == 10, 20, 10).astype(tokens.dtype), values

    with registry.replaced("xla", sample=neighbour):
        for shift, boundary in ((0.0, True), (1e-3, False)):
            row = _two_token_row(u, shift=shift) * 0.7  # the "temperature" config divides by 0.7
            monkeypatch.setattr(verification, "logits", lambda *_, row=row: jnp.asarray(row))
            result = check("xla", case, logprobs_modes=("processed",))
            assert result.agreeing_rows == 0 and result.kept_equal
            assert (result.boundary_rows, result.ok) == ((1, True) if boundary else (0, False))


def test_bench_counts_a_boundary_row_as_verified_and_a_neighbour_elsewhere_as_not():
    from vsampler.core.params import SamplingParams
    from vsampler.tools import sampler_benchmark as benchmarking
    from vsampler.tools import workloads

    key = jax.random.split(jax.random.key(3), 1)
    u = float(np.asarray(draw_uniforms(key, 1))[0])
    w = workloads.Workload("top_p", 1, 300)
    for shift, verified in ((0.0, True), (1e-3, False)):
        row = _two_token_row(u, shift=shift)
        inp = workloads.WorkloadInputs(
            jnp.asarray(row), SamplingParams(temperature=np.ones(1, np.float32)), key, None, None
        )
        want = np.asarray(sampling.sample(inp.logits, inp.params, key, impl="reference"))
        got = np.where(want == 10, 20, 10)
        result = benchmarking.check_tokens(w, inp, got, want)
        assert (result.ok, result.boundary, result.agree) == (verified, int(verified), 0)


def test_a_top_p_cut_rounding_decides_is_a_boundary_and_nothing_else_is():
    scaled = np.full(50, -np.inf, np.float32)
    scaled[[3, 7, 11, 20, 30]] = [0.0, -0.5, -2.0, -2.0, -4.0]  # 11 and 20 tie: the cut's level
    candidates = scaled > -np.inf
    w = verification.kept_weights(scaled, candidates)
    at_cut = w[[3, 7]].sum() / w.sum()  # the mass above the tied pair, exactly, as top_p
    with_pair, without = candidates.copy(), candidates.copy()
    with_pair[30], without[[11, 20, 30]] = False, False
    for want, got in ((with_pair, without), (without, with_pair)):  # either side of the cut
        assert verification.top_p_boundary(scaled, candidates, at_cut, want, got)
    assert not verification.top_p_boundary(scaled, candidates, at_cut + 1e-4, with_pair, without)  # far from it
    half = without.copy()
    half[11] = True  # one of the tied pair: ties are kept together
    assert not verification.top_p_boundary(scaled, candidates, at_cut, with_pair, half)
    deeper = without.copy()
    deeper[7] = False  # two levels apart
    assert not verification.top_p_boundary(scaled, candidates, at_cut, with_pair, deeper)
    assert not verification.top_p_boundary(scaled, candidates & (np.arange(50) != 20), at_cut, with_pair, without)
    assert not verification.top_p_boundary(scaled, candidates, at_cut, with_pair, with_pair)


def test_check_counts_a_kept_set_at_a_top_p_cut_apart_and_fails_one_away_from_it(monkeypatch):
    """Logits built so that the mass above token 20 is top_p x total to within float32 rounding, and an
    xla whose kept set differs from the reference's by token 20 only: a boundary row, counted apart; the
    same xla on logits whose cut lies 1e-3 of the mass away disagrees."""
    case = Case("normal", "top_p", 1, 300, "float32")  # temperature 0.7, top_p 0.9
    monkeypatch.setattr(verification, "REFERENCE_CACHE", ResultCache(max_bytes=0))
    monkeypatch.setattr(verification, "INPUT_CACHE", ResultCache(max_bytes=0))
    top_p = float(np.float32(0.9) - np.float32(2.0**-20))  # as applied (inputs.TOP_P_SLACK)

    def logits_with_cut(shift: float) -> np.ndarray:
        row = np.full((1, 300), -np.inf, np.float32)
        row[0, [5, 10, 20]] = np.float32([0.0, -0.35, -1.4])
        for _ in range(3):  # token 30's logit so that the mass above token 20 is top_p x total (+ shift)
            scaled = row[0] * np.float32(1 / np.float32(0.7))
            w = verification.kept_weights(scaled, row[0] > -np.inf)
            rest = (w[5] + w[10]) / (top_p + shift) - (w[5] + w[10] + w[20])
            row[0, 30] = np.float32(np.log(rest) * 0.7)
        return row

    def toggled(inp):  # the reference's warped logits with token 20 kept where it drops it, and the reverse
        warped = reference.process_logits(inp)
        scaled = inp.logits[:, 20].astype(jnp.float32) * (1 / inp.params.temperature)
        return warped.at[:, 20].set(jnp.where(warped[:, 20] > -jnp.inf, -jnp.inf, scaled))

    with registry.replaced("xla", process_logits=toggled):
        for shift, boundary in ((0.0, True), (1e-3, False)):
            row = logits_with_cut(shift)
            monkeypatch.setattr(verification, "logits", lambda *_, row=row: jnp.asarray(row))
            result = check("xla", case, logprobs_modes=())
            assert (result.kept_boundary_rows, result.kept_equal, result.ok) == (
                (1, True, True) if boundary else (0, False, False)
            )
