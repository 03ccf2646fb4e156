"""The input contract shared by every implementation: argument checks, run-time sanitising, the draw.

`prepare` turns the public arguments of `sample` / `process_logits` into a `SamplerInputs`: per-row
parameter arrays, the bias, the history, the EOS ids and the one uniform per row. Every implementation
(reference, xla, pallas) starts from the same `SamplerInputs`, so they see the same parameters and the
same `u` for the same key.

Errors known at trace time (shapes, dtypes, static ids, stages that need an argument that is missing)
raise `ValueError` naming the argument. Values only known at run time (traced parameters, history ids)
cannot raise; they are sanitised as follows, and the tests pin it:

* every float field: a subnormal float32 value is 0 (XLA flushes subnormals in some operations and not
  others; concrete subnormal values are refused);
* temperature NaN or < 0 -> 0 (greedy); +inf -> 1 / T = 0, every finite token the same weight: uniform
  sampling over what the filters keep (top-k, top-p and min-p on equal values keep every tie);
* integer fields are used as int32: larger values saturate (`vsampler.core.params.as_used`: a huge top_k is
  off), a traced float `top_k=3.7` is truncated toward zero (3), NaN -> 0;
* top_k < 0 or >= V -> 0 (off); top_p NaN -> 1, else clipped to [tiny, 1] (top_p <= 0 keeps only
  the most probable tokens); min_p NaN -> 0, else clipped to [0, 1];
* top_p < 1 (concrete or traced) is applied as `max(top_p - TOP_P_SLACK, tiny)`: a mass above a token
  within 2^-20 of p counts as reaching p, so decimal boundaries come out as exact arithmetic says
  (probabilities {0.3, 0.1, 0.1, 0.5} at top_p 0.8: the mass above the 0.1 pair is 0.8, and they are
  dropped), not as float32 rounding of log(p), softmax and the sums happens to fall;
* repetition_penalty NaN, <= 0 or inf -> 1 (off); presence / frequency NaN -> 0, else clipped to [-2, 2];
* min_tokens < 0 -> 0; max_tokens < 1 -> 1; prompt_ignore_length < 0 -> 0;
* history ids < 0 are empty slots; ids >= V are ignored like empty slots; traced EOS ids outside
  [0, V) are ignored.

`allowed_tokens` (structured output) is the packed bitmask grammar engines (xgrammar, llguidance) write:
int32 `(B, ceil(V / 32))`, bit `j % 32` (least significant first) of word `j // 32` set when token `j` is
allowed; bits past V are ignored. It needs `eos_token_id`: a row left with no allowed token that has a
finite logit cannot continue, and samples the first EOS id (the request ends) instead of token 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core.params import INT32_MAX, INT32_MIN, NUMERIC_FIELDS, SamplingParams, Stages, as_used

EosIds = int | Sequence[int] | jax.Array | np.ndarray | None


class RowParams(NamedTuple):
    """Every numeric `SamplingParams` field as a sanitised `(B,)` array."""

    max_tokens: jax.Array  # int32
    min_tokens: jax.Array  # int32
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off (also when the request was >= V)
    top_p: jax.Array  # float32 in [tiny, 1], the slack applied (1 = off)
    min_p: jax.Array  # float32 in [0, 1]
    repetition_penalty: jax.Array  # float32 > 0
    presence_penalty: jax.Array  # float32 in [-2, 2]
    frequency_penalty: jax.Array  # float32 in [-2, 2]
    prompt_ignore_length: jax.Array  # int32 >= 0: prompt tokens the repetition penalty leaves out


class SamplerInputs(NamedTuple):
    """What every implementation receives. Shapes: B rows, V vocabulary, L history, E EOS ids."""

    logits: jax.Array  # (B, V) float32 / bfloat16 / float16, as given
    params: RowParams
    stages: Stages  # static
    bias_dense: jax.Array | None  # (V,) or (B, V) float32
    bias_ids: jax.Array | None  # (N,) int32, static ids of a mapping bias
    bias_values: jax.Array | None  # (N,) float32
    history: jax.Array | None  # (B, L) int32, negative = empty
    prompt_len: jax.Array  # (B,) int32
    eos_ids: jax.Array | None  # (E,) int32, or (B, S) per-request stop ids (-1 = padding)
    u: jax.Array | None  # (B,) float32 in [0, 1): one uniform per row
    allowed: jax.Array | None = None  # (B, ceil(V / 32)) int32 packed bitmask, 1 = allowed
    empty_token: jax.Array | int = 0  # the token of a row with no finite logit left (int32 scalar or (B,))


# top-p's tolerance (module docstring): far above the float32 rounding of the masses (~1e-7 relative in
# the reference's compensated sums, ~log2(V) * 6e-8 in the fast paths' float32 sums), far below any
# boundary a person writes with a few decimals; it moves each row's kept set by at most that much mass
TOP_P_SLACK = 2.0**-20


def _row_array(name: str, value: Any, batch: int) -> jax.Array:
    arr = jnp.asarray(as_used(name, value))  # int32 (saturating) / float32, also under jax_enable_x64
    if arr.ndim == 1 and arr.shape[0] != batch:
        raise ValueError(f"SamplingParams.{name} has {arr.shape[0]} per-row values but the logits have {batch} rows")
    return jnp.broadcast_to(arr, (batch,))


def sanitise_row_params(params: SamplingParams, batch: int, vocab: int) -> RowParams:
    """Per-row arrays with out-of-range (traced) values mapped as the module docstring says."""
    v = {name: _row_array(name, getattr(params, name), batch) for name in NUMERIC_FIELDS}
    tiny = jnp.finfo(jnp.float32).tiny
    for name, value in v.items():  # subnormal floats are 0: XLA flushes them in some operations, not others
        if jnp.issubdtype(value.dtype, jnp.floating):
            v[name] = jnp.where(jnp.abs(value) < tiny, jnp.float32(0), value)
    t = v["temperature"]
    k = v["top_k"]
    p = v["top_p"]
    mp = v["min_p"]
    r = v["repetition_penalty"]
    return RowParams(
        max_tokens=jnp.maximum(v["max_tokens"], 1),
        min_tokens=jnp.maximum(v["min_tokens"], 0),
        temperature=jnp.where(jnp.isnan(t) | (t < 0), 0.0, t),
        top_k=jnp.where((k < 0) | (k >= vocab), 0, k),
        top_p=jnp.where(jnp.isnan(p) | (p >= 1.0), 1.0, jnp.maximum(p - TOP_P_SLACK, jnp.finfo(jnp.float32).tiny)),
        min_p=jnp.where(jnp.isnan(mp), 0.0, jnp.clip(mp, 0.0, 1.0)),
        repetition_penalty=jnp.where(jnp.isnan(r) | (r <= 0) | jnp.isinf(r), 1.0, r),
        presence_penalty=jnp.clip(jnp.nan_to_num(v["presence_penalty"], nan=0.0), -2.0, 2.0),
        frequency_penalty=jnp.clip(jnp.nan_to_num(v["frequency_penalty"], nan=0.0), -2.0, 2.0),
        prompt_ignore_length=jnp.maximum(v["prompt_ignore_length"], 0),
    )


def _check_logits(logits: Any) -> jax.Array:
    if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
        logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be a (B, V) array, got shape {tuple(logits.shape)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got dtype {logits.dtype}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    return jnp.asarray(logits)


def _check_bias(params: SamplingParams, batch: int, vocab: int) -> tuple[Any, Any, Any]:
    bias = params.logit_bias
    if bias is None:
        return None, None, None
    if isinstance(bias, Mapping):
        if not bias:
            return None, None, None
        ids = sorted(bias)
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias has token id(s) {bad} outside the vocabulary [0, {vocab})")
        values = jnp.stack([jnp.asarray(bias[i], jnp.float32) for i in ids])
        return None, jnp.asarray(ids, jnp.int32), values
    arr = jnp.asarray(bias, jnp.float32)
    if arr.shape not in ((vocab,), (batch, vocab)):
        raise ValueError(
            f"SamplingParams.logit_bias array must have shape (V,) = ({vocab},) or (B, V) = ({batch}, {vocab}), "
            f"got {tuple(arr.shape)}"
        )
    return arr, None, None


def _check_history(history: Any, prompt_len: Any, batch: int) -> tuple[Any, jax.Array]:
    if history is not None:
        history = ids_as_int32(history, "history")
        if history.ndim != 2 or history.shape[0] != batch:
            raise ValueError(f"history must be a (B, L) = ({batch}, L) array of token ids, got shape {history.shape}")
    if prompt_len is None:
        return history, jnp.zeros((batch,), jnp.int32)
    if history is None:
        raise ValueError("prompt_len was given without history: it says where the history's prompt ends")
    pl = jnp.asarray(prompt_len)
    if not jnp.issubdtype(pl.dtype, jnp.integer) or pl.ndim > 1 or (pl.ndim == 1 and pl.shape[0] != batch):
        raise ValueError(
            f"prompt_len must be an integer scalar or a (B,) = ({batch},) integer array, got {pl.shape} {pl.dtype}"
        )
    check_prompt_len_range(prompt_len, history.shape[1])
    return history, jnp.broadcast_to(pl.astype(jnp.int32), (batch,))


def ids_as_int32(ids: Any, name: str) -> jax.Array:
    """Integer token ids as int32 without wrapping: an id beyond int32's range (an int64 / uint64 history
    id of 2**32 + 10, say) is outside every vocabulary, so it becomes -1, an empty slot, instead of
    wrapping onto a real token (10). Concrete ids are converted in numpy, before jax could truncate them."""
    if not isinstance(ids, jax.core.Tracer):
        if isinstance(ids, (list, tuple)):
            ids = np.asarray(ids)
        if not hasattr(ids, "dtype"):
            raise ValueError(f"{name} must be an integer array of token ids, got {type(ids).__name__}")
        if not np.issubdtype(np.dtype(ids.dtype), np.integer):
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if isinstance(ids, np.ndarray) and ids.dtype.itemsize >= 4 and ids.dtype != np.int32:
            ids = np.where((ids < INT32_MIN) | (ids > INT32_MAX), -1, ids).astype(np.int32)
        return jnp.asarray(ids).astype(jnp.int32)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dtype.itemsize >= 4 and ids.dtype != jnp.int32:  # int64 / uint32 / uint64 (x64 on)
        ids = jnp.where((ids < INT32_MIN) | (ids > INT32_MAX), -1, ids)
    return ids.astype(jnp.int32)


def allowed_words(vocab: int) -> int:
    """Words of the packed `allowed_tokens` bitmask for a vocabulary of V tokens: ceil(V / 32)."""
    return -(-vocab // 32)


def mask_words(allowed_tokens: Any) -> Any:
    """The one dtype rule for a packed `allowed_tokens` mask, in `sample`, `sample_step`, `generate` and
    `send`: 32-bit words, int32 or uint32 (xgrammar's and llguidance's); a wider integer array (numpy's
    default int64) is accepted when every value is a 32-bit word (in [-2**31, 2**32)), and taken as
    that word. Anything else (floats, bools, lists of them, wider values) is refused, naming the
    argument. Concrete masks come back as int32 numpy words; traced ones as int32 tracers."""
    if allowed_tokens is None:
        return None
    if isinstance(allowed_tokens, jax.core.Tracer):
        dtype = allowed_tokens.dtype
        if not jnp.issubdtype(dtype, jnp.integer) or dtype.itemsize < 4:
            raise ValueError(f"allowed_tokens must be int32 (or uint32) packed words, got dtype {dtype}")
        if dtype == jnp.uint32:
            return jax.lax.bitcast_convert_type(allowed_tokens, jnp.int32)
        return allowed_tokens.astype(jnp.uint32).astype(jnp.int32) if dtype != jnp.int32 else allowed_tokens
    try:
        words = np.asarray(allowed_tokens)
    except (ValueError, TypeError) as e:
        raise ValueError(f"allowed_tokens must be an int32 (or uint32) array of packed words: {e}") from e
    if words.dtype in (np.int32, np.uint32):
        return words.view(np.int32)
    if not np.issubdtype(words.dtype, np.integer) or words.dtype.itemsize < 4:
        raise ValueError(f"allowed_tokens must be int32 (or uint32) packed words, got dtype {words.dtype}")
    if words.size and (words.min() < INT32_MIN or words.max() > np.iinfo(np.uint32).max):
        raise ValueError(
            f"allowed_tokens holds values outside 32-bit words (min {words.min()}, max {words.max()}): "
            "pack the mask as int32 or uint32 (vsampler.pack_allowed)"
        )
    return words.astype(np.int64).astype(np.uint32).view(np.int32)


def _check_allowed(allowed_tokens: Any, batch: int, vocab: int) -> jax.Array | None:
    if allowed_tokens is None:
        return None
    if not hasattr(allowed_tokens, "dtype"):
        allowed_tokens = np.asarray(allowed_tokens)
    words = allowed_words(vocab)
    if tuple(allowed_tokens.shape) != (batch, words):
        raise ValueError(
            f"allowed_tokens must be the packed bitmask (B, ceil(V / 32)) = ({batch}, {words}) for V={vocab}, "
            f"got shape {tuple(allowed_tokens.shape)}"
        )
    return jnp.asarray(mask_words(allowed_tokens))


def unpack_allowed(words: jax.Array, vocab: int) -> jax.Array:
    """The packed bitmask `(..., ceil(V / 32))` int32 as bool `(..., V)`: token j is bit j % 32 of word j // 32."""
    words = jnp.asarray(words, jnp.int32)[..., None]
    bit = jax.lax.broadcasted_iota(jnp.int32, (*words.shape[:-1], 32), words.ndim - 1)
    bits = jax.lax.shift_right_logical(jnp.broadcast_to(words, bit.shape), bit) & 1
    return bits.reshape(*words.shape[:-2], -1)[..., :vocab] > 0


