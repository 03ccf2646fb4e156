"""`SamplingParams`: the per-request sampling parameters, an immutable pytree.

Every numeric field is a Python scalar (the same value for every row) or a `(B,)` array (one value per
row: a heterogeneous serving batch). Concrete values are validated when the object is built; traced
values (params built inside `jit`) cannot be, and are sanitised at run time as `vsampler.core.inputs`
documents.

As a pytree, the numeric fields (and the values of `logit_bias`) are leaves, so new values never force
a recompile. The aux data is `Stages`: which warping stages can be active, read off the concrete values
at construction. Only shapes and a change in the active stages retrace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vsampler.core.serialization import Serializable, serializable

ArrayLike = Any  # Python scalar, numpy array or jax.Array


@dataclasses.dataclass(frozen=True)
class Stages:
    """Which stages of the spec can be active: a stage that is off everywhere is skipped statically."""

    logit_bias: bool = False
    repetition: bool = False
    prompt_ignore: bool = False  # some row's repetition penalty skips the start of its prompt
    presence: bool = False
    frequency: bool = False
    min_tokens: bool = False
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    greedy: bool = False  # some row has temperature == 0
    random: bool = True  # some row has temperature > 0

    @property
    def penalties(self) -> bool:
        return self.repetition or self.presence or self.frequency

    def __or__(self, other: Stages) -> Stages:
        """The stages either set can have active."""
        return Stages(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in dataclasses.fields(Stages)})

    def covers(self, other: Stages) -> bool:
        """Whether every stage `other` can have active is in this set."""
        return all(getattr(self, f.name) or not getattr(other, f.name) for f in dataclasses.fields(Stages))


# name -> (integer field?, lower bound, lower inclusive?, upper bound, upper inclusive?, human range)
_RANGES: dict[str, tuple[bool, float, bool, float, bool, str]] = {
    "max_tokens": (True, 1, True, np.inf, False, "an integer >= 1"),
    "min_tokens": (True, 0, True, np.inf, False, "an integer >= 0"),
    "temperature": (False, 0.0, True, np.inf, False, "a finite float >= 0 (0 means greedy)"),
    "top_k": (True, 0, True, np.inf, False, "an integer >= 0 (0, or >= the vocabulary size, disables it)"),
    "top_p": (False, 0.0, False, 1.0, True, "a float in (0, 1] (1 disables it)"),
    "min_p": (False, 0.0, True, 1.0, True, "a float in [0, 1] (0 disables it)"),
    "repetition_penalty": (False, 0.0, False, np.inf, False, "a finite float > 0 (1 disables it)"),
    "presence_penalty": (False, -2.0, True, 2.0, True, "a float in [-2, 2] (0 disables it)"),
    "frequency_penalty": (False, -2.0, True, 2.0, True, "a float in [-2, 2] (0 disables it)"),
    "prompt_ignore_length": (True, 0, True, np.inf, False, "an integer >= 0 (0: the whole prompt counts)"),
}

NUMERIC_FIELDS: tuple[str, ...] = tuple(_RANGES)


INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
INT_FIELDS: tuple[str, ...] = tuple(name for name, r in _RANGES.items() if r[0])


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def as_used(name: str, value: Any) -> Any:
    """A numeric field's value in the dtype every implementation uses it in: int32 for the integer
    fields, float32 for the others (numpy for concrete values, jnp for traced ones).

    Integers beyond int32's range saturate at its bounds instead of wrapping: every use of an integer
    field reads a value that large as "never reached" (`top_k >= V` is off; a `min_tokens` or
    `max_tokens` of 2**31 - 1 is more than any row generates), so 2**40 means what it says. A traced
    float (`top_k=3.7` inside jit) is truncated toward zero (3), NaN becomes 0. Floats round to the
    nearest float32 (concrete values are validated after that rounding, by `SamplingParams`)."""
    if name not in INT_FIELDS:
        if _is_traced(value):
            return jax.numpy.asarray(value).astype(np.float32)
        with np.errstate(over="ignore"):  # beyond float32: inf, refused by the validation that follows
            return np.asarray(value).astype(np.float32)
    jnp = jax.numpy
    if not _is_traced(value):
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.integer):
            return np.clip(arr, INT32_MIN, INT32_MAX).astype(np.int32)
        xp, arr = np, arr.astype(np.float64)
    else:
        arr = jnp.asarray(value)
        if jnp.issubdtype(arr.dtype, jnp.integer):
            if arr.dtype.itemsize < 4 or arr.dtype == jnp.int32:
                return arr.astype(jnp.int32)
            return jnp.clip(arr, INT32_MIN, INT32_MAX).astype(jnp.int32)
        xp = jnp
    # floats (traced only: concrete floats are refused for the integer fields): truncate, saturate, NaN -> 0
    big = arr >= 2.0**31
    small = arr <= -(2.0**31)
    inside = xp.where(big | small | xp.isnan(arr), 0, arr).astype(xp.int32)
    return xp.where(big, np.int32(INT32_MAX), xp.where(small, np.int32(INT32_MIN), inside))


def _check_numeric(name: str, value: Any) -> Any:
    """Validates one concrete numeric field in the dtype it is used in (`as_used`); returns the value to
    store (lists become numpy arrays)."""
    is_int, lo, lo_incl, hi, hi_incl, allowed = _RANGES[name]
    if _is_traced(value):
        if np.ndim(value) > 1:
            raise ValueError(f"SamplingParams.{name} must be a scalar or a (B,) array, got shape {value.shape}")
        return value
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"SamplingParams.{name} must be {allowed}, or a (B,) array of them, got {value!r}") from e
    if isinstance(value, bool) or (hasattr(value, "dtype") and np.dtype(value.dtype) == np.bool_):
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got a boolean {value!r}")
    arr = np.asarray(value) if isinstance(value, (int, float, np.generic, np.ndarray, jax.Array)) else None
    if arr is None or arr.dtype == object:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    if arr.ndim > 1:
        raise ValueError(f"SamplingParams.{name} must be a scalar or a (B,) array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r} of dtype {arr.dtype}")
    if is_int and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r} of dtype {arr.dtype}")
    given = arr.reshape(-1)
    if not is_int:
        # the value each implementation uses: validated after rounding to float32
        flat = as_used(name, given).astype(np.float64)
    else:  # integers are compared exactly (int64, or uint64 above it: never below any bound)
        flat = given
    bad = np.isnan(flat) if not is_int else np.zeros(flat.shape, bool)
    bad |= (flat < lo) if lo_incl else (flat <= lo)
    bad |= (flat > hi) if hi_incl else (flat >= hi)
    if bad.any():
        row = int(np.argmax(bad))
        where = "" if arr.ndim == 0 else f" at row {row}"
        shown = given[row].item()
        note = ""
        if not is_int and np.isfinite(float(shown)) and not np.isfinite(flat[row]):
            note = " (beyond the float32 range: every implementation computes in float32)"
        elif not is_int and float(shown) != 0 and flat[row] == 0:
            note = " (0 or subnormal in float32, the dtype every implementation computes in)"
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {shown!r}{where}{note}")
    if not is_int:
        tiny = float(np.finfo(np.float32).tiny)
        subnormal = (given != 0) & (np.abs(flat) < tiny)
        if subnormal.any():
            row = int(np.argmax(subnormal))
            where = "" if arr.ndim == 0 else f" at row {row}"
            raise ValueError(
                f"SamplingParams.{name} {given[row].item()!r}{where} is not 0 but is 0 or subnormal in float32, the "
                "dtype every implementation computes in (XLA flushes subnormals to 0 in some operations and not "
                f"others, so implementations would disagree): pass 0, or a magnitude >= {tiny:.4g}"
            )
    return value


def _check_logit_bias(value: Any) -> Any:
    """A mapping {token id: bias} (ids as Python or numpy integers, biases as real numbers, each checked
    in float32) or a float (V,) / (B, V) array; a list is taken as the array. Returns the value to store:
    a dict of int -> float, or an array."""
    if value is None or _is_traced(value):
        return value
    if isinstance(value, Mapping):
        checked = {}
        for token, bias in value.items():
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)) or token < 0:
                raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, (bool, np.bool_)) or not isinstance(bias, (int, float, np.integer, np.floating)):
                if not (isinstance(bias, (np.ndarray, jax.Array)) and np.ndim(bias) == 0 and not _is_traced(bias)):
                    raise ValueError(
                        f"SamplingParams.logit_bias[{int(token)}] must be a real number (finite, or -inf to ban), "
                        f"got {bias!r} of type {type(bias).__name__}"
                    )
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                b = float(np.float32(bias))  # the value used: float32
            if np.isnan(b) or b == np.inf:
                note = " (beyond the float32 range)" if np.isfinite(float(bias)) else ""
                raise ValueError(
                    f"SamplingParams.logit_bias[{int(token)}] must be finite or -inf (a ban), got {bias!r}{note}"
                )
            checked[int(token)] = b
        return checked
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise ValueError(f"SamplingParams.logit_bias as a list must be a (V,) or (B, V) list of floats: {e}") from e
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise ValueError(
            "SamplingParams.logit_bias must be a mapping {token_id: bias} or a float (V,) or (B, V) array, "
            f"got {type(value).__name__}"
        )
    arr = np.asarray(value)
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            "SamplingParams.logit_bias must be a mapping {token_id: bias} or a float (V,) or (B, V) "
            f"array, got {type(value).__name__} with shape {arr.shape} and dtype {arr.dtype}"
        )
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below
        used = arr.astype(np.float32)
    if np.isnan(used).any() or (used == np.inf).any():
        raise ValueError(
            "SamplingParams.logit_bias must hold finite values or -inf (a ban), found NaN or +inf "
            "(in float32, the dtype it is added in)"
        )
    return value


def _any(name: str, value: Any, predicate: Any) -> bool:
    """Whether the stage can be active: always for traced values, else whether any row needs it, read
    off the value in the dtype it is used in (`as_used`)."""
    if _is_traced(value):
        return True
    return bool(np.any(predicate(as_used(name, value))))


@serializable
@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class SamplingParams(Serializable):
    """Sampling parameters with EasyDeL's field names and defaults.

    Attributes:
      max_tokens: tokens a row may generate before it is finished (per row; used by the loop).
      min_tokens: EOS ids are masked to -inf until the row has generated this many tokens.
      temperature: logits are divided by it before filtering; 0 means greedy (argmax after penalties).
      top_k: keep tokens whose value is >= the k-th largest (ties kept); 0 or >= vocab disables it.
      top_p: keep a token when the probability mass strictly above it is < top_p; 1 disables it.
      min_p: keep tokens with probability >= min_p * the largest probability; 0 disables it.
      repetition_penalty: once per distinct token in the history, positive logits are divided by it
        and negative ones multiplied; 1 disables it.
      prompt_ignore_length: the repetition penalty leaves out the row's first n prompt tokens (HF's
        `prompt_ignore_length`): a token it penalises must occur in the generated tokens or in the
        prompt after its first n real tokens. 0 (default): prompt and generated tokens all count; any
        n >= the prompt's length (e.g. 2**31 - 1): generated tokens only. Presence and frequency
        penalties always count generated tokens only.
      presence_penalty: subtracted once per distinct generated token; 0 disables it.
      frequency_penalty: subtracted once per occurrence of a generated token; 0 disables it.
      logit_bias: added to the logits first: a mapping {token_id: bias}, or a float (V,) or (B, V)
        array. -inf bans a token.
    """

    max_tokens: ArrayLike = 16
    min_tokens: ArrayLike = 0
    temperature: ArrayLike = 1.0
    top_k: ArrayLike = 0
    top_p: ArrayLike = 1.0
    min_p: ArrayLike = 0.0
    repetition_penalty: ArrayLike = 1.0
    presence_penalty: ArrayLike = 0.0
    frequency_penalty: ArrayLike = 0.0
    logit_bias: Mapping[int, float] | ArrayLike | None = None
    prompt_ignore_length: ArrayLike = 0  # after EasyDeL's fields, so positional arguments keep their meaning

    def __post_init__(self) -> None:
        for name in NUMERIC_FIELDS:
            object.__setattr__(self, name, _check_numeric(name, getattr(self, name)))
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        lengths = {n: np.shape(getattr(self, n))[0] for n in NUMERIC_FIELDS if np.ndim(getattr(self, n)) == 1}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"SamplingParams per-row fields disagree on the batch size: {lengths}")
        if not (_is_traced(self.min_tokens) or _is_traced(self.max_tokens)):
            over = np.asarray(self.min_tokens) > np.asarray(self.max_tokens)
            if np.any(over):
                raise ValueError(
                    f"SamplingParams.min_tokens ({self.min_tokens!r}) must be <= max_tokens ({self.max_tokens!r})"
                )
        object.__setattr__(self, "_stages", self._infer_stages())

    def _infer_stages(self) -> Stages:
        return Stages(
            logit_bias=self.logit_bias is not None,
            repetition=_any("repetition_penalty", self.repetition_penalty, lambda r: r != 1.0),
            prompt_ignore=_any("prompt_ignore_length", self.prompt_ignore_length, lambda n: n > 0),
            presence=_any("presence_penalty", self.presence_penalty, lambda p: p != 0.0),
            frequency=_any("frequency_penalty", self.frequency_penalty, lambda f: f != 0.0),
            min_tokens=_any("min_tokens", self.min_tokens, lambda m: m > 0),
            top_k=_any("top_k", self.top_k, lambda k: k > 0),
            top_p=_any("top_p", self.top_p, lambda p: p < 1.0),
            min_p=_any("min_p", self.min_p, lambda p: p > 0.0),
            greedy=_any("temperature", self.temperature, lambda t: t == 0.0),
            random=_any("temperature", self.temperature, lambda t: t != 0.0),
        )

    @property
    def stages(self) -> Stages:
        """The stages that can be active (static: part of the pytree's aux data)."""
        return self._stages  # type: ignore[attr-defined]

    def with_stages(self, stages: Stages) -> SamplingParams:
        """The same values with the static stage set fixed to `stages`, for a serving step.

        `sample` / `sample_step` compile once per stage set, and the set follows the values: a batch with
        no greedy row any more, or whose `top_k` all became 0, is another program (a stall of seconds in
        a serving engine whose batch mix changes every step). Build each step's params with one fixed set
        that covers every mix the engine serves, e.g. `Stages(top_k=True, top_p=True, min_p=True,
        greedy=True, random=True)`, and the step compiles once: a stage that is on where no row needs it
        changes no token (its neutral values: top_k 0, top_p 1, min_p 0), it only costs its pass.
        Keep the other static parts fixed too: the shapes, `logit_bias`'s form (None, a dict of the same
        ids, or a dense array) and whether `history` / `eos_token_id` are passed (penalties and
        `min_tokens` need history, `min_tokens` EOS ids, whatever the values).

        Raises ValueError if these values need a stage `stages` leaves off (known for concrete values),
        or if `stages.logit_bias` disagrees with whether a `logit_bias` is set."""
        if not isinstance(stages, Stages):
            raise ValueError(f"with_stages takes a vsampler.Stages, got {type(stages).__name__}")
        if not stages.covers(self.stages):
            missing = [
                f.name
                for f in dataclasses.fields(Stages)
                if getattr(self.stages, f.name) and not getattr(stages, f.name)
            ]
            raise ValueError(f"with_stages: these values need the stages {missing}, which the given set leaves off")
        if stages.logit_bias != (self.logit_bias is not None):
            raise ValueError(
                "with_stages: stages.logit_bias must be True exactly when a logit_bias is set "
                f"(logit_bias is {'set' if self.logit_bias is not None else 'None'})"
            )
        children, _ = self.tree_flatten()
        return SamplingParams.tree_unflatten(stages, children)

    def in_used_dtypes(self) -> SamplingParams:
        """The same params with every concrete numeric field as the array it is used as (`as_used`: int32,
        saturating, and float32), the same stages. The public entries call it before `jit`, whose own
        conversion of an int64 argument under 32-bit mode would wrap (2**32 + 1 -> 1)."""
        children, stages = self.tree_flatten()
        converted = [
            value if _is_traced(value) else as_used(name, value)
            for name, value in zip(NUMERIC_FIELDS, children[: len(NUMERIC_FIELDS)], strict=True)
        ]
        return SamplingParams.tree_unflatten(stages, (*converted, children[-1]))

    @property
    def batch_size(self) -> int | None:
        """The length of the per-row fields, or None when every field is a scalar."""
        for name in NUMERIC_FIELDS:
            if np.ndim(getattr(self, name)) == 1:
                return int(np.shape(getattr(self, name))[0])
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            if np.ndim(self.logit_bias) == 2:
                return int(np.shape(self.logit_bias)[0])
        return None

    # -- pytree ------------------------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[Any, ...], Stages]:
        children = (*(getattr(self, name) for name in NUMERIC_FIELDS), self.logit_bias)
        return children, self.stages

    @classmethod
    def tree_unflatten(cls, stages: Stages, children: tuple[Any, ...]) -> SamplingParams:
        obj = object.__new__(cls)
        for name, value in zip((*NUMERIC_FIELDS, "logit_bias"), children, strict=True):
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, "_stages", stages)
        return obj

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in (*NUMERIC_FIELDS, "logit_bias"))
        return f"SamplingParams({shown})"
