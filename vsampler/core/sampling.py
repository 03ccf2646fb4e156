"""The public sampling functions and the dispatcher between implementations.

Shapes and dtypes:
  logits:       (B, V) float32, bfloat16 or float16 (math in float32). Any V (no multiple of 128 needed).
  params:       `SamplingParams`, each numeric field a scalar or a (B,) array.
  key:          one PRNG key (`jax.random.key(s)` or a raw `PRNGKey`), or a (B,) batch of keys: row i then
                draws from `key[i]` alone, so a request's tokens do not depend on its neighbours.
  history:      (B, L) integer token ids seen by each row, prompt then generated; negative = empty slot.
  prompt_len:   scalar or (B,) integer: history positions >= prompt_len are the generated tokens
                (presence / frequency penalties and `min_tokens` count only those). Default 0.
  eos_token_id: one id or several (int, sequence or 1-D array); needed when `min_tokens > 0` or with
                `allowed_tokens`. Or per-request stop ids: a (B, S) integer array, -1 = padding (concrete
                ids must lie in [-1, V)): row r's `min_tokens` masks its own ids, it finishes on its own
                ids (`sample_step`), and a row `allowed_tokens` empties samples its own first id (0 if
                it has none). The kernels take one set per call: impl="pallas" runs such calls on xla.
  allowed_tokens: (B, ceil(V / 32)) int32, the packed bitmask grammar engines (xgrammar, llguidance) write:
                bit j % 32 of word j // 32 set = token j allowed. Applied before every other stage (inside
                the fused kernel on impl="pallas"); a row it leaves without a token samples the first EOS
                id. `vsampler.core.inputs.pack_allowed` packs a (B, V) bool array.
  logprobs, logprobs_mode (`sample`, `sample_step`): n in [0, 64] also returns a `LogProbs` (the token's
                log-probability and the n most likely tokens with theirs) in the "raw" (default) or the
                "processed" distribution: `vsampler.core.logprobs`.
  impl:         "auto" | "reference" | "xla" | "pallas".
  mesh, vocab_axis (`sample` only): logits sharded over the vocabulary on that mesh axis (a tensor-parallel
                lm head's output) are sampled without gathering them: `vsampler.impls.vocab_parallel`.

Both functions are jitted (static: the implementation, the EOS ids when concrete, and the active
stages, which `SamplingParams` carries as pytree aux data) and can be called inside a user's own
`jax.jit` as well; a serving step whose batch mix changes fixes the stage set once with
`SamplingParams.with_stages`, and compiles once. Semantics, ties, NaN and -inf: `vsampler.core.reference` (the spec) and
`vsampler.core.inputs` (argument checks and run-time sanitising).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vsampler.core import logprobs as lp
from vsampler.core import registry
from vsampler.core.inputs import (
    EosIds,
    SamplerInputs,
    check_eos_rows,
    check_prompt_len_range,
    eos_rows,
    ids_as_int32,
    mask_words,
    prepare,
)
from vsampler.core.logprobs import LogProbs
from vsampler.core.params import SamplingParams

# the registry name of the vocabulary-parallel sampler, which `vocab_axis=` selects (never `impl=`)
VOCAB_PARALLEL = "vocab-parallel"
Impl = Literal["auto", "reference", "xla", "pallas", "pallas-triton", "pallas-chunked"]


def available_impls() -> tuple[str, ...]:
    """The implementations this installation can run (besides "auto"), by the names `impl=` takes: those
    registered in `vsampler.core.registry`."""
    return registry.names()


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Maps `impl` to a registered implementation's name. "auto" is pallas on TPU (where the kernel is
    compiled by Mosaic and verified against the reference) and xla elsewhere: on GPU too, until the
    kernel's Triton variant, so far only lowered and checked in interpret mode, has been run on a GPU
    (each implementation's `auto_backends` in the registry)."""
    if impl == "auto":
        return registry.auto(backend or jax.default_backend())
    if not isinstance(impl, str) or not registry.get(impl).selectable:
        raise ValueError(f"impl must be one of {('auto', *available_impls())}, got {impl!r}")
    return impl


