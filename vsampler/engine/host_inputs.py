"""The host side of the loop's inputs: prompts packed into a bucket, sampling parameters as the compiled
loop takes them (fixed shapes and dtypes, so new values never recompile), and per-request keys.

Everything here is numpy on the host, before anything is placed on a device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core.params import INT_FIELDS, NUMERIC_FIELDS, SamplingParams, Stages, as_used

_NEUTRAL = SamplingParams(max_tokens=1)  # values for the rows that only fill a bucket


def check_prompts(input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)`: the (B, L) integer prompts and their (B, L) bool mask (default: all real), checked."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a (batch, length) integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt of at least one token, got shape {ids.shape}")
    if attention_mask is None:
        return ids, np.ones(ids.shape, bool)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}")
    if not (mask.dtype == np.bool_ or np.isin(mask, (0, 1)).all()):
        raise ValueError("attention_mask must hold only 0/1 (or booleans)")
    return ids, mask.astype(bool)


def left_pad(ids: np.ndarray, mask: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens, in order, right-aligned in `length` slots."""
    out = np.full((ids.shape[0], length), pad, np.int64)
    out_mask = np.zeros((ids.shape[0], length), np.int32)
    for r in range(ids.shape[0]):
        real = ids[r][mask[r]]
        out[r, length - real.size :] = real
        out_mask[r, length - real.size :] = 1
    return out, out_mask


def pad_rows(a: np.ndarray, rows: int, value: int) -> np.ndarray:
    """`a` with rows of `value` appended up to `rows` rows (the rows that only fill a bucket)."""
    return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), value, a.dtype)]) if rows > a.shape[0] else a


def abstract_params(stages: Stages, rows: int, vocab: int) -> SamplingParams:
    """The shapes `row_params` produces, to compile against: (rows,) int32 / float32 fields, a dense
    (rows, V) float32 bias when the bias stage is on."""
    leaves = [jax.ShapeDtypeStruct((rows,), jnp.int32 if n in INT_FIELDS else jnp.float32) for n in NUMERIC_FIELDS]
    bias = jax.ShapeDtypeStruct((rows, vocab), jnp.float32) if stages.logit_bias else None
    return SamplingParams.tree_unflatten(stages, (*leaves, bias))


def _per_row(name: str, value: Any, batch: int, n: int, rows: int, neutral: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        out = np.full((batch * n,), arr)
    elif arr.shape[0] == batch:
        out = np.repeat(arr, n, axis=0)
    elif arr.shape[0] == batch * n:
        out = arr
    else:
        raise ValueError(
            f"SamplingParams.{name} has {arr.shape[0]} rows; the batch has {batch} prompts "
            f"({batch * n} rows with num_return_sequences={n})"
        )
    return pad_rows(out, rows, neutral)


def row_params(params: SamplingParams, stages: Stages, batch: int, n: int, rows: int, vocab: int) -> SamplingParams:
    """The params as the compiled loop takes them: (rows,) arrays of fixed dtypes, `stages` as aux data."""
    leaves = [  # int32 (saturating) / float32: the dtypes they are validated and used in
        as_used(name, _per_row(name, getattr(params, name), batch, n, rows, getattr(_NEUTRAL, name)))
        for name in NUMERIC_FIELDS
    ]
    bias = None
    if stages.logit_bias:
        dense = np.zeros((rows, vocab), np.float32)
        lb = params.logit_bias
        if isinstance(lb, Mapping):
            for token, value in lb.items():
                if token >= vocab:
                    raise ValueError(f"SamplingParams.logit_bias token {token} outside the vocabulary [0, {vocab})")
                dense[: batch * n, token] = value
        elif lb is not None:
            arr = np.asarray(lb, np.float32)
            if arr.shape[-1] != vocab:
                raise ValueError(f"SamplingParams.logit_bias has {arr.shape[-1]} columns, the vocabulary {vocab}")
            dense[: batch * n] = arr if arr.ndim == 1 else _per_row("logit_bias", arr, batch, n, batch * n, 0)
        bias = dense
    return SamplingParams.tree_unflatten(stages, (*leaves, bias))


def request_keys(key: Any, batch: int) -> tuple[np.ndarray, bool]:
    """Each request's key as raw data, `(batch, *key_shape)` uint32, and whether they still need the request
    index folded in: one key (typed, or raw uint32) serves every request as `fold_in(key, i)`; a batch of
    `batch` keys gives request i `key[i]` itself (per-request seeds)."""
    default = jax.random.key(0)
    if key is None:
        key = default
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        raise ValueError(
            f"key must be a PRNG key (jax.random.key(seed)) or one per prompt, got {type(key).__name__} {key!r}"
        )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != jax.random.key_impl(default):
            raise ValueError(
                f"key must use the default PRNG implementation ({jax.random.key_impl(default)}), "
                f"got {jax.random.key_impl(key)}"
            )
        key = jax.random.key_data(key)
    data = np.asarray(key)
    one = jax.random.key_data(default).shape
    if data.dtype == np.uint32 and data.shape == one:
        return np.broadcast_to(data, (batch, *one)).copy(), True
    if data.dtype == np.uint32 and data.shape == (batch, *one):
        return data, False
    raise ValueError(
        f"key must be one PRNG key or one per prompt ({batch} keys, e.g. jax.random.split(key, {batch})), "
        f"got raw data of shape {data.shape} and dtype {data.dtype}"
    )
