"""`SampleState`: everything the generation loop carries from one step (or chunk) to the next."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from vsampler.core.serialization import Serializable, serializable
from vsampler.engine.config import vInferencePreCompileConfig
from vsampler.engine.pytree import register_dataclass_pytree


@serializable
@dataclasses.dataclass(eq=False)
class SampleState(Serializable):
    """The state of generation between steps (EasyDeL's fields and defaults). How the loop fills it:
    `vsampler.engine.step`'s module docstring.

    Attributes:
      current_length: (B,) int32, the slot of `sequences` each row's next token goes to.
      sequences: (B, max_sequence_length) int32 token ids, prompt then generated.
      running_token: (B, 1) int32, the last token of each row: the model's next input.
      is_sequence_finished: (B,) bool, rows that sampled an EOS id or reached their max_tokens.
      prng_key: (B,) PRNG keys, one per row; a row's k-th generated token draws from `fold_in(key, k)`.
      model_kwargs: the model's extra inputs and state (attention cache, positions, mask).
      tokens_per_second: generation speed measured over the decode calls so far (-inf before any).
      generated_tokens: real tokens generated so far, over all rows.
      padded_length: the prefill length bucket the prompts were padded to (static).
      _time_spent_computing: seconds spent in decode calls so far.
      _compile_config: the precompiled standalone this state's shapes belong to (static).

    vsampler's serving fields (None unless the loop was asked for them):
      allowed_tokens: (B, ceil(V / 32)) int32 packed bitmask applied at every step (`vsampler.sample`'s
        `allowed_tokens`); the loop may be handed a new one between chunks.
      token_logprobs: (B, max_sequence_length) float32, the log-probability of the token at each slot of
        `sequences` (0 on prompt and unwritten slots), in the loop's `logprobs_mode`.
      top_logprob_ids: (B, max_sequence_length, n) int32, the n most likely tokens at each generated
        slot (pad elsewhere); top_logprobs: (B, max_sequence_length, n) float32, theirs (-inf elsewhere).
      token_ranks: (B, max_sequence_length) int32, each generated token's rank in that distribution
        (vLLM's `selected_token_ranks`, `vsampler.core.logprobs`; 1 = most likely), 0 on prompt and unwritten slots.
      stop_token_ids: (B, S) int32, each row's own stop ids (-1 = padding): the config's EOS ids and the
        request's `stop_token_ids`; when set, the step finishes each row and masks `min_tokens` on these.
    """

    current_length: jax.Array
    sequences: jax.Array
    running_token: jax.Array
    is_sequence_finished: jax.Array
    prng_key: jax.Array
    model_kwargs: dict[str, Any]
    tokens_per_second: float | jax.Array = float("-inf")
    generated_tokens: int | jax.Array = 0
    padded_length: int = 0
    _time_spent_computing: float | jax.Array = 0.0
    _compile_config: vInferencePreCompileConfig | None = None
    allowed_tokens: jax.Array | None = None
    token_logprobs: jax.Array | None = None
    top_logprob_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    token_ranks: jax.Array | None = None
    stop_token_ids: jax.Array | None = None

    def __post_init__(self) -> None:
        """The array fields must be arrays (jax or numpy, or abstract shapes): a string or a list there
        would fail far from where it was passed."""
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_ARRAYS:
                continue
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise ValueError(f"SampleState.{name} must be an array, got {type(value).__name__} {value!r:.80}")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, Mapping):
            kind = type(self.model_kwargs).__name__
            raise ValueError(f"SampleState.model_kwargs must be a dict (or None), got {kind}")


_OPTIONAL_ARRAYS = (
    "allowed_tokens",
    "token_logprobs",
    "top_logprob_ids",
    "top_logprobs",
    "token_ranks",
    "stop_token_ids",
)
_ARRAY_FIELDS = ("current_length", "sequences", "running_token", "is_sequence_finished", "prng_key", *_OPTIONAL_ARRAYS)


register_dataclass_pytree(
    SampleState,
    (
        "current_length",
        "sequences",
        "running_token",
        "is_sequence_finished",
        "prng_key",
        "model_kwargs",
        "tokens_per_second",
        "generated_tokens",
        "_time_spent_computing",
        *_OPTIONAL_ARRAYS,
    ),
)
