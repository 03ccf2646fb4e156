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


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__prng_key__" in value:
        return jax.random.wrap_key_data(jnp.asarray(_decode(value["data"])), impl=value["__prng_key__"])
    if "__array__" in value:
        dtype = jnp.dtype(value["dtype"])
        arr = np.frombuffer(base64.b64decode(value["__array__"]), dtype=dtype).reshape(value["shape"]).copy()
        return jnp.asarray(arr) if value["jax"] else arr
    if "__pspec__" in value:
        return PartitionSpec(*[_decode(v) for v in value["__pspec__"]])
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_hashable(_decode(k)): _decode(v) for k, v in value["__dict__"]}
    return {k: _decode(v) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def to_json_text(obj: Any, **json_kwargs: Any) -> str:
    """JSON text that `from_json_text` turns back into an equal object (arrays bit for bit)."""
    return json.dumps(_encode(_to_plain(obj)), allow_nan=False, **json_kwargs)


def from_json_text(cls: type[T], text: str) -> T:
    data = _decode(json.loads(text))
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
