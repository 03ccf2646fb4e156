"""EasyDeL `vinference` configuration classes: `PartitionAxis`, `vInferenceConfig`,
`vInferencePreCompileConfig`. Same names, fields and defaults as EasyDeL; behaviour fixed where
EasyDeL's was a bug (see each docstring)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

from vsampler.core.params import SamplingParams
from vsampler.core.serialization import Serializable, serializable
from vsampler.engine.pytree import register_dataclass_pytree

AxisNames = str | tuple[str, ...] | None


@serializable
@dataclasses.dataclass(frozen=True)
class PartitionAxis(Serializable):
    """Logical names of the mesh axes each kind of dimension is sharded over (EasyDeL's defaults)."""

    data_parallel_axis: str = "dp"
    fully_sharded_data_parallel_axis: str = "fsdp"
    tensor_parallel_axis: str = "tp"
    sequence_parallel_axis: str = "sp"
    expert_parallel_axis: str = "ep"
    batch_axis: AxisNames = ("fsdp", "dp")
    sequence_axis: AxisNames = "sp"
    query_sequence_axis: AxisNames = "sp"
    head_axis: AxisNames = "tp"
    kv_head_axis: AxisNames = "tp"
    key_sequence_axis: AxisNames = "sp"
    hidden_state_axis: AxisNames = "tp"
    mlp_intermediate_axis: AxisNames = "tp"
    vocab_axis: AxisNames = "tp"
    expert_axis: AxisNames = "ep"
    attention_dim_axis: AxisNames = None
    bias_head_sequence_axis: AxisNames = None
    bias_key_sequence_axis: AxisNames = None
    generation_query_sequence_axis: AxisNames = None
    generation_head_axis: AxisNames = "tp"
    generation_key_sequence_axis: AxisNames = "sp"
    generation_attention_dim_axis: AxisNames = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # lists are accepted but stored as tuples: hashable, mesh-ready
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            ok = (
                value is None
                or isinstance(value, str)
                or (isinstance(value, tuple) and all(isinstance(v, str) for v in value))
            )
            if not ok:
                raise ValueError(
                    f"PartitionAxis.{f.name} must be a mesh axis name, a tuple of names or None, got {value!r}"
                )


register_dataclass_pytree(PartitionAxis, ())


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _is_token_id(value: Any) -> bool:
    """A token id: a Python or numpy integer (not a bool) >= 0."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer)) and value >= 0


def _check_partition_rules(rules: Any) -> None:
    """`partition_rules`: None, or a sequence of `(regex, PartitionSpec)` pairs (EasyDeL's form)."""
    if rules is None:
        return
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, (list, tuple)):
        raise ValueError(
            "vInferenceConfig.partition_rules must be a sequence of (regex, PartitionSpec) pairs, "
            f"got {type(rules).__name__} {rules!r}"
        )
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"vInferenceConfig.partition_rules[{i}] must be a (regex, PartitionSpec) pair, got {rule!r}"
            )
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"vInferenceConfig.partition_rules[{i}] has an invalid regex {rule[0]!r}: {e}") from e
        if not isinstance(rule[1], PartitionSpec) and rule[1] is not None:
            raise ValueError(
                f"vInferenceConfig.partition_rules[{i}] must pair its regex with a PartitionSpec, got {rule[1]!r}"
            )


@serializable
@dataclasses.dataclass
class vInferenceConfig(Serializable):
    """How the generation loop behaves: lengths, special tokens, sharding and sampling.

    `_loop_rows = ceil(max_new_tokens / streaming_chunks)` is computed here; the default
    `sampling_params` has `max_tokens = max_new_tokens`.
    """

    max_new_tokens: int = 64
    streaming_chunks: int = 16
    num_return_sequences: int | dict[int, int] | None = 1
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    partition_rules: tuple[tuple[str, Any], ...] | None = None
    partition_axis: PartitionAxis | None = None
    _loop_rows: int | None = None  # always recomputed from the two fields above
    sampling_params: SamplingParams | None = None

    def __post_init__(self) -> None:
        _positive_int("vInferenceConfig", "max_new_tokens", self.max_new_tokens)
        _positive_int("vInferenceConfig", "streaming_chunks", self.streaming_chunks)
        if isinstance(self.num_return_sequences, Mapping):
            for h, n in self.num_return_sequences.items():
                _positive_int("vInferenceConfig", f"num_return_sequences[{h}]", n)
        elif self.num_return_sequences is not None:
            _positive_int("vInferenceConfig", "num_return_sequences", self.num_return_sequences)
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_token_id(value):
                raise ValueError(f"vInferenceConfig.{name} must be a token id (integer >= 0) or None, got {value!r}")
            if value is not None:
                setattr(self, name, int(value))  # numpy integers too, stored as plain ints (JSON, static ids)
        eos = self.eos_token_id
        if isinstance(eos, np.ndarray):
            eos = eos.tolist()
        eos_list = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        if isinstance(eos, (list, tuple)) and not eos:
            raise ValueError("vInferenceConfig.eos_token_id is empty: pass None for no EOS id, or one id or more")
        if not all(_is_token_id(e) for e in eos_list):
            raise ValueError(f"vInferenceConfig.eos_token_id must be a token id or a list of ids, got {eos!r}")
        if eos is not None:
            self.eos_token_id = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else int(eos)
        _check_partition_rules(self.partition_rules)
        if self.partition_axis is not None and not isinstance(self.partition_axis, PartitionAxis):
            raise ValueError(f"vInferenceConfig.partition_axis must be a PartitionAxis, got {self.partition_axis!r}")
        self._loop_rows = math.ceil(self.max_new_tokens / self.streaming_chunks)
        if self.sampling_params is None:
            self.sampling_params = SamplingParams(max_tokens=self.max_new_tokens)
        elif not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(
                f"vInferenceConfig.sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}"
            )

    def get_partition_rules(
        self, runtime_config: vInferencePreCompileConfig | None = None
    ) -> tuple[tuple[str, Any], ...]:
        """`partition_rules` when given, else EasyDeL's default rules built from `partition_axis`.

        `runtime_config` is accepted for EasyDeL compatibility and unused by the default rules.
        """
        del runtime_config
        if self.partition_rules is not None:
            return self.partition_rules
        if self.partition_axis is None:
            raise ValueError(
                "vInferenceConfig.get_partition_rules needs partition_axis (a PartitionAxis) when "
                "partition_rules is None: the default rules are built from its axis names"
            )
        axis = self.partition_axis
        idps = PartitionSpec(axis.batch_axis, axis.sequence_axis)
        kvps = PartitionSpec(axis.batch_axis, axis.key_sequence_axis, axis.head_axis, axis.attention_dim_axis)
        views = "model_kwargs/past_key_values/views/[0-9]+/(key|value)"
        serving = "(allowed_tokens|token_logprobs|top_logprob_ids|top_logprobs|token_ranks|stop_token_ids)"
        return (
            ("(sequences|running_token)", idps),
            ("model_kwargs/(attention_mask|position_ids)", idps),
            (f"{views}/(scale|weight)", kvps),  # 8-bit cache
            (f"{views}/(packed|absmax)", kvps),  # NF4 cache
            (views, kvps),
            (serving, PartitionSpec(axis.batch_axis)),
            (".*", PartitionSpec()),
        )