def pack_allowed(allowed: Any) -> np.ndarray:
    """The inverse of `unpack_allowed` (numpy, for callers and tests): bool `(B, V)` -> int32 `(B, ceil(V / 32))`."""
    allowed = np.asarray(allowed, bool)
    batch, vocab = allowed.shape
    padded = np.zeros((batch, allowed_words(vocab) * 32), bool)
    padded[:, :vocab] = allowed
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64)).astype(np.uint64)
    words = (padded.reshape(batch, -1, 32).astype(np.uint64) * weights).sum(axis=2)
    return words.astype(np.uint32).view(np.int32)


def check_prompt_len_range(prompt_len: Any, history_len: int) -> None:
    """Concrete integer prompt lengths must lie in [0, L]; traced ones cannot be checked (the masks then
    count positions >= prompt_len as generated, whatever its value)."""
    if prompt_len is None or isinstance(prompt_len, jax.core.Tracer):
        return
    npl = np.asarray(prompt_len)
    if np.issubdtype(npl.dtype, np.integer) and (np.any(npl < 0) or np.any(npl > history_len)):
        raise ValueError(f"prompt_len must lie in [0, L={history_len}], got {prompt_len!r}")


def check_eos_rows(eos_token_id: Any, batch: int, vocab: int) -> None:
    """Per-request stop ids, a (B, S) integer array with -1 as padding: the shape, dtype and (when
    concrete) every id in [-1, V) are checked."""
    dtype = getattr(eos_token_id, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or eos_token_id.shape[0] != batch:
        raise ValueError(
            f"eos_token_id as per-request stop ids must be a (B, S) = ({batch}, S) integer array (-1 = padding), "
            f"got shape {np.shape(eos_token_id)} dtype {dtype}"
        )
    if not isinstance(eos_token_id, jax.core.Tracer):
        ids = np.asarray(eos_token_id)
        bad = ids[(ids < -1) | (ids >= vocab)]
        if bad.size:
            raise ValueError(
                f"eos_token_id {sorted(set(bad.tolist()))[:8]} outside the vocabulary [0, {vocab}) (-1 = padding)"
            )


def normalise_eos(eos_token_id: EosIds, vocab: int, batch: int | None = None) -> jax.Array | None:
    """EOS ids as an (E,) int32 array, or (B, S) per-request stop ids (-1 = padding); concrete ids are
    checked against the vocabulary, traced ones outside [0, V) are ignored."""
    if eos_token_id is None:
        return None
    if np.ndim(eos_token_id) == 2 and batch is not None:
        check_eos_rows(eos_token_id, batch, vocab)
        ids = jnp.asarray(eos_token_id).astype(jnp.int32)
        return jnp.where((ids >= 0) & (ids < vocab), ids, -1)
    if isinstance(eos_token_id, jax.core.Tracer):
        ids = jnp.asarray(eos_token_id).reshape(-1).astype(jnp.int32)
        return jnp.where((ids >= 0) & (ids < vocab), ids, -1)  # out of range: ignored
    arr = np.asarray(eos_token_id)
    if arr.size == 0:
        return None
    if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"eos_token_id must be an integer id or a sequence of ids, got {eos_token_id!r}")
    bad = arr.reshape(-1)[(arr.reshape(-1) < 0) | (arr.reshape(-1) >= vocab)]
    if bad.size:
        raise ValueError(f"eos_token_id {bad.tolist()} outside the vocabulary [0, {vocab})")
    return jnp.asarray(arr.reshape(-1), jnp.int32)


