"""Registering vsampler's dataclasses as pytrees: array-bearing fields are leaves, the rest is static."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import jax

T = TypeVar("T")


class StaticFields:
    """Aux data holding a dataclass's non-leaf fields; equal (and hashing alike) when their reprs agree,
    so that lists and dicts, which do not hash, can still be static."""

    __slots__ = ("_key", "values")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self._key = repr(sorted(values.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticFields) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


def register_dataclass_pytree(cls: type[T], data_fields: Sequence[str]) -> type[T]:
    """Registers `cls`: `data_fields` are children, every other field is static aux data.

    Unflattening bypasses `__init__` (and so validation): jax rebuilds pytrees with placeholder leaves.
    """
    data_fields = tuple(data_fields)
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    static_fields = tuple(n for n in names if n not in data_fields)

    def flatten(obj: Any) -> tuple[tuple[Any, ...], StaticFields]:
        return tuple(getattr(obj, n) for n in data_fields), StaticFields({n: getattr(obj, n) for n in static_fields})

    def flatten_with_keys(obj: Any) -> tuple[tuple[tuple[Any, Any], ...], StaticFields]:
        children, aux = flatten(obj)
        return tuple((jax.tree_util.GetAttrKey(n), c) for n, c in zip(data_fields, children, strict=True)), aux

    def unflatten(aux: StaticFields, children: Sequence[Any]) -> Any:
        obj = object.__new__(cls)
        for n, c in zip(data_fields, children, strict=True):
            object.__setattr__(obj, n, c)
        for n, v in aux.values.items():
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