def _static_eos(eos_token_id: EosIds, logits: Any) -> tuple[tuple[int, ...] | None, Any]:
    """Concrete EOS ids become a static tuple (checked against V at trace time); traced ones and per-request
    stop ids (a (B, S) array, checked here) stay dynamic."""
    if np.ndim(eos_token_id) == 2:
        ids = eos_token_id if hasattr(eos_token_id, "dtype") else np.asarray(eos_token_id)
        shape = np.shape(logits)
        if len(shape) == 2:
            check_eos_rows(ids, shape[0], shape[1])
        return None, ids
    if eos_token_id is None or isinstance(eos_token_id, jax.core.Tracer):
        return None, eos_token_id
    arr = np.asarray(eos_token_id)
    if arr.size == 0:
        raise ValueError("eos_token_id is empty: pass None for no EOS id, or one id or more")
    if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"eos_token_id must be an integer id or a sequence of ids, got {eos_token_id!r}")
    return tuple(int(i) for i in arr.reshape(-1)), None


def _check_prompt_len(prompt_len: Any, history: Any) -> None:
    """Checks concrete prompt lengths before jit turns them into tracers (shape errors come later)."""
    if history is not None and np.ndim(history) == 2:
        check_prompt_len_range(prompt_len, np.shape(history)[1])


def _at_the_boundary(params: Any, history: Any, prompt_len: Any, allowed_tokens: Any) -> tuple[Any, Any, Any]:
    """Concrete arguments checked and converted before `jit` sees them: jit's own conversion of an int64
    array under 32-bit mode wraps (a `top_k` of 2**32 + 1 would act as 1, a history id 2**32 + 10 as
    10), and a Python list would become one leaf per element. Returns `(params, history, allowed)` in
    the dtypes they are used in (`SamplingParams.in_used_dtypes`, `vsampler.core.inputs.ids_as_int32`,
    `vsampler.core.inputs.mask_words`)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    _check_prompt_len(prompt_len, history)
    if history is not None:
        history = ids_as_int32(history, "history")
    return params.in_used_dtypes(), history, mask_words(allowed_tokens)


def _prepare(logits, params, key, history, prompt_len, eos_static, eos_dynamic, allowed, draw=True) -> SamplerInputs:
    """`vsampler.core.inputs.prepare` on the jitted functions' arguments (static EOS ids or traced ones)."""
    return prepare(
        logits,
        params,
        key,
        history=history,
        prompt_len=prompt_len,
        eos_token_id=list(eos_static) if eos_static is not None else eos_dynamic,
        allowed_tokens=allowed,
        draw=draw,
    )


@functools.partial(jax.jit, static_argnames=("eos_static", "impl", "mesh", "vocab_axis", "logprobs"))
def _sample_jit(
    logits,
    params,
    key,
    history,
    prompt_len,
    eos_dynamic,
    allowed,
    *,
    eos_static,
    impl,
    mesh=None,
    vocab_axis=None,
    logprobs=None,
):
    inp = _prepare(logits, params, key, history, prompt_len, eos_static, eos_dynamic, allowed)
    if vocab_axis is not None:
        return registry.get(impl).sample(inp, mesh=mesh, vocab_axis=vocab_axis)
    tokens, logprob_values = registry.get(impl).sample(inp, logprobs)
    return tokens if logprobs is None else (tokens, logprob_values)


@functools.partial(jax.jit, static_argnames=("eos_static", "impl"))
def _process_jit(logits, params, history, prompt_len, eos_dynamic, allowed, *, eos_static, impl):
    inp = _prepare(logits, params, None, history, prompt_len, eos_static, eos_dynamic, allowed, draw=False)
    return registry.get(impl).process_logits(inp)


