"""Exact, process-independent serialisation of vsampler's dataclasses.

`to_dict` / `from_dict` keep arrays as arrays and nested dataclasses as plain dicts tagged with their
class name; `to_json` / `from_json` go one step further and encode every array (its dtype, shape and raw
bytes, base64), every PRNG key (its implementation and key data), non-finite floats, tuples, dicts with
non-string keys and `PartitionSpec`s, so that `from_json(to_json(x))` rebuilds `x` bit for bit.

Only classes registered with `serializable` can be rebuilt: decoding never imports or calls anything
named by the input.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}

_TYPE = "__vsampler_type__"


def serializable(cls: type[T]) -> type[T]:
    """Registers a dataclass so that `from_dict` / `from_json` may rebuild it by name."""
    _REGISTRY[cls.__name__] = cls
    return cls


def _is_prng_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """The fields of a registered dataclass as a dict; nested registered dataclasses become tagged dicts."""
    return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and type(value).__name__ in _REGISTRY:
        return {_TYPE: type(value).__name__, **dataclass_to_dict(value)}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, PartitionSpec):
        return tuple(_to_plain(v) for v in value)
    return value


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuilds `cls` from `dataclass_to_dict`'s output (nested tagged dicts become dataclasses again)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names - {_TYPE}
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {sorted(unknown)}; expected {sorted(names)}")
    kwargs = {k: _from_plain(v) for k, v in data.items() if k != _TYPE}
    return _construct(cls, kwargs)


def _construct(cls: type[T], kwargs: dict[str, Any]) -> T:
    init_names = {f.name for f in dataclasses.fields(cls) if f.init}
    obj = cls(**{k: v for k, v in kwargs.items() if k in init_names})
    for k, v in kwargs.items():  # fields computed in __post_init__ are restored as they were saved
        if k not in init_names:
            object.__setattr__(obj, k, v)
    return obj


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        if _TYPE in value:
            name = value[_TYPE]
            if name not in _REGISTRY:
                raise ValueError(f"cannot rebuild unknown type {name!r}; known: {sorted(_REGISTRY)}")
            return dataclass_from_dict(_REGISTRY[name], value)
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, PartitionSpec):
        return tuple(_from_plain(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------- JSON


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if _is_prng_key(value):
        return {
            "__prng_key__": str(jax.random.key_impl(value)),
            "data": _encode(np.asarray(jax.random.key_data(value))),
        }
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(value)
        return {
            "__array__": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "jax": isinstance(value, jax.Array),
        }
    if isinstance(value, PartitionSpec):
        return {"__pspec__": [_encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and "__dict__" not in value:
            return {k: _encode(v) for k, v in value.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot encode a value of type {type(value).__name__} as JSON: {value!r}")


def _decode(value: Any, path: str = "$") -> Any:
    """The inverse of `_encode`; a tampered value raises ValueError naming its path (`$.sequences`, ...)."""
    if isinstance(value, list):
        return [_decode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    try:
        if "__float__" in value:
            return float(value["__float__"])
        if "__prng_key__" in value:
            data = _decode(value["data"], f"{path}.data")
            return jax.random.wrap_key_data(jnp.asarray(data), impl=value["__prng_key__"])
        if "__array__" in value:
            return _decode_array(value, path)
        if "__pspec__" in value:
            return PartitionSpec(*[_decode(v, f"{path}[{i}]") for i, v in enumerate(value["__pspec__"])])
        if "__tuple__" in value:
            return tuple(_decode(v, f"{path}[{i}]") for i, v in enumerate(value["__tuple__"]))
        if "__dict__" in value:
            return {
                _hashable(_decode(k, f"{path}[{i}]")): _decode(v, f"{path}[{k!r}]")
                for i, (k, v) in enumerate(value["__dict__"])
            }
    except _Tampered:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _Tampered(f"from_json: the value at {path} is malformed ({type(e).__name__}: {e})") from e
    return {k: _decode(v, f"{path}.{k}") for k, v in value.items()}


class _Tampered(ValueError):
    """A serialised value that does not decode (tampered or truncated JSON): names the field's path."""


def _decode_array(value: dict[str, Any], path: str) -> Any:
    try:
        raw = base64.b64decode(value["__array__"], validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise _Tampered(f"from_json: the array at {path} has bad base64 data ({e})") from e
    try:
        dtype = np.dtype(jnp.dtype(value["dtype"]))
    except (TypeError, ValueError) as e:
        raise _Tampered(f"from_json: the array at {path} has an unknown dtype {value['dtype']!r}") from e
    if dtype.kind not in "biufcV" or dtype.hasobject:
        raise _Tampered(f"from_json: the array at {path} has dtype {dtype}, not a numeric array dtype")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise _Tampered(f"from_json: the array at {path} has a bad shape {shape!r} (a list of sizes >= 0)")
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise _Tampered(
            f"from_json: the array at {path} holds {len(raw)} bytes, but shape {shape} of {dtype} needs "
            f"{dtype.itemsize * math.prod(shape)}"
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return jnp.asarray(arr) if value.get("jax") else arr


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def to_json_text(obj: Any, **json_kwargs: Any) -> str:
    """JSON text that `from_json_text` turns back into an equal object (arrays bit for bit)."""
    return json.dumps(_encode(_to_plain(obj)), allow_nan=False, **json_kwargs)


def from_json_text(cls: type[T], text: str) -> T:
    try:
        parsed = json.loads(text)
    except RecursionError as e:
        raise ValueError(f"{cls.__name__}.from_json: the JSON is nested too deeply to be a serialised object") from e
    try:
        data = _decode(parsed)
    except RecursionError as e:
        raise ValueError(f"{cls.__name__}.from_json: the JSON is nested too deeply to be a serialised object") from e
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}.from_json expects a JSON object, got {type(data).__name__}")
    name = data.get(_TYPE, cls.__name__)
    if name != cls.__name__:
        raise ValueError(f"{cls.__name__}.from_json was given a serialised {name}")
    return dataclass_from_dict(cls, data)


class Serializable:
    """Mixin: `replace`, `to_dict` / `from_dict`, `to_json` / `from_json` for a registered dataclass."""

    def replace(self: T, **kwargs: Any) -> T:
        return dataclasses.replace(self, **kwargs)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return {_TYPE: type(self).__name__, **dataclass_to_dict(self)}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return dataclass_from_dict(cls, data)

    def to_json(self, **kwargs: Any) -> str:
        return to_json_text(self, **kwargs)

    @classmethod
    def from_json(cls: type[T], json_str: str) -> T:
        return from_json_text(cls, json_str)