register_dataclass_pytree(vInferenceConfig, ("sampling_params",))


_PRECOMPILE_FIELDS = (
    "batch_size",
    "prefill_length",
    "vision_included",
    "vision_batch_size",
    "vision_channels",
    "vision_height",
    "vision_width",
    "required_props",
)


_SIZE_FIELDS = _PRECOMPILE_FIELDS[:2] + _PRECOMPILE_FIELDS[3:7]


@serializable
@dataclasses.dataclass
class vInferencePreCompileConfig(Serializable):
    """Input shapes to compile the loop for. A list field lists several scenarios (`get_standalones`)."""

    batch_size: int | list[int] = 1
    prefill_length: int | list[int] | None = None
    vision_included: bool | list[bool] = False
    vision_batch_size: int | list[int] | None = None
    vision_channels: int | list[int] | None = None
    vision_height: int | list[int] | None = None
    vision_width: int | list[int] | None = None
    required_props: Mapping[str, dict[str, Any]] | list[Mapping[str, dict[str, Any]]] | None = None

    def __post_init__(self) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is None and name != "batch_size":
                    continue
                _positive_int("vInferencePreCompileConfig", name, v)
            if isinstance(value, (list, tuple)) and len(value) == 0:
                raise ValueError(f"vInferencePreCompileConfig.{name} must not be an empty list")

    def extract(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return {name: getattr(self, name) for name in _PRECOMPILE_FIELDS}

    def get_default_hash(self) -> int:
        """An md5-based integer of the fields' text: the same in every process (unlike `hash`)."""
        text = "|".join(f"{name}={getattr(self, name)!r}" for name in _PRECOMPILE_FIELDS)
        return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest(), "big")

    def __hash__(self) -> int:
        return self.get_default_hash()

    def get_standalones(self) -> list[vInferencePreCompileConfig]:
        """One config per scenario: list fields expand to the longest list, shorter lists repeat their
        last element; a config without list fields is its own only standalone."""
        lists = {n: v for n, v in self.extract().items() if isinstance(v, (list, tuple))}
        if not lists:
            return [self]
        count = max(len(v) for v in lists.values())
        return [
            vInferencePreCompileConfig(
                **{n: (lists[n][min(i, len(lists[n]) - 1)] if n in lists else v) for n, v in self.extract().items()}
            )
            for i in range(count)
        ]

    @classmethod
    def create_optimized_compo(
        cls,
        batch_size: int | list[int] = 1,
        max_prefill_length: int = 2048,
        min_prefill_length: int = 64,
        vision_included: bool | list[bool] = False,
        vision_batch_size: int | list[int] | None = None,
        vision_channels: int | list[int] | None = None,
        vision_height: int | list[int] | None = None,
        vision_width: int | list[int] | None = None,
        required_props: Mapping[str, dict[str, Any]] | list[Mapping[str, dict[str, Any]]] | None = None,
    ) -> vInferencePreCompileConfig:
        """A config whose prefill lengths double from `min_prefill_length` while <= `max_prefill_length`."""
        _positive_int("vInferencePreCompileConfig.create_optimized_compo", "min_prefill_length", min_prefill_length)
        _positive_int("vInferencePreCompileConfig.create_optimized_compo", "max_prefill_length", max_prefill_length)
        if min_prefill_length > max_prefill_length:
            raise ValueError(
                f"min_prefill_length ({min_prefill_length}) must be <= max_prefill_length ({max_prefill_length})"
            )
        lengths = []
        length = min_prefill_length
        while length <= max_prefill_length:
            lengths.append(length)
            length *= 2
        return cls(
            batch_size=batch_size,
            prefill_length=lengths,
            vision_included=vision_included,
            vision_batch_size=vision_batch_size,
            vision_channels=vision_channels,
            vision_height=vision_height,
            vision_width=vision_width,
            required_props=required_props,
        )


register_dataclass_pytree(vInferencePreCompileConfig, ())
