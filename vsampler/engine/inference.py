"""`vInference`: the chunked decode loop around `create_sampling_step`, precompiled per input bucket.

    engine = vInference(model, vInferenceConfig(max_new_tokens=64, streaming_chunks=16, eos_token_id=2,
                                                pad_token_id=0))
    engine.precompile(vInferencePreCompileConfig(batch_size=[1, 8], prefill_length=[32, 128]))
    for state in engine.generate(input_ids, attention_mask, sampling_params=params, key=key):
        ...  # state.sequences grows chunk by chunk

* Prefill is one compiled call: the prompts (left-padded to the bucket) go through the model and the
  first token is sampled. Then decode runs in chunks of `streaming_chunks` steps, each chunk ONE compiled
  call (`jax.lax.scan` over the step); the state is yielded after prefill and after every chunk. No chunk
  is launched once every row is finished, and at most `_loop_rows` chunks run.
* Buckets: each standalone of a `vInferencePreCompileConfig` is one (batch_size, prefill_length) bucket;
  `batch_size` counts prompts, and the compiled batch is `batch_size * num_return_sequences` rows
  (copies of a prompt adjacent). Inputs go to the smallest bucket that fits; rows added to fill the
  bucket start finished and stay pad. With nothing precompiled, `generate` compiles the bucket
  (batch, next power of two >= the longest prompt) it needs; once anything is precompiled, inputs that
  fit no bucket are an error.
* Compiled calls are specialised on the sampling *stages* that can be active (`SamplingParams.stages`),
  never on values: new temperatures, k, p, penalties, prompts and keys reuse the executables. The loop's
  stage set is the config's `sampling_params` stages with greedy and sampled rows both allowed; a call
  whose params need a stage outside it compiles once more, for the union, and keeps that too.
* Serving features: `generate(..., allowed_tokens=mask)` applies a packed (B, ceil(V / 32)) mask at
  every step; the generator also takes a new mask by `send` between chunks (with `streaming_chunks=1`,
  a host grammar engine can advance on each yielded token and send the next mask).
  `generate(..., logprobs=n, logprobs_mode=...)` fills the state's `token_logprobs`, `top_logprob_ids`,
  `top_logprobs` and `token_ranks`. Each feature set compiles its own executables (keyed like the stages).
* Donation: each decode chunk donates the incoming `model_kwargs` (the attention cache: nearly all the
  state's bytes). A yielded state's `sequences` and flags stay valid; its `model_kwargs` are consumed by
  the next chunk (copy them first if you need them).
* Mesh (`mesh=`): the parameters are placed by the model's `partition_rules(partition_axis)` (replicated
  when it has none), the state and cache by `vInferenceConfig.get_partition_rules()` (EasyDeL's defaults
  with a default `PartitionAxis` when the config names neither), and both executables are compiled with
  those shardings. Host inputs become global arrays, each process cutting its own shards, so the same
  program runs on every host after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vsampler.core.inputs import allowed_words, mask_words
from vsampler.core.logprobs import LogprobsRequest, request
from vsampler.core.params import SamplingParams, Stages
from vsampler.core.sampling import Impl, resolve_impl
from vsampler.engine.config import PartitionAxis, vInferenceConfig, vInferencePreCompileConfig
from vsampler.engine.host_inputs import abstract_params, check_prompts, left_pad, pad_rows, request_keys, row_params
from vsampler.engine.partitioning import named_shardings, place_global, replicated_value
from vsampler.engine.state import SampleState
from vsampler.engine.step import StepSampler, create_sampling_step

logger = logging.getLogger("vsampler")


@dataclasses.dataclass(frozen=True)
class _Executables:
    prefill: Any
    decode: Any
    rows: int
    vocab: int


class _Serving(NamedTuple):
    """The serving features an executable is compiled for (static)."""

    logprobs: LogprobsRequest | None = None
    masked: bool = False
    stop_width: int = 0  # S of the per-request (B, S) stop ids; 0: every row stops on the config's EOS ids

    def serves(self, wanted: _Serving) -> bool:
        """Whether an executable compiled for these features runs a call that wants `wanted`'s: the same
        log-probs and mask, and room for its stop ids (a call without per-request ones needs none)."""
        if (self.logprobs, self.masked) != (wanted.logprobs, wanted.masked):
            return False
        return self.stop_width == 0 if wanted.stop_width == 0 else self.stop_width >= wanted.stop_width


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class vInference:
    """The generation loop for an NNX model that follows `vsampler.engine.step`'s contract."""

    def __init__(
        self,
        model: nnx.Module,
        generation_config: vInferenceConfig,
        *,
        mesh: jax.sharding.Mesh | None = None,
        impl: Impl | StepSampler = "auto",
    ) -> None:
        if not isinstance(generation_config, vInferenceConfig):
            raise ValueError(f"generation_config must be a vInferenceConfig, got {type(generation_config).__name__}")
        self.config = generation_config
        self.impl = impl if callable(impl) else resolve_impl(impl)
        self.graphdef, self.graphstate, self.graphother = nnx.split(model, nnx.Param, ...)
        self.mesh = mesh
        if mesh is not None:
            self._shard_model(model, mesh)
        self.vocab_size: int | None = getattr(model, "vocab_size", None)
        eos = generation_config.eos_token_id
        eos_list = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        self.eos_token_ids: tuple[int, ...] = tuple(int(e) for e in eos_list)
        pad = generation_config.pad_token_id
        if pad is None:
            if not self.eos_token_ids:
                raise ValueError("vInferenceConfig needs pad_token_id (or an eos_token_id to pad with)")
            pad = self.eos_token_ids[0]
        self.pad_token_id = int(pad)
        if self.vocab_size is not None:
            self._check_ids_in_vocab(self.vocab_size)
        self._executables: dict[tuple[int, Stages, _Serving], _Executables] = {}
        self._buckets: list[vInferencePreCompileConfig] = []
        self._precompiled = False  # once True, inputs must fit a bucket

    def _shard_model(self, model: nnx.Module, mesh: jax.sharding.Mesh) -> None:
        """Places the parameters by the model's rules (`model.partition_rules(partition_axis)`, when it has
        them; replicated otherwise) and keeps the state's rules (`vInferenceConfig.get_partition_rules`,
        with a default `PartitionAxis` when the config names neither rules nor axes)."""
        config = self.config
        if config.partition_rules is None and config.partition_axis is None:
            config = dataclasses.replace(config, partition_axis=PartitionAxis())
        axis = config.partition_axis or PartitionAxis()
        self.state_rules = config.get_partition_rules()
        rules = model.partition_rules(axis) if hasattr(model, "partition_rules") else ((".*", PartitionSpec()),)
        host = jax.device_get(self.graphstate)  # host values: each process cuts its own shards
        self.graphstate = place_global(host, named_shardings(rules, host, mesh))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.graphother = place_global(self.graphother, self._replicated)

    def _jit(
        self, fn: Any, args: tuple[Any, ...], kinds: tuple[str, ...], out: Any, donate: tuple[int, ...] = ()
    ) -> Any:
        """AOT-compiles `fn` for `args` (shapes). On a mesh, each argument is placed by its kind: "model"
        (the parameters' own shardings), "prompts" (as `sequences`), "state" / "cache" (the state's rules)
        or "replicated"; the output (shape `out`) by the state's rules."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        mesh, rules = self.mesh, self.state_rules

        def sharding(kind: str, arg: Any) -> Any:
            if kind == "model":
                return jax.tree.map(lambda x: x.sharding, arg)
            if kind == "prompts":
                return named_shardings(rules, {"sequences": arg}, mesh)["sequences"]
            if kind == "state":
                return named_shardings(rules, arg, mesh)
            if kind == "cache":
                return named_shardings(rules, {"model_kwargs": arg}, mesh)["model_kwargs"]
            return NamedSharding(mesh, PartitionSpec())

        in_shardings = tuple(sharding(k, a) for k, a in zip(kinds, args, strict=True))
        out_shardings = named_shardings(rules, out, mesh)
        return (
            jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)
            .lower(*args)
            .compile()
        )

    # -- configuration checks -------------------------------------------------------------------------
    def _check_ids_in_vocab(self, vocab: int) -> None:
        for name, ids in (("eos_token_id", self.eos_token_ids), ("pad_token_id", (self.pad_token_id,))):
            bad = [i for i in ids if i >= vocab]
            if bad:
                raise ValueError(f"vInferenceConfig.{name} {bad} outside the model's vocabulary [0, {vocab})")

    def _return_sequences(self, bucket: vInferencePreCompileConfig) -> int:
        n = self.config.num_return_sequences
        if isinstance(n, Mapping):
            return int(n.get(bucket.get_default_hash(), 1))
        return 1 if n is None else int(n)

    def _loop_stages(self, params: SamplingParams | None = None) -> Stages:
        stages = self.config.sampling_params.stages | Stages(greedy=True, random=True)
        return stages if params is None else stages | params.stages

    # -- compilation ----------------------------------------------------------------------------------
    def precompile(
        self,
        config: vInferencePreCompileConfig,
        sampling_params: SamplingParams | None = None,
        *,
        logprobs: int | None = None,
        logprobs_mode: str = "raw",
        allowed_tokens: bool = False,
        stop_token_ids: int = 0,
    ) -> list[vInferencePreCompileConfig]:
        """AOT-compiles prefill and the decode chunk for every standalone of `config` (cached by
        `get_default_hash()`), for the loop's stages widened by `sampling_params`' when given, and for
        the serving features `generate` will be called with (`logprobs`, `logprobs_mode`, whether an
        `allowed_tokens` mask is passed, and `stop_token_ids`: the most per-request stop ids one request
        of a `generate` call will pass, 0 for none). Returns the standalones compiled."""
        if not isinstance(config, vInferencePreCompileConfig):
            raise ValueError(f"precompile needs a vInferencePreCompileConfig, got {type(config).__name__}")
        stages = self._loop_stages(sampling_params)
        if isinstance(stop_token_ids, bool) or not isinstance(stop_token_ids, (int, np.integer)) or stop_token_ids < 0:
            raise ValueError(
                f"precompile's stop_token_ids is the most stop ids one request will pass (an integer >= 0), "
                f"got {stop_token_ids!r}"
            )
        serving = _Serving(
            request(logprobs, logprobs_mode, self.vocab_size),
            bool(allowed_tokens),
            self._stop_width(int(stop_token_ids)),
        )
        standalones = config.get_standalones()
        for bucket in standalones:
            if bucket.vision_included:
                raise ValueError("vInferencePreCompileConfig.vision_included: vision inputs are not supported")
            if bucket.prefill_length is None:
                raise ValueError("vInferencePreCompileConfig.prefill_length must be set to precompile the loop")
            self._compile(bucket, stages, serving)
        self._precompiled = True
        return standalones

    def _compile(self, bucket: vInferencePreCompileConfig, stages: Stages, serving: _Serving) -> _Executables:
        key = (bucket.get_default_hash(), stages, serving)
        if key in self._executables:
            return self._executables[key]
        rows = bucket.batch_size * self._return_sequences(bucket)
        prompt_len = bucket.prefill_length
        total = prompt_len + self.config.max_new_tokens
        logits_shape = self._logits_shape(rows, prompt_len)
        vocab = logits_shape[-1]
        if self.vocab_size is None:
            self._check_ids_in_vocab(vocab)
        params = abstract_params(stages, rows, vocab)
        i32 = jnp.int32
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        prefill_args = (
            jax.ShapeDtypeStruct((rows, prompt_len), i32),  # prompt ids, left-padded
            jax.ShapeDtypeStruct((rows, prompt_len), i32),  # prompt mask
            jax.ShapeDtypeStruct((rows,), i32),  # request (prompt) index of each row
            jax.ShapeDtypeStruct((rows,), i32),  # copy index of each row (num_return_sequences)
            jax.ShapeDtypeStruct((rows,), jnp.bool_),  # rows that only fill the bucket
            jax.ShapeDtypeStruct((rows, *key_shape), jnp.uint32),  # each row's request key (raw data)
            jax.ShapeDtypeStruct((), jnp.bool_),  # one base key: fold in the request index first
        )
        if serving.masked:
            prefill_args += (jax.ShapeDtypeStruct((rows, allowed_words(vocab)), i32),)  # allowed_tokens
        if serving.stop_width:
            prefill_args += (jax.ShapeDtypeStruct((rows, serving.stop_width), i32),)  # stop_token_ids
        if serving.logprobs is not None and serving.logprobs.n > vocab:
            raise ValueError(f"logprobs={serving.logprobs.n} asks for more top entries than the vocabulary ({vocab})")
        prefill_fn = self._prefill_fn(bucket, total, serving)
        state_shape = jax.eval_shape(prefill_fn, self.graphstate, self.graphother, params, *prefill_args)
        prefill = self._jit(
            prefill_fn,
            (self.graphstate, self.graphother, params, *prefill_args),
            ("model", "model", "replicated", "prompts", "prompts", *["replicated"] * (len(prefill_args) - 2)),
            state_shape,
        )
        kwargs_shape = state_shape.model_kwargs
        head_shape = dataclasses.replace(state_shape, model_kwargs={})
        decode = self._jit(
            self._decode_fn(serving),
            (self.graphstate, self.graphother, params, head_shape, kwargs_shape),
            ("model", "model", "replicated", "state", "cache"),
            state_shape,
            donate=(4,),
        )
        self._executables[key] = _Executables(prefill=prefill, decode=decode, rows=rows, vocab=vocab)
        if bucket not in self._buckets:
            self._buckets.append(bucket)
        logger.info("vsampler: compiled bucket %s for stages %s, %s", bucket.extract(), stages, serving)
        return self._executables[key]

    def _logits_shape(self, rows: int, prompt_len: int) -> tuple[int, ...]:
        model = nnx.merge(self.graphdef, self.graphstate, self.graphother)
        cache = model.init_cache(rows, prompt_len + self.config.max_new_tokens)

        def run(ids: jax.Array) -> jax.Array:
            mask = jnp.ones((rows, prompt_len + self.config.max_new_tokens), jnp.int32)
            return model(ids, attention_mask=mask, position_ids=ids, past_key_values=cache, cache_index=0).logits

        return jax.eval_shape(run, jax.ShapeDtypeStruct((rows, 1), jnp.int32)).shape

    def _step(self, params: SamplingParams, serving: _Serving) -> Any:
        lp = serving.logprobs
        return create_sampling_step(
            params,
            self.eos_token_ids or None,
            self.pad_token_id,
            impl=self.impl,
            logprobs=None if lp is None else lp.n,
            logprobs_mode="raw" if lp is None else lp.mode,
        )

    def _prefill_fn(self, bucket: vInferencePreCompileConfig, total: int, serving: _Serving):
        prompt_len = bucket.prefill_length
        pad = self.pad_token_id
        graphdef = self.graphdef

        def prefill(
            graphstate,
            graphother,
            params,
            prompt_ids,
            prompt_mask,
            request_ids,
            copy_ids,
            filler,
            keys,
            derive,
            *serving_inputs,
        ):
            serving_inputs = list(serving_inputs)
            allowed = serving_inputs.pop(0) if serving.masked else None
            stops = serving_inputs.pop(0) if serving.stop_width else None
            fold = jax.vmap(jax.random.fold_in)
            request_keys = jax.random.wrap_key_data(keys)
            derived = jax.random.key_data(fold(request_keys, request_ids))
            request_keys = jax.random.wrap_key_data(jnp.where(derive, derived, keys))
            model = nnx.merge(graphdef, graphstate, graphother)
            rows = prompt_ids.shape[0]
            sequences = jnp.full((rows, total), pad, jnp.int32).at[:, :prompt_len].set(prompt_ids)
            mask = jnp.zeros((rows, total), jnp.int32).at[:, :prompt_len].set(prompt_mask)
            positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
            state = SampleState(
                current_length=jnp.full((rows,), prompt_len, jnp.int32),
                sequences=sequences,
                running_token=prompt_ids,
                is_sequence_finished=filler,
                prng_key=fold(request_keys, copy_ids),
                model_kwargs={
                    "attention_mask": mask,
                    "position_ids": positions,
                    "past_key_values": model.init_cache(rows, total),
                    "cache_index": jnp.int32(0),
                },
                tokens_per_second=jnp.float32(-jnp.inf),
                generated_tokens=jnp.int32(0),
                padded_length=prompt_len,
                _time_spent_computing=jnp.float32(0.0),
                _compile_config=bucket,
                allowed_tokens=allowed,
                stop_token_ids=stops,
                **self._logprob_buffers(rows, total, serving),
            )
            return self._step(params, serving)(graphdef, graphstate, graphother, state)

        return prefill

    def _stop_width(self, own: int) -> int:
        """The (B, S) stop-id width for requests of up to `own` stop ids each, besides the config's EOS
        ids: 0 when there are none, else a power of two (a few widths serve every call)."""
        return 0 if own == 0 else _next_power_of_two(len(self.eos_token_ids) + own)

    def _stop_rows(self, requests: list[tuple[int, ...]], *, n: int, rows: int, width: int, vocab: int) -> np.ndarray:
        """The requests' own stop ids (`_request_stop_ids`) as the bucket's (rows, width) int32 rows: the
        config's EOS ids, then the request's own, -1 after them; copies repeated, filler rows all -1."""
        out = np.full((rows, width), -1, np.int32)
        for r, own in enumerate(requests):
            bad = [i for i in own if i >= vocab]
            if bad:
                raise ValueError(f"stop_token_ids[{r}] holds {bad} outside the model's vocabulary [0, {vocab})")
            ids = list(dict.fromkeys((*self.eos_token_ids, *own)))
            out[r * n : (r + 1) * n, : len(ids)] = ids
        return out

    @staticmethod
    def _request_stop_ids(stop_token_ids: Any, batch: int) -> list[tuple[int, ...]]:
        """`generate`'s `stop_token_ids`, checked: B entries, each a token id or a sequence of them (a
        (B, S) integer array may pad with -1)."""
        if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__len__"):
            raise ValueError(
                f"stop_token_ids must hold one entry per prompt ({batch}): a list of id lists or a (B, S) "
                f"integer array (-1 = padding), got {type(stop_token_ids).__name__}"
            )
        if len(stop_token_ids) != batch:
            raise ValueError(f"stop_token_ids has {len(stop_token_ids)} entries but there are {batch} prompts")
        padded = isinstance(stop_token_ids, (np.ndarray, jax.Array))
        out = []
        for r, entry in enumerate(stop_token_ids):
            arr = np.asarray(entry)
            if arr.ndim > 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
                raise ValueError(f"stop_token_ids[{r}] must be a token id or a sequence of ids, got {entry!r}")
            ids = arr.reshape(-1)
            if padded:
                ids = ids[ids != -1]
            if (ids < 0).any():
                what = "integers >= 0 (-1 pads an array's rows)" if padded else "integers >= 0"
                raise ValueError(f"stop_token_ids[{r}] must hold token ids, {what}, got {entry!r}")
            out.append(tuple(int(i) for i in ids))
        return out

    def _logprob_buffers(self, rows: int, total: int, serving: _Serving) -> dict[str, jax.Array]:
        if serving.logprobs is None:
            return {}
        n = serving.logprobs.n
        return {
            "token_logprobs": jnp.zeros((rows, total), jnp.float32),
            "top_logprob_ids": jnp.full((rows, total, n), self.pad_token_id, jnp.int32),
            "top_logprobs": jnp.full((rows, total, n), -jnp.inf, jnp.float32),
            "token_ranks": jnp.zeros((rows, total), jnp.int32),
        }

    def _decode_fn(self, serving: _Serving):
        chunk = self.config.streaming_chunks
        graphdef = self.graphdef

        def decode(graphstate, graphother, params, head, model_kwargs):
            step = self._step(params, serving)

            def body(state: SampleState, _: None) -> tuple[SampleState, None]:
                return step(graphdef, graphstate, graphother, state), None

            state = dataclasses.replace(head, model_kwargs=model_kwargs)
            state, _ = jax.lax.scan(body, state, None, length=chunk)
            return state

        return decode

    # -- generation -----------------------------------------------------------------------------------
    def _pick_bucket(self, batch: int, longest: int) -> vInferencePreCompileConfig:
        fits = [b for b in self._buckets if b.batch_size >= batch and b.prefill_length >= longest]
        if fits:
            return min(fits, key=lambda b: (b.batch_size * b.prefill_length, b.prefill_length))
        if not self._precompiled:
            return vInferencePreCompileConfig(batch_size=batch, prefill_length=_next_power_of_two(longest))
        largest_len = max(b.prefill_length for b in self._buckets)
        largest_batch = max(b.batch_size for b in self._buckets)
        if longest > largest_len:
            raise ValueError(
                f"a prompt has {longest} tokens, longer than the largest precompiled prefill_length "
                f"({largest_len}); precompile a longer bucket (prompts are never truncated)"
            )
        raise ValueError(
            f"no precompiled bucket fits batch {batch} with prompts of up to {longest} tokens "
            f"(largest batch_size: {largest_batch}); precompile one that does"
        )

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        sampling_params: SamplingParams | None = None,
        key: jax.Array | None = None,
        allowed_tokens: Any = None,
        logprobs: int | None = None,
        logprobs_mode: str = "raw",
        stop_token_ids: Any = None,
    ) -> Generator[SampleState, Any, None]:
        """Generates for a batch of prompts, yielding the state after prefill and after each chunk.

        `input_ids` (B, L) integer token ids; `attention_mask` (B, L) marks the real ones (default: all;
        padding may sit on either side). `sampling_params` (default: the config's) holds scalars or (B,)
        / (B * num_return_sequences,) per-row values. `key` (default `jax.random.key(0)`): one key, which
        gives prompt i the key `fold_in(key, i)`, or B keys (per-request seeds: prompt i's tokens then
        depend on `key[i]` alone, not on its place in the batch or the batch size). Copy j of prompt i
        draws from `fold_in(request_key, j)`, then `fold_in(., generation index)`. Errors (checked before
        anything runs): shapes, empty prompts, ids outside the vocabulary, prompts longer than every bucket,
        `max_tokens > max_new_tokens`, keys of the wrong shape or PRNG implementation.

        `allowed_tokens` (B, ceil(V / 32)) int32: each prompt's packed mask (`vsampler.sample`), applied
        at every step to all its copies; `generator.send(mask)` replaces it for the chunks after the state
        just yielded (the loop must have started with a mask). `logprobs=n` / `logprobs_mode`: each token's
        log-probabilities go into the state's `token_logprobs`, `top_logprob_ids`, `top_logprobs`.
        `stop_token_ids`: per-request stop ids (vLLM's `stop_token_ids`), one entry per prompt (a list of
        ids each, or a (B, S) integer array padded with -1): prompt i's rows finish on the config's EOS ids
        or any of its own, and `min_tokens` masks both; on `impl="pallas"` such steps run the XLA sampler
        (the kernel takes one EOS set per call).
        A mask `send` cannot take (shape, dtype, or a generation started without one) raises ValueError
        from `send` and is dropped: the stream goes on from the same state, with the mask it had.
        """
        checks: dict[str, Callable[[Any], np.ndarray]] = {}
        body = self._generate(
            checks,
            input_ids,
            attention_mask,
            sampling_params=sampling_params,
            key=key,
            allowed_tokens=allowed_tokens,
            logprobs=logprobs,
            logprobs_mode=logprobs_mode,
            stop_token_ids=stop_token_ids,
        )
        return _MaskedStream(body, checks)

    def _generate(
        self,
        checks: dict[str, Callable[[Any], np.ndarray]],
        input_ids: Any,
        attention_mask: Any,
        *,
        sampling_params: SamplingParams | None,
        key: jax.Array | None,
        allowed_tokens: Any,
        logprobs: int | None,
        logprobs_mode: str,
        stop_token_ids: Any,
    ) -> Generator[SampleState, Any, None]:
        """`generate`'s loop; `checks["mask"]` is set to the check of a sent mask before the first yield."""
        ids, mask = check_prompts(input_ids, attention_mask)
        batch = ids.shape[0]
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise ValueError(f"attention_mask row {int(np.argmin(lengths))} has no real token: every prompt needs one")
        params = self.config.sampling_params if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        over = np.asarray(params.max_tokens) > self.config.max_new_tokens
        if np.any(over):
            raise ValueError(
                f"SamplingParams.max_tokens ({params.max_tokens!r}) exceeds vInferenceConfig.max_new_tokens "
                f"({self.config.max_new_tokens}), the loop's length"
            )
        requested_stops = None if stop_token_ids is None else self._request_stop_ids(stop_token_ids, batch)
        own_stops = 0 if requested_stops is None else max(map(len, requested_stops))
        serving = _Serving(
            request(logprobs, logprobs_mode, self.vocab_size), allowed_tokens is not None, self._stop_width(own_stops)
        )
        bucket = self._pick_bucket(batch, int(lengths.max()))
        stages = self._loop_stages()
        for (h, have, features), _ in self._executables.items():
            if h == bucket.get_default_hash() and features.serves(serving) and have.covers(params.stages):
                stages, serving = have, features
                break
        else:
            stages = stages | params.stages
        exe = self._compile(bucket, stages, serving)
        n = exe.rows // bucket.batch_size
        vocab = exe.vocab
        if ((ids < 0) | (ids >= vocab))[mask].any():
            raise ValueError(f"input_ids hold token ids outside the model's vocabulary [0, {vocab})")
        prompt_ids, prompt_mask = left_pad(ids, mask, bucket.prefill_length, self.pad_token_id)
        rows = exe.rows
        prompt_ids = np.repeat(pad_rows(prompt_ids, bucket.batch_size, self.pad_token_id), n, axis=0)
        prompt_mask = np.repeat(pad_rows(prompt_mask, bucket.batch_size, 0), n, axis=0)
        filler = np.arange(rows) >= batch * n
        loop_params = row_params(params, stages, batch, n, rows, vocab)
        keys, derive = request_keys(key, batch)
        inputs = (
            loop_params,
            prompt_ids.astype(np.int32),
            prompt_mask.astype(np.int32),
            np.arange(rows, dtype=np.int32) // n,
            np.arange(rows, dtype=np.int32) % n,
            filler,
            pad_rows(np.repeat(keys, n, axis=0), rows, 0),
            np.bool_(derive),
        )
        mask_rows = functools.partial(self._mask_rows, batch=batch, n=n, rows=rows, vocab=vocab)
        if serving.masked:
            inputs += (mask_rows(allowed_tokens),)
        if serving.stop_width:
            inputs += (self._stop_rows(requested_stops, n=n, rows=rows, width=serving.stop_width, vocab=vocab),)
        checks["mask"] = functools.partial(self._sent_mask_rows, mask_rows=mask_rows, serving=serving)
        if self.mesh is not None:  # global arrays from the host values every process holds alike
            inputs = place_global(inputs, exe.prefill.input_shardings[0][2:], self._replicated)
            loop_params = inputs[0]
        state = exe.prefill(self.graphstate, self.graphother, *inputs)
        state = self._new_mask(state, (yield state))
        first_tokens = int(replicated_value(state.generated_tokens))
        spent = 0.0
        for _ in range(self.config._loop_rows):
            if bool(np.all(replicated_value(state.is_sequence_finished))):
                return
            head = dataclasses.replace(state, model_kwargs={})
            if self.mesh is not None:
                head = place_global(head, exe.decode.input_shardings[0][3], self._replicated)
            start = time.perf_counter()
            state = exe.decode(self.graphstate, self.graphother, loop_params, head, state.model_kwargs)
            jax.block_until_ready(state.sequences)
            spent += time.perf_counter() - start
            made = int(replicated_value(state.generated_tokens)) - first_tokens
            state = dataclasses.replace(
                state,
                _time_spent_computing=np.float32(spent),
                tokens_per_second=np.float32(made / spent if spent > 0 else float("-inf")),
            )
            state = self._new_mask(state, (yield state))

    def _mask_rows(self, allowed: Any, *, batch: int, n: int, rows: int, vocab: int) -> np.ndarray:
        """A request-level (B, ceil(V / 32)) mask as the bucket's rows: copies repeated, filler rows
        allowing everything (they are finished from the start)."""
        words = allowed_words(vocab)
        shape = tuple(np.shape(allowed)) if hasattr(allowed, "shape") else np.shape(np.asarray(allowed, object))
        if shape != (batch, words):
            raise ValueError(
                f"allowed_tokens must be an int32 packed bitmask (B, ceil(V / 32)) = ({batch}, {words}), "
                f"got shape {shape}"
            )
        mask = np.repeat(np.asarray(mask_words(allowed)), n, axis=0)  # `sample`'s dtype rule
        return np.concatenate([mask, np.full((rows - mask.shape[0], words), -1, np.int32)])

    @staticmethod
    def _sent_mask_rows(sent: Any, *, mask_rows: Callable[[Any], np.ndarray], serving: _Serving) -> np.ndarray:
        """A mask `send` passed, checked (before the loop sees it) and laid out as the bucket's rows."""
        if not serving.masked:
            raise ValueError("a mask was sent to a generation started without allowed_tokens: pass one to generate")
        return mask_rows(sent)

    def _new_mask(self, state: SampleState, mask: np.ndarray | None) -> SampleState:
        """The state to continue from after a yield: with the (checked) mask `send` passed in, if any."""
        if mask is None:
            return state
        if self.mesh is not None:
            mask = place_global(mask, state.allowed_tokens.sharding)
        return dataclasses.replace(state, allowed_tokens=jnp.asarray(mask))

    def generate_all(self, *args: Any, **kwargs: Any) -> SampleState:
        """Runs `generate` to the end and returns the last state."""
        (last,) = collections.deque(self.generate(*args, **kwargs), maxlen=1)
        return last


class _MaskedStream(Generator):
    """`vInference.generate`'s generator: `send(mask)` checks the mask before the loop sees it, so a mask
    it cannot take raises ValueError from `send` and leaves the stream alive (the next `next` / `send`
    continues from the same state). Otherwise the loop generator's own behaviour."""

    def __init__(self, body: Generator[SampleState, Any, None], checks: dict[str, Callable[[Any], np.ndarray]]):
        self._body = body
        self._checks = checks

    def send(self, value: Any) -> SampleState:
        if value is not None:
            if "mask" not in self._checks:
                raise TypeError("can't send a mask to a generation that has not started: call next() first")
            value = self._checks["mask"](value)  # raises here, before the loop generator resumes
        return self._body.send(value)

    def throw(self, *args: Any) -> SampleState:
        return self._body.throw(*args)

    def close(self) -> None:
        self._body.close()