def key_array(key: Any) -> tuple[jax.Array, int]:
    """`key` as a jax array of PRNG keys (typed `jax.random.key`s or raw uint32 `PRNGKey`s), and the
    number of dimensions one key has in it (0 typed, 1 raw); anything else is a ValueError naming `key`."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed and (key.dtype != jnp.uint32 or key.shape[-1:] != (2,)):
        raise ValueError(
            "key must be a PRNG key (jax.random.key / PRNGKey) or a (B,) batch of keys, "
            f"got dtype {key.dtype} and shape {key.shape}"
        )
    return key, 0 if typed else 1


def draw_uniforms(key: Any, batch: int) -> jax.Array:
    """One uniform in [0, 1) per row: `uniform(key, (B,))` for one key; row i from `keys[i]` alone."""
    key, single_ndim = key_array(key)
    if key.ndim == single_ndim:
        return jax.random.uniform(key, (batch,), dtype=jnp.float32)
    if key.ndim == single_ndim + 1 and key.shape[0] == batch:
        return jax.vmap(lambda k: jax.random.uniform(k, (), dtype=jnp.float32))(key)
    raise ValueError(f"key must be one PRNG key or a batch of {batch} keys (one per row), got shape {key.shape}")


def prepare(
    logits: Any,
    params: SamplingParams,
    key: Any | None,
    *,
    history: Any = None,
    prompt_len: Any = None,
    eos_token_id: EosIds = None,
    allowed_tokens: Any = None,
    draw: bool = True,
) -> SamplerInputs:
    """Checks the public arguments and builds the `SamplerInputs` all implementations share.

    `draw=False` (for `process_logits`) skips the uniforms, so no key is needed.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    logits = _check_logits(logits)
    batch, vocab = logits.shape
    if params.batch_size is not None and params.batch_size != batch:
        raise ValueError(f"SamplingParams has {params.batch_size} per-row values but the logits have {batch} rows")
    stages = params.stages
    bias_dense, bias_ids, bias_values = _check_bias(params, batch, vocab)
    history, prompt_len_arr = _check_history(history, prompt_len, batch)
    if stages.penalties and history is None:
        raise ValueError(
            "repetition/presence/frequency penalties are set but history is None: pass the (B, L) token "
            "history the penalties apply to"
        )
    eos_ids = normalise_eos(eos_token_id, vocab, batch)
    if stages.min_tokens and eos_ids is None:
        raise ValueError("SamplingParams.min_tokens > 0 needs eos_token_id: the ids it keeps masked")
    if stages.min_tokens and history is None:  # the penalties' rule: a stage that counts tokens needs them
        raise ValueError(
            "SamplingParams.min_tokens > 0 is set but history is None: it counts each row's generated tokens "
            "(history positions >= prompt_len); pass the (B, L) history (all -1 for rows that have generated "
            "nothing yet)"
        )
    allowed = _check_allowed(allowed_tokens, batch, vocab)
    empty_token: jax.Array | int = 0
    if allowed is not None:
        if eos_ids is None:
            raise ValueError(
                "allowed_tokens needs eos_token_id: a row whose mask leaves no token samples the first EOS id "
                "(the request ends) instead of an arbitrary token"
            )
        empty_token = first_eos(eos_ids)
    u = None
    if draw and stages.random:
        if key is None:
            raise ValueError("key is None but some row samples (temperature > 0): pass a PRNG key")
        u = draw_uniforms(key, batch)
    return SamplerInputs(
        logits=logits,
        params=sanitise_row_params(params, batch, vocab),
        stages=stages,
        bias_dense=bias_dense,
        bias_ids=bias_ids,
        bias_values=bias_values,
        history=history,
        prompt_len=prompt_len_arr,
        eos_ids=eos_ids,
        u=u,
        allowed=allowed,
        empty_token=empty_token,
    )


