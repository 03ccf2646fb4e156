"""The attention (KV) cache the generation loop carries in `SampleState.model_kwargs["past_key_values"]`.

Layout: `KVCache.views[i]` is layer i's `KVCacheView` with `key` and `value`, so the pytree paths are
`model_kwargs/past_key_values/views/<i>/(key|value)`, the paths `vInferenceConfig.get_partition_rules`
names. Every leaf is 4-D, `(batch, cache_length, num_kv_heads, last)`, so one spec,
`PartitionSpec(batch, key_sequence, head, attention_dim)`, shards all of them. Three modes:

* `"fp"`: `key` / `value` are arrays `(B, T, H, D)` of the cache dtype.
* `"int8"`: each is an `Int8Tensor`: `weight` int8 `(B, T, H, D)` and `scale` bfloat16 `(B, T, H, 1)`
  = absmax / 127 of that token's head vector; value = weight * scale. Paths `.../(key|value)/(weight|scale)`.
* `"nf4"`: each is an `NF4Tensor` (QLoRA NormalFloat-4): `packed` uint8 `(B, T, H, D // 2)` holding two
  4-bit codes per byte, element `2j` in the low nibble and `2j + 1` in the high nibble; `absmax`
  bfloat16 `(B, T, H, D // block)`, the absolute maximum of each block of `block` (default 64)
  consecutive values along D; value = NF4_CODES[code] * absmax. `D` must be a multiple of the block.
  Paths `.../(key|value)/(packed|absmax)`.

Quantization happens when a token is written; reads dequantize inside attention, so no full-precision
copy of the cache is ever stored. Scales are bfloat16 (rounded up, so no value exceeds its code range).

Slot `j` of a row holds the key and value of the token at `sequences[:, j]`: prompts are left-padded to
the prefill bucket, so every row writes its `t`-th decode token at the same slot and one
`dynamic_update_slice` serves the batch. Which slots are real is `model_kwargs["attention_mask"]`'s job.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.engine.pytree import register_dataclass_pytree

CacheMode = Literal["fp", "int8", "nf4"]
CACHE_MODES: tuple[str, ...] = ("fp", "int8", "nf4")
NF4_BLOCK = 64

# The QLoRA NormalFloat-4 code table (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_SCALE_DTYPE = jnp.bfloat16


def _scale_up(absmax: jax.Array) -> jax.Array:
    """`absmax` as a bfloat16 scale rounded toward +inf (so |x| / scale <= 1), and never 0."""
    s = absmax.astype(_SCALE_DTYPE)
    s = jnp.where(s.astype(jnp.float32) < absmax, jnp.nextafter(s, jnp.array(jnp.inf, _SCALE_DTYPE)), s)
    return jnp.where(s > 0, s, jnp.ones_like(s))


@dataclasses.dataclass(eq=False)
class Int8Tensor:
    """Symmetric per-vector int8: `weight` int8 (..., D), `scale` bfloat16 (..., 1); value = weight * scale."""

    weight: jax.Array
    scale: jax.Array

    @classmethod
    def quantize(cls, x: jax.Array) -> Int8Tensor:
        x = x.astype(jnp.float32)
        scale = _scale_up(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0)
        weight = jnp.clip(jnp.round(x / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
        return cls(weight=weight, scale=scale)

    def dequantize(self) -> jax.Array:
        return self.weight.astype(jnp.float32) * self.scale.astype(jnp.float32)


@dataclasses.dataclass(eq=False)
class NF4Tensor:
    """NormalFloat-4 per block: `packed` uint8 (..., D // 2), `absmax` bfloat16 (..., D // block)."""

    packed: jax.Array
    absmax: jax.Array

    @classmethod
    def quantize(cls, x: jax.Array, block: int = NF4_BLOCK) -> NF4Tensor:
        *lead, d = x.shape
        check_nf4_dim(d, block)
        blocks = x.astype(jnp.float32).reshape(*lead, d // block, block)
        absmax = _scale_up(jnp.max(jnp.abs(blocks), axis=-1))
        y = blocks / absmax.astype(jnp.float32)[..., None]
        codes = jnp.argmin(jnp.abs(y[..., None] - jnp.asarray(NF4_CODES)), axis=-1).astype(jnp.uint8)
        codes = codes.reshape(*lead, d // 2, 2)
        packed = codes[..., 0] | (codes[..., 1] << 4)
        return cls(packed=packed, absmax=absmax)

    def dequantize(self) -> jax.Array:
        *lead, half = self.packed.shape
        codes = jnp.stack([self.packed & 0xF, self.packed >> 4], axis=-1).reshape(*lead, 2 * half)
        values = jnp.asarray(NF4_CODES)[codes.astype(jnp.int32)]
        blocks = values.reshape(*lead, self.absmax.shape[-1], -1)
        return (blocks * self.absmax.astype(jnp.float32)[..., None]).reshape(*lead, 2 * half)


def check_nf4_dim(head_dim: int, block: int = NF4_BLOCK) -> None:
    if head_dim % block:
        raise ValueError(
            f"the NF4 cache quantizes blocks of {block} values along the head dimension: head_dim "
            f"({head_dim}) must be a multiple of {block}"
        )


CacheLeaf = jax.Array | Int8Tensor | NF4Tensor


def _quantize(x: jax.Array, like: CacheLeaf) -> CacheLeaf:
    if isinstance(like, Int8Tensor):
        return Int8Tensor.quantize(x)
    if isinstance(like, NF4Tensor):
        return NF4Tensor.quantize(x, block=x.shape[-1] // like.absmax.shape[-1])
    return x.astype(like.dtype)


def _dequantize(x: CacheLeaf) -> jax.Array:
    return x if isinstance(x, jax.Array) else x.dequantize()


def _write(cache: CacheLeaf, new: CacheLeaf, start: jax.Array) -> CacheLeaf:
    zero = jnp.int32(0)  # every index int32, also under jax_enable_x64 (Python ints would be int64)
    index = (zero, jnp.asarray(start, jnp.int32), zero, zero)
    return jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice(c, n, index), cache, new)


@dataclasses.dataclass(eq=False)
class KVCacheView:
    """One layer's cache: `key` and `value`, `(batch, cache_length, num_kv_heads, head_dim)` each, stored
    as an array (fp), an `Int8Tensor` or an `NF4Tensor`."""

    key: CacheLeaf
    value: CacheLeaf

    def write(self, start: jax.Array, key: jax.Array, value: jax.Array) -> KVCacheView:
        """The view with `key` / `value` `(batch, S, heads, dim)` quantized and written at `[start, start + S)`."""
        return KVCacheView(
            key=_write(self.key, _quantize(key, self.key), start),
            value=_write(self.value, _quantize(value, self.value), start),
        )

    def read(self) -> tuple[jax.Array, jax.Array]:
        """`(key, value)` dequantized for attention (float32, or the fp cache's dtype)."""
        return _dequantize(self.key), _dequantize(self.value)


@dataclasses.dataclass(eq=False)
class KVCache:
    """The whole cache: one `KVCacheView` per decoder layer."""

    views: list[KVCacheView]

    @classmethod
    def init(
        cls,
        *,
        num_layers: int,
        batch: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype = jnp.float32,
        mode: CacheMode = "fp",
        nf4_block: int = NF4_BLOCK,
    ) -> KVCache:
        """An all-zero cache of `length` slots per row; `dtype` is the fp mode's storage type."""
        shape = (batch, length, num_kv_heads, head_dim)

        def leaf() -> CacheLeaf:
            if mode == "fp":
                return jnp.zeros(shape, dtype)
            if mode == "int8":
                return Int8Tensor(jnp.zeros(shape, jnp.int8), jnp.ones((*shape[:-1], 1), _SCALE_DTYPE))
            if mode == "nf4":
                check_nf4_dim(head_dim, nf4_block)
                return NF4Tensor(
                    jnp.full((*shape[:-1], head_dim // 2), 0x77, jnp.uint8),  # code 7 is 0.0
                    jnp.ones((*shape[:-1], head_dim // nf4_block), _SCALE_DTYPE),
                )
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")

        return cls(views=[KVCacheView(leaf(), leaf()) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return int(jax.tree.leaves(self)[0].shape[1])

    def nbytes(self) -> int:
        """Bytes the cache holds (every leaf, scales included)."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))


register_dataclass_pytree(Int8Tensor, ("weight", "scale"))
register_dataclass_pytree(NF4Tensor, ("packed", "absmax"))
register_dataclass_pytree(KVCacheView, ("key", "value"))
register_dataclass_pytree(KVCache, ("views",))
