"""A small Llama-style decoder in Flax NNX: what the tests and the CLI's generation demo drive.

`TinyDecoder(config, rngs=nnx.Rngs(seed))`: token embedding, `num_layers` blocks of (RMSNorm,
grouped-query attention with rotary positions and the `vsampler.engine.kv_cache` cache, RMSNorm, SwiGLU MLP),
a final RMSNorm and an untied lm head. Random init from the seed; the default size runs a decode step
in about a millisecond on a CPU core.

It follows the model contract of `vsampler.engine.step` (see there):

    model(input_ids, attention_mask=..., position_ids=..., past_key_values=..., cache_index=...)
        -> DecoderOutput(logits, past_key_values)

Without `past_key_values` it is a plain causal model over `input_ids` (used to check cached decoding
against full recomputation).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from vsampler.engine.config import PartitionAxis
from vsampler.engine.kv_cache import CACHE_MODES, KVCache, check_nf4_dim

# Scores of masked slots: finite, so a query with no visible slot (a left-pad position) averages
# harmlessly instead of producing NaN.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class TinyDecoderConfig:
    """Sizes of the tiny decoder. `num_heads` must be a multiple of `num_kv_heads` (grouped-query)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    cache_dtype: str = "float32"  # the "fp" cache's storage type
    cache_mode: str = "fp"  # "fp", "int8" or "nf4": see vsampler.engine.kv_cache

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyDecoderConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyDecoderConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"TinyDecoderConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"TinyDecoderConfig.cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")
        if self.cache_mode == "nf4":
            check_nf4_dim(self.head_dim)


class DecoderOutput(NamedTuple):
    """`logits`: (B, S, V) float32; `past_key_values`: the updated cache (None without one)."""

    logits: jax.Array
    past_key_values: KVCache | None


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x` (B, S, H, D) at integer `positions` (B, S), half-split pairs."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float) -> None:
        self.scale = nnx.Param(jnp.ones((size,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale[...]


class Attention(nnx.Module):
    def __init__(self, config: TinyDecoderConfig, rngs: nnx.Rngs) -> None:
        c = config
        self.config = c
        self.q = nnx.Linear(c.hidden_size, c.num_heads * c.head_dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=False, rngs=rngs)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries (B, S, H, D) and keys / values (B, S, Hkv, D) of `x` (B, S, hidden), rotary applied."""
        c = self.config
        b, s, _ = x.shape
        q = rotary(self.q(x).reshape(b, s, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = rotary(self.k(x).reshape(b, s, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = self.v(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
        """Grouped-query attention of `q` over `k` / `v` (B, T, Hkv, D); `visible` (B, S, T) bool."""
        c = self.config
        b, s = q.shape[:2]
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(b, s, c.num_kv_heads, group, c.head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(jnp.float32)) * (c.head_dim**-0.5)
        scores = jnp.where(visible[:, None, None, :, :], scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgst,btkd->bskgd", weights, v.astype(jnp.float32))
        return self.o(out.reshape(b, s, c.num_heads * c.head_dim))


class MLP(nnx.Module):
    def __init__(self, config: TinyDecoderConfig, rngs: nnx.Rngs) -> None:
        c = config
        self.gate = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(c.intermediate_size, c.hidden_size, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, config: TinyDecoderConfig, rngs: nnx.Rngs) -> None:
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)


class TinyDecoder(nnx.Module):
    """The tiny Llama-style decoder; see the module docstring for the call contract."""

    def __init__(self, config: TinyDecoderConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def partition_rules(self, axis: PartitionAxis | None = None) -> tuple[tuple[str, PartitionSpec], ...]:
        """How to shard the parameters (`vsampler.engine.partitioning` rules over `nnx.split` paths): Megatron-style
        tensor parallelism (heads, MLP width and vocabulary over `tensor_parallel_axis`) with the hidden
        dimension over `fully_sharded_data_parallel_axis`; norms replicated."""
        axis = axis or PartitionAxis()
        fsdp, tp = axis.fully_sharded_data_parallel_axis, axis.tensor_parallel_axis
        return (
            ("embed/embedding", PartitionSpec(tp, fsdp)),
            ("attn/(q|k|v)/kernel", PartitionSpec(fsdp, tp)),
            ("attn/o/kernel", PartitionSpec(tp, fsdp)),
            ("mlp/(gate|up)/kernel", PartitionSpec(fsdp, tp)),
            ("mlp/down/kernel", PartitionSpec(tp, fsdp)),
            ("lm_head/kernel", PartitionSpec(fsdp, tp)),
            (".*", PartitionSpec()),
        )

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of `length` slots per row for this model."""
        c = self.config
        return KVCache.init(
            num_layers=c.num_layers,
            batch=batch,
            length=length,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=jnp.dtype(c.cache_dtype),
            mode=c.cache_mode,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        past_key_values: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> DecoderOutput:
        """Logits for every position of `input_ids` (B, S).

        Without a cache: causal attention over `input_ids`; `attention_mask` (B, S) marks real tokens
        (default all), `position_ids` default to each real token's index among the row's real tokens.
        With a cache: the S new tokens take slots `[cache_index, cache_index + S)`; `attention_mask`
        (B, T) marks the real slots of the whole cache (the new ones included) and `position_ids` (B, S)
        are required. Query slot `i` sees real slots `<= i`.
        """
        b, s = input_ids.shape
        if past_key_values is None:
            mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
            if position_ids is None:
                position_ids = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            query_slots = jnp.arange(s)
        else:
            if attention_mask is None or position_ids is None:
                raise ValueError("TinyDecoder with past_key_values needs attention_mask (B, T) and position_ids (B, S)")
            mask = attention_mask.astype(bool)
            query_slots = cache_index + jnp.arange(s)
        key_slots = jnp.arange(mask.shape[1])
        visible = mask[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])

        x = self.embed(input_ids).astype(jnp.float32)
        new_views = []
        for i, block in enumerate(self.blocks):
            h = block.attn_norm(x)
            q, k, v = block.attn.project(h, position_ids)
            if past_key_values is not None:
                view = past_key_values.views[i].write(cache_index, k, v)
                new_views.append(view)
                k, v = view.read()
            x = x + block.attn.attend(q, k, v, visible)
            x = x + block.mlp(block.mlp_norm(x))
        logits = self.lm_head(self.norm(x)).astype(jnp.float32)
        cache = None if past_key_values is None else KVCache(views=new_views)
        return DecoderOutput(logits=logits, past_key_values=cache)