def first_eos(eos_ids: jax.Array) -> jax.Array:
    """The first EOS id (a scalar), or with per-request ids (B, S) each row's first id (B,) (0: none)."""
    if eos_ids.ndim == 1:
        return jnp.maximum(eos_ids[0], 0)
    first = jnp.take_along_axis(eos_ids, jnp.argmax(eos_ids >= 0, axis=1)[:, None], axis=1)[:, 0]
    return jnp.maximum(first, 0)


def eos_rows(eos_ids: jax.Array) -> jax.Array:
    """EOS ids broadcastable against (B, S) rows: (1, E) for one set, (B, S) for per-request ids."""
    return eos_ids[None, :] if eos_ids.ndim == 1 else eos_ids


def history_masks(history: jax.Array, prompt_len: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """`(valid, generated)`: (B, L) masks of real history slots, and of those at positions >= prompt_len."""
    valid = (history >= 0) & (history < vocab)
    positions = jnp.arange(history.shape[1], dtype=jnp.int32)[None, :]
    return valid, valid & (positions >= prompt_len[:, None])


def ignored_prompt_slots(valid: jax.Array, generated: jax.Array, ignore: jax.Array) -> jax.Array:
    """(B, L) bool: the real prompt slots among each row's first `ignore` (B,) real prompt tokens, counted
    in history order (left padding and empty slots are not tokens, so they never use up the count)."""
    prompt = valid & ~generated
    rank = jnp.cumsum(prompt, axis=1, dtype=jnp.int32)  # 1 for the row's first real prompt token
    return prompt & (rank <= ignore[:, None])
