"""Generation the slow, obvious way: no cache, no loop, one row at a time, the reference sampler.

Copy j of prompt i of a `vInference.generate` call draws its k-th token from
`fold_in(fold_in(fold_in(key, i), j), k)` (with per-request keys, `fold_in(fold_in(key[i], j), k)`) and its
penalties see the row's real tokens only; this decoder does the same by recomputing the whole sequence
for every token, so the loop (cache, positions, masks, bookkeeping, chunking) is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vsampler import SamplingParams, sample


def decode_row(
    model,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    row: int,
    key: jax.Array,
    copies: int = 1,
    per_request_key: bool = False,
    max_new_tokens: int,
    eos: Sequence[int] | None,
    width: int = 64,
    allowed: np.ndarray | None = None,
    logprobs: int | None = None,
    logprobs_mode: str = "raw",
) -> list[int] | tuple[list[int], list]:
    """The tokens row `row` (copy `row % copies` of its prompt) generates (EOS included, no padding), by
    full recomputation. `key` is the call's key, or with `per_request_key` the request's own. `allowed`:
    the row's packed (1, ceil(V / 32)) mask; with `logprobs=n`, also each step's `LogProbs`."""

    @jax.jit
    def last_logits(ids, length):
        mask = jnp.arange(width)[None, :] < length
        logits = model(ids, attention_mask=mask).logits
        return logits[0, length - 1][None, :]

    seq = list(prompt)
    out: list[int] = []
    steps = []
    serving = {} if allowed is None else {"allowed_tokens": allowed}
    if logprobs is not None:
        serving.update(logprobs=logprobs, logprobs_mode=logprobs_mode)
    request, copy = divmod(row, copies)
    request_key = key if per_request_key else jax.random.fold_in(key, request)
    row_key = jax.random.fold_in(request_key, copy)
    limit = min(int(np.asarray(params.max_tokens)), max_new_tokens)
    for k in range(limit):
        ids = np.full((1, width), 0, np.int32)
        ids[0, : len(seq)] = seq
        history = np.full((1, width), -1, np.int32)
        history[0, : len(seq)] = seq
        token = sample(
            last_logits(ids, len(seq)),
            params,
            jax.random.fold_in(row_key, k)[None],
            history=history,
            prompt_len=len(prompt),
            eos_token_id=eos,
            impl="reference",
            **serving,
        )
        if logprobs is not None:
            token, step = token
            steps.append(step)
        token = int(token[0])
        out.append(token)
        seq.append(token)
        if eos is not None and token in eos:
            break
    return out if logprobs is None else (out, steps)