@functools.partial(jax.jit, static_argnames=("eos_static", "impl", "pad_token_id", "logprobs"))
def _sample_step_jit(
    logits,
    params,
    key,
    history,
    prompt_len,
    eos_dynamic,
    finished,
    allowed,
    *,
    eos_static,
    impl,
    pad_token_id,
    logprobs=None,
):
    inp = _prepare(logits, params, key, history, prompt_len, eos_static, eos_dynamic, allowed)
    finished = jnp.asarray(finished, bool)
    if finished.shape != (logits.shape[0],):
        raise ValueError(f"finished must be a ({logits.shape[0]},) bool array (one flag per row), got {finished.shape}")
    implementation = registry.get(impl)
    if implementation.step is not None:
        return implementation.step(inp, finished, pad_token_id, logprobs)
    tokens, values = implementation.sample(inp, logprobs)
    if inp.eos_ids is not None:
        finished_now = jnp.any(tokens[:, None] == eos_rows(inp.eos_ids), axis=1)  # padding -1: never
    else:
        finished_now = jnp.zeros_like(finished)
    out = jnp.where(finished, jnp.int32(pad_token_id), tokens), finished | finished_now
    if logprobs is None:
        return out
    return (*out, lp.for_finished_rows(values, finished, pad_token_id))


def _per_request_eos_impl(impl: str, eos_dynamic: Any) -> str:
    """An implementation that takes one set of EOS ids for the whole batch (the kernels: registered with
    `per_row_stop_ids=False`) runs calls with per-request stop ids ((B, S)) on xla instead (the README
    says so)."""
    return "xla" if np.ndim(eos_dynamic) == 2 and not registry.get(impl).per_row_stop_ids else impl


def _check_pad(pad_token_id: Any, vocab: int | None) -> int:
    """The pad id finished rows emit: one concrete integer in [0, V) (it is static: part of the program),
    so that `sample_step`, like `sample`, never returns an id outside the vocabulary."""
    if isinstance(pad_token_id, jax.core.Tracer):
        raise ValueError(
            "pad_token_id must be a concrete integer token id (it is static, compiled into the step), got a traced "
            "value: pass it as a Python int, outside jit"
        )
    if isinstance(pad_token_id, np.ndarray) and pad_token_id.ndim == 0:
        pad_token_id = pad_token_id[()]
    if isinstance(pad_token_id, (bool, np.bool_)) or not isinstance(pad_token_id, (int, np.integer)):
        raise ValueError(f"pad_token_id must be one token id (an integer in [0, V)), got {pad_token_id!r}")
    if pad_token_id < 0 or (vocab is not None and pad_token_id >= vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, V={vocab}), got {int(pad_token_id)}")
    return int(pad_token_id)


def _vocab(logits: Any) -> int | None:
    shape = getattr(logits, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) == 2 else None


