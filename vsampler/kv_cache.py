"""The attention (KV) cache the generation loop carries in `SampleState.model_kwargs["past_key_values"]`.

Layout: `KVCache.views[i]` is layer i's `KVCacheView` with `key` and `value`, each
`(batch, cache_length, num_kv_heads, head_dim)`, so the pytree paths are
`model_kwargs/past_key_values/views/<i>/(key|value)`, the paths `vInferenceConfig.get_partition_rules`
names (`PartitionSpec(batch, key_sequence, head, attention_dim)`).

Slot `j` of a row holds the key and value of the token at `sequences[:, j]`: prompts are left-padded to
the prefill bucket, so every row writes its `t`-th decode token at the same slot and one
`dynamic_update_slice` serves the batch. Which slots are real is `model_kwargs["attention_mask"]`'s job.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vsampler.pytree import register_dataclass_pytree


@dataclasses.dataclass(eq=False)
class KVCacheView:
    """One layer's cache: `key` and `value`, `(batch, cache_length, num_kv_heads, head_dim)`."""

    key: jax.Array
    value: jax.Array

    def write(self, start: jax.Array, key: jax.Array, value: jax.Array) -> KVCacheView:
        """The view with `key` / `value` `(batch, S, heads, dim)` written at slots `[start, start + S)`."""
        index = (0, start, 0, 0)
        return KVCacheView(
            key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), index),
            value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), index),
        )

    def read(self) -> tuple[jax.Array, jax.Array]:
        """`(key, value)` as the attention reads them."""
        return self.key, self.value


@dataclasses.dataclass(eq=False)
class KVCache:
    """The whole cache: one `KVCacheView` per decoder layer."""

    views: list[KVCacheView]

    @classmethod
    def init(
        cls, *, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        """An all-zero cache of `length` slots per row."""
        shape = (batch, length, num_kv_heads, head_dim)
        return cls(views=[KVCacheView(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return int(self.views[0].key.shape[1])

    def nbytes(self) -> int:
        """Bytes the cache holds (every leaf, scales included)."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))


register_dataclass_pytree(KVCacheView, ("key", "value"))
register_dataclass_pytree(KVCache, ("views",))
