"""A plain numpy statement of the spec's definitions, token by token (no sorting), for property tests.

Each function works on one row. It mirrors the spec's float32 arithmetic where the spec is exact
(penalties, temperature, top-k comparisons) and reports, for top-p and min-p, which tokens sit within
float rounding of a threshold ("ambiguous"): those are left out of the comparison.
"""

import numpy as np

F32 = np.float32


def penalised(x, history, prompt_len, rep, pres, freq, vocab, ignore=0):
    """`ignore`: the repetition penalty leaves out the row's first `ignore` real prompt tokens."""
    x = x.astype(F32).copy()
    real = [(pos, t) for pos, t in enumerate(history) if 0 <= t < vocab]
    prompt_positions = [pos for pos, _ in real if pos < prompt_len]
    left_out = set(prompt_positions[:ignore])
    seen = {t for pos, t in real if pos not in left_out}
    generated = [t for pos, t in real if pos >= prompt_len]
    for t in seen:
        x[t] = x[t] / F32(rep) if x[t] > 0 else x[t] * F32(rep)
    for t in set(generated):
        x[t] = x[t] - F32(pres)
    for t in set(generated):
        x[t] = x[t] - F32(freq) * F32(generated.count(t))
    return x


def kept(x, temperature, top_k, top_p, min_p):
    """(kept, ambiguous) boolean arrays for one penalised float32 row with finite or -inf values."""
    vocab = x.shape[0]
    ambiguous = np.zeros(vocab, bool)
    if temperature == 0:
        keep = np.zeros(vocab, bool)
        if np.isfinite(x).any():
            keep[int(np.argmax(x))] = True
        return keep, ambiguous
    s = x * (F32(1) / F32(temperature))
    keep = s > -np.inf
    # top-k: fewer than k tokens are strictly larger
    if 0 < top_k < vocab:
        keep &= np.array([(s > s[i]).sum() < top_k for i in range(vocab)])
    if not keep.any():
        return keep, ambiguous
    e = np.where(keep, np.exp(s.astype(np.float64) - s[keep].max()), 0.0)
    total = e.sum()
    # top-p: the mass strictly above a token is < top_p * total
    if top_p < 1:
        above = np.array([e[e > e[i]].sum() for i in range(vocab)])
        near_tie = np.array([np.any((np.abs(e - e[i]) < 1e-6 * e.max()) & (e != e[i])) for i in range(vocab)])
        ambiguous |= keep & ((np.abs(above - top_p * total) <= 1e-5 * total) | near_tie)
        keep &= above < top_p * total
    # min-p: p_i >= min_p * p_max
    if min_p > 0:
        e_max = e[keep].max()
        ambiguous |= keep & (np.abs(e / e_max - min_p) <= 1e-5)
        keep &= e / e_max >= min_p
    return keep, ambiguous