def sample_step(
    logits: jax.Array,
    params: SamplingParams,
    key: jax.Array,
    *,
    finished: jax.Array,
    pad_token_id: int,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    allowed_tokens: jax.Array | None = None,
    logprobs: int | None = None,
    logprobs_mode: lp.Mode = "raw",
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, LogProbs]:
    """`sample` plus the EOS rule (spec stage 8), as a decode step needs it: `(tokens, finished)`, and
    `(tokens, finished, LogProbs)` with `logprobs=n`.

    `finished` (B,) bool: rows already done; they emit `pad_token_id` and stay finished (their log-probs:
    `vsampler.core.logprobs`). A row that samples one of `eos_token_id` comes back finished (its EOS token is
    returned). On impl="pallas" this is the kernel's own entry (one launch); the other implementations
    apply the rule after sampling. `max_tokens` is the caller's: only it knows how many tokens each row
    has generated.
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id, logits)
    params, history, allowed_tokens = _at_the_boundary(params, history, prompt_len, allowed_tokens)
    return _sample_step_jit(
        logits,
        params,
        key,
        history,
        prompt_len,
        eos_dynamic,
        finished,
        allowed_tokens,
        eos_static=eos_static,
        impl=_per_request_eos_impl(resolve_impl(impl), eos_dynamic),
        pad_token_id=_check_pad(pad_token_id, _vocab(logits)),
        logprobs=lp.request(logprobs, logprobs_mode, _vocab(logits)),
    )


def sample(
    logits: jax.Array,
    params: SamplingParams,
    key: jax.Array,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    allowed_tokens: jax.Array | None = None,
    logprobs: int | None = None,
    logprobs_mode: lp.Mode = "raw",
    impl: Impl = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_axis: str | None = None,
) -> jax.Array | tuple[jax.Array, LogProbs]:
    """Samples one token per row: `(B,)` int32, always in `[0, V)`; with `logprobs=n`, `(tokens, LogProbs)`.

    Every implementation follows `vsampler.core.reference` and maps the same key to the same uniform per row,
    so implementations agree token for token except where float rounding moves a CDF boundary.
    Greedy rows (temperature 0) return the lowest index of their maximum penalised logit. A row with no
    finite logit left (all -inf / NaN after the mask, bias, penalties and the min_tokens mask) returns
    token 0, or the first EOS id when `allowed_tokens` is given.

    `logprobs=n` (0 <= n <= 64): also the sampled token's log-probability and the n tokens with the
    largest penalised logits with theirs, in the `logprobs_mode` distribution: "raw" (after penalties,
    before temperature and filtering) or "processed" (what the token was drawn from). The fast paths
    get them from per-row values the sampling computes anyway plus n reductions over the row
    (`vsampler.core.logprobs`), never from a (B, V) log-softmax.

    `vocab_axis`: the logits are sharded over the vocabulary on this axis of `mesh` (default: the ambient
    mesh of `jax.set_mesh`), as a tensor-parallel lm head leaves them; the vocabulary-parallel sampler
    (`vsampler.impls.vocab_parallel`) then samples them where they lie, communicating a few scalars per row
    instead of gathering them, and returns the tokens replicated. It is its own implementation: `impl`
    must stay "auto". A V the axis size does not divide is padded with -inf columns (never drawn).
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id, logits)
    params, history, allowed_tokens = _at_the_boundary(params, history, prompt_len, allowed_tokens)
    request = lp.request(logprobs, logprobs_mode, _vocab(logits))
    sharded: dict[str, Any] = {}
    if vocab_axis is None:
        if mesh is not None:
            raise ValueError("mesh was given without vocab_axis: name the mesh axis the vocabulary is sharded on")
        impl = _per_request_eos_impl(resolve_impl(impl), eos_dynamic)
    else:
        if impl != "auto":
            raise ValueError(
                f"impl={impl!r} cannot be combined with vocab_axis: the vocabulary-parallel sampler is its own "
                "implementation (leave impl='auto')"
            )
        if np.ndim(eos_dynamic) == 2:
            raise ValueError(
                "per-request stop ids (a (B, S) eos_token_id) cannot be combined with vocab_axis yet: pass one "
                "set of EOS ids, or sample without vocab_axis"
            )
        if request is not None:
            raise ValueError(
                "logprobs cannot be combined with vocab_axis yet: the vocabulary-parallel sampler returns "
                "tokens only (gather the logits, or sample without vocab_axis, to get log-probabilities)"
            )
        impl = VOCAB_PARALLEL
        resolve_mesh = registry.get(VOCAB_PARALLEL).extras["resolve_mesh"]
        sharded = {"mesh": resolve_mesh(mesh, vocab_axis), "vocab_axis": vocab_axis}
    return _sample_jit(
        logits,
        params,
        key,
        history,
        prompt_len,
        eos_dynamic,
        allowed_tokens,
        eos_static=eos_static,
        impl=impl,
        logprobs=request,
        **sharded,
    )


def process_logits(
    logits: jax.Array,
    params: SamplingParams,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    allowed_tokens: jax.Array | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """The warped logits, `(B, V)` float32: dropped tokens are -inf, kept ones carry
    `penalised_logit / temperature`; a greedy row keeps only its argmax (lowest index on ties), carrying
    its penalised logit. `softmax` of a row is the distribution `sample` draws from.
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id, logits)
    params, history, allowed_tokens = _at_the_boundary(params, history, prompt_len, allowed_tokens)
    return _process_jit(
        logits,
        params,
        history,
        prompt_len,
        eos_dynamic,
        allowed_tokens,
        eos_static=eos_static,
        impl=_per_request_eos_impl(resolve_impl(impl), eos_dynamic),
    )
