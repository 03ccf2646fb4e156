"""One decode step: `create_sampling_step`, and the model contract the step relies on.

The model contract (the one place it is written down)
-----------------------------------------------------
A model is a Flax NNX module; the step rebuilds it with `nnx.merge(graphdef, graphstate, graphother)`
and calls

    out = model(input_ids, attention_mask=..., position_ids=..., past_key_values=..., cache_index=...)

* `input_ids` (B, S) int32: the tokens to feed: the left-padded prompts at prefill (S = the prefill
  bucket P), `state.running_token` (B, 1) at each decode step.
* `attention_mask` (B, T) int32, T = P + max_new_tokens: 1 on the slots of real tokens, the new ones
  included; 0 on left padding and on slots not generated yet.
* `position_ids` (B, S) int32: each new token's index among its row's real tokens (0 for padding).
* `past_key_values`: the cache, laid out as `vsampler.engine.kv_cache.KVCache`: `views[i].key` / `.value` per
  layer (quantized layouts keep the same paths). The S new keys / values go to slots
  `[cache_index, cache_index + S)`; query slot `i` attends the real slots `<= i`.
* `cache_index` int32 scalar: the first slot the new tokens take (0 at prefill, P + t at decode step t).

It returns an object with `.logits` (B, S, V) and `.past_key_values` (the updated cache). A model that
exposes `vocab_size` lets the loop check token ids before compiling. `vsampler.testing.tiny_decoder.TinyDecoder` is
the reference implementation of this contract.

`SampleState` in the loop
-------------------------
* `sequences` (B, T): prompt left-padded into `[0, P)` (`padded_length` = P), generated tokens from
  slot P on, `pad_token_id` everywhere else.
* `current_length` (B,): the slot the row's next token goes to (P + tokens the row has generated).
* `running_token` (B, 1): the last sampled token (pad for finished rows).
* `is_sequence_finished` (B,): sampled an EOS id, or generated `min(max_tokens, max_new_tokens)` tokens.
* `prng_key` (B,): one key per row (the loop derives it from the request's key and the copy index); the
  token with generation index k is drawn from `fold_in(prng_key[row], k)`, so tokens never depend on how
  the decode is split into chunks.
* `model_kwargs`: `attention_mask`, `position_ids` (B, 1) of the next input, `past_key_values`,
  `cache_index`.
* `generated_tokens`: real (non-pad) tokens generated so far, all rows together.
* `allowed_tokens` (B, ceil(V / 32)) or None: the packed mask every step applies (structured output).
* `token_logprobs` (B, T), `top_logprob_ids` / `top_logprobs` (B, T, n), `token_ranks` (B, T), when the
  step was created with `logprobs=n`: written at the same slot as the token.
* `stop_token_ids` (B, S) or None: each row's own stop ids (-1 = padding); when set, they replace the
  step's `eos_token_id` for every row (finishing, the `min_tokens` mask, a mask-emptied row's token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vsampler.core.params import SamplingParams, as_used
from vsampler.core.sampling import Impl, sample_step
from vsampler.engine.state import SampleState

SamplingStep = Callable[[Any, Any, Any, SampleState], SampleState]
# `vsampler.sample_step`'s signature: (logits, params, keys, *, finished, pad_token_id, history, prompt_len,
# eos_token_id) -> (tokens, finished). A callable `impl` replaces the sampler (baselines, experiments).
StepSampler = Callable[..., tuple[jax.Array, jax.Array]]


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    arr = np.asarray(value)
    if arr.size == 0 or arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError(f"{name} must be a token id (integer >= 0) or a sequence of them, got {value!r}")
    return tuple(int(i) for i in arr.reshape(-1))


def create_sampling_step(
    sampling_params: SamplingParams,
    eos_token_id: Any,
    pad_token_id: Any,
    *,
    impl: Impl | StepSampler = "auto",
    logprobs: int | None = None,
    logprobs_mode: str = "raw",
) -> SamplingStep:
    """Returns `sampling_step(graphdef, graphstate, graphother, state) -> SampleState`: one step.

    The step runs the model on `state.running_token` (or on the prompts, when `running_token` is the
    (B, P) prefill block) with `state.model_kwargs`, samples the next token of every row with
    `vsampler.sample_step` (penalties over the row's real tokens only: prompt and generated, never
    padding or future slots; `min_tokens` counted from the row's generated tokens), writes it at the
    row's `current_length`, and updates the state as the module docstring describes. Finished rows emit
    `pad_token_id` and never change again; a row finishes on any of `eos_token_id` or when it has
    generated `min(max_tokens, T - P)` tokens. `sampling_params` may hold traced values (the loop passes
    them as arguments so new values never recompile). `impl` names the sampler implementation, or is a
    callable with `vsampler.sample_step`'s signature that replaces it (the benchmarks' argmax baseline).
    A state carrying `allowed_tokens` has that mask applied at every step. `logprobs=n` (and
    `logprobs_mode`) also writes each token's log-probabilities into the state's `token_logprobs`,
    `top_logprob_ids` and `top_logprobs`, which must then be allocated (B, T) / (B, T, n). A state
    carrying `stop_token_ids` (B, S) (per-request stop ids, -1 = padding) has each row finish on, and
    `min_tokens` mask, its own ids instead of `eos_token_id` (which should then be among them).
    """
    eos = _token_ids("eos_token_id", eos_token_id) if eos_token_id is not None else None
    if isinstance(pad_token_id, jax.core.Tracer) or np.ndim(pad_token_id) != 0:
        raise ValueError(f"pad_token_id must be one concrete token id (an integer >= 0), got {pad_token_id!r}")
    (pad,) = _token_ids("pad_token_id", pad_token_id)
    if not isinstance(sampling_params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")

    def sampling_step(graphdef: Any, graphstate: Any, graphother: Any, state: SampleState) -> SampleState:
        model = nnx.merge(graphdef, graphstate, graphother)
        kwargs = state.model_kwargs
        inputs = state.running_token
        width = inputs.shape[1]
        out = model(
            inputs,
            attention_mask=kwargs["attention_mask"],
            position_ids=kwargs["position_ids"],
            past_key_values=kwargs["past_key_values"],
            cache_index=kwargs["cache_index"],
        )
        logits = out.logits[:, -1, :]
        prompt_end = state.padded_length
        total = state.sequences.shape[1]
        generation_index = kwargs["cache_index"] + width - prompt_end  # same for every running row
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.prng_key, generation_index)
        history = jnp.where(kwargs["attention_mask"] > 0, state.sequences, -1)
        was_finished = state.is_sequence_finished
        sampler = impl if callable(impl) else functools.partial(sample_step, impl=impl)
        serving: dict[str, Any] = {}
        if state.allowed_tokens is not None:
            serving["allowed_tokens"] = state.allowed_tokens
        if logprobs is not None:
            serving.update(logprobs=logprobs, logprobs_mode=logprobs_mode)
        tokens, finished, *values = sampler(
            logits,
            sampling_params,
            keys,
            finished=was_finished,
            pad_token_id=pad,
            history=history,
            prompt_len=prompt_end,
            eos_token_id=eos if state.stop_token_ids is None else state.stop_token_ids,
            **serving,
        )
        running = ~was_finished
        generated = state.current_length - prompt_end + running.astype(jnp.int32)
        limit = jnp.minimum(jnp.asarray(as_used("max_tokens", sampling_params.max_tokens)), total - prompt_end)
        finished = finished | (running & (generated >= limit))
        rows = jnp.arange(tokens.shape[0])
        slot = jnp.where(running, state.current_length, total)  # out of range: dropped, never a clamp
        new_kwargs = dict(kwargs)
        new_kwargs["past_key_values"] = out.past_key_values
        new_kwargs["attention_mask"] = kwargs["attention_mask"].at[rows, slot].set(1, mode="drop")
        new_kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
        new_kwargs["cache_index"] = kwargs["cache_index"] + width
        written = {}
        if values:
            (lp,) = values
            written = {
                "token_logprobs": state.token_logprobs.at[rows, slot].set(lp.token, mode="drop"),
                "top_logprob_ids": state.top_logprob_ids.at[rows, slot].set(lp.top_ids, mode="drop"),
                "top_logprobs": state.top_logprobs.at[rows, slot].set(lp.top, mode="drop"),
                "token_ranks": state.token_ranks.at[rows, slot].set(lp.rank, mode="drop"),
            }
        return SampleState(
            current_length=state.current_length + running.astype(jnp.int32),
            sequences=state.sequences.at[rows, slot].set(tokens, mode="drop"),
            running_token=tokens[:, None],
            is_sequence_finished=finished,
            prng_key=state.prng_key,
            model_kwargs=new_kwargs,
            tokens_per_second=state.tokens_per_second,
            generated_tokens=state.generated_tokens + jnp.sum(running, dtype=jnp.int32),
            padded_length=state.padded_length,
            _time_spent_computing=state._time_spent_computing,
            _compile_config=state._compile_config,
            allowed_tokens=state.allowed_tokens,
            token_logprobs=written.get("token_logprobs", state.token_logprobs),
            top_logprob_ids=written.get("top_logprob_ids", state.top_logprob_ids),
            top_logprobs=written.get("top_logprobs", state.top_logprobs),
            token_ranks=written.get("token_ranks", state.token_ranks),
            stop_token_ids=state.stop_token_ids,
        )

    return sampling_step
