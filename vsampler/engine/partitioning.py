"""Partition rules to shardings: match `(regex, PartitionSpec)` rules to a pytree's leaves on a mesh.

A leaf's name is its pytree path joined with "/" (`model_kwargs/past_key_values/views/0/key/weight`:
attribute names, dict keys and sequence indices). The first rule whose regex `re.search`es the name
wins (EasyDeL's convention, so its rule sets work unchanged); its spec is trimmed to the leaf's rank
(a scalar is replicated). Every axis a spec names must exist in the mesh and the product of the mesh
axes sharding a dimension must divide it: otherwise a `ValueError` names the leaf, the dimension and the
axes. `create_mesh` builds a mesh with all of EasyDeL's axis names (size 1 where unused), so the
default rules of `vInferenceConfig.get_partition_rules` apply to any layout. `place_global` turns host
values into global arrays of given shardings (each process cutting its own shards), the way inputs enter
a program that spans several hosts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, PartitionSpec]]
MESH_AXES: tuple[str, ...] = ("dp", "fsdp", "ep", "tp", "sp")


def create_mesh(
    *, dp: int = 1, fsdp: int = 1, ep: int = 1, tp: int = 1, sp: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A mesh over `dp * fsdp * ep * tp * sp` devices (default: the first that many) with EasyDeL's axes."""
    sizes = {"dp": dp, "fsdp": fsdp, "ep": ep, "tp": tp, "sp": sp}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"create_mesh: {name} must be a positive integer, got {size!r}")
    count = math.prod(sizes.values())
    devices = list(jax.devices() if devices is None else devices)
    if count > len(devices):
        raise ValueError(f"create_mesh: {sizes} needs {count} devices, only {len(devices)} are available")
    return Mesh(np.array(devices[:count]).reshape(tuple(sizes.values())), MESH_AXES)


def leaf_name(path: Sequence[Any]) -> str:
    """A pytree key path as the "/"-joined name rules match against."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def rule_index(rules: Rules, name: str) -> int:
    """The index of the first rule whose regex matches `name`; a ValueError if none does."""
    for i, (pattern, _) in enumerate(rules):
        if re.search(pattern, name):
            return i
    raise ValueError(f"no partition rule matches the leaf {name!r}; add a catch-all ('.*', PartitionSpec())")


def _trimmed(spec: PartitionSpec, rank: int) -> PartitionSpec:
    return PartitionSpec(*tuple(spec)[:rank])


def _leaf_spec(rules: Rules, name: str, shape: Sequence[int]) -> PartitionSpec:
    """The first matching rule's spec, trimmed to the leaf's rank."""
    return _trimmed(rules[rule_index(rules, name)][1], len(shape))


def match_partition_rules(rules: Rules, tree: Any) -> Any:
    """The tree of `PartitionSpec`s the rules give `tree`'s leaves (first match wins, trimmed to rank)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _leaf_spec(rules, leaf_name(path), np.shape(leaf)), tree)


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_spec(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raises a ValueError naming the leaf where `spec` uses an axis the mesh lacks or does not divide."""
    for dim, entry in enumerate(tuple(spec)):
        axes = _axes(entry)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"leaf {name!r}: mesh axes {missing} of {spec} are not in the mesh {dict(mesh.shape)}")
        parts = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % parts:
            raise ValueError(
                f"leaf {name!r}: dimension {dim} of shape {tuple(shape)} ({shape[dim]}) is not divisible by "
                f"the {parts} shards of mesh axes {axes} ({spec})"
            )


def named_shardings(rules: Rules, tree: Any, mesh: Mesh) -> Any:
    """The tree of `NamedSharding`s for `tree` on `mesh`, with the checks of `check_spec`."""

    def sharding(path: Sequence[Any], leaf: Any) -> NamedSharding:
        name = leaf_name(path)
        shape = np.shape(leaf)
        spec = _leaf_spec(rules, name, shape)
        check_spec(name, shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, tree)


def place_global(tree: Any, shardings: Any, fallback: jax.sharding.Sharding | None = None) -> Any:
    """`tree` with every leaf as a global array of its sharding: arrays already placed stay as they are,
    host values (the same on every process) are cut into this process's shards. A None sharding (an input
    the compiled program does not read) takes `fallback`."""

    def place(value: Any, sharding: Any) -> Any:
        sharding = sharding or fallback
        if isinstance(value, jax.Array):
            if value.sharding.is_equivalent_to(sharding, value.ndim):
                return value
            return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda v: place(v, shardings), tree)
    return jax.tree.map(place, tree, shardings)


def replicated_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value from this process's own copy (works across hosts too)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
