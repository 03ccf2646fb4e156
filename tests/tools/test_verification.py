"""`vsampler.tools.verification`'s caches: the compact form of the reference's warped logits gives back the same
bits, the caches drop their least recently used entries beyond their bound, and `check` answers the same
whether the reference's results come from the cache or not, its calls side by side or one by one."""

import jax
import numpy as np
import pytest

from vsampler.core import reference, registry, sampling
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


def test_a_replaced_reference_is_not_answered_from_the_cache(monkeypatch):
    monkeypatch.setattr(verification, "REFERENCE_CACHE", ResultCache(max_bytes=1 << 20))
    case = Case("normal", "combined", 2, 300, "float32")
    assert check("xla", case, logprobs_modes=()).ok  # the reference's tokens are now cached

    def shifted(inp, request):
        tokens, values = reference.sample_with_logprobs(inp, request)
        return (tokens + 1) % inp.logits.shape[1], values

    sampling._sample_jit.clear_cache()
    try:
        with registry.replaced("reference", sample=shifted):
            assert check("xla", case, logprobs_modes=()).agreeing_rows == 0
    finally:
        sampling._sample_jit.clear_cache()
    jax.clear_caches()
