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
                `allowed_tokens`.
  allowed_tokens: (B, ceil(V / 32)) int32, the packed bitmask grammar engines (xgrammar, llguidance) write:
                bit j % 32 of word j // 32 set = token j allowed. Applied before every other stage (inside
                the fused kernel on impl="pallas"); a row it leaves without a token samples the first EOS
                id. `vsampler.inputs.pack_allowed` packs a (B, V) bool array.
  logprobs, logprobs_mode (`sample`, `sample_step`): n in [0, 64] also returns a `LogProbs` (the token's
                log-probability and the n most likely tokens with theirs) in the "raw" (default) or the
                "processed" distribution: `vsampler.logprobs`.
  impl:         "auto" | "reference" | "xla" | "pallas".
  mesh, vocab_axis (`sample` only): logits sharded over the vocabulary on that mesh axis (a tensor-parallel
                lm head's output) are sampled without gathering them: `vsampler.vocab_parallel`.

Both functions are jitted (static: the implementation, the EOS ids when concrete, and the active
stages, which `SamplingParams` carries as pytree aux data) and can be called inside a user's own
`jax.jit` as well; a serving step whose batch mix changes fixes the stage set once with
`SamplingParams.with_stages`, and compiles once. Semantics, ties, NaN and -inf: `vsampler.reference` (the spec) and
`vsampler.inputs` (argument checks and run-time sanitising).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vsampler import logprobs as lp
from vsampler import pallas, reference, vocab_parallel, xla
from vsampler.inputs import EosIds, SamplerInputs, check_prompt_len_range, ids_as_int32, mask_words, prepare
from vsampler.logprobs import LogProbs, LogprobsRequest
from vsampler.params import SamplingParams

Impl = Literal["auto", "reference", "xla", "pallas"]
IMPL_NAMES: tuple[str, ...] = ("auto", "reference", "xla", "pallas")

# name -> sampler on prepared inputs: (inputs, log-prob request or None) -> (tokens, LogProbs or None)
Sampler = Callable[[SamplerInputs, LogprobsRequest | None], tuple[jax.Array, LogProbs | None]]
# impl name -> the kernel variant it names (None: the backend's); the GPU (Triton) and TPU chunked
# variants by name, to verify them off GPU / TPU (interpret mode)
_KERNEL_VARIANTS: dict[str, str | None] = {"pallas": None, "pallas-triton": "triton", "pallas-chunked": "tpu-chunked"}
_SAMPLERS: dict[str, Sampler] = {
    "reference": reference.sample_with_logprobs,
    "xla": xla.sample_with_logprobs,
    **{name: functools.partial(pallas.sample_with_logprobs, variant=v) for name, v in _KERNEL_VARIANTS.items()},
}
_PROCESSORS: dict[str, Callable[[SamplerInputs], jax.Array]] = {
    "reference": reference.process_logits,
    "xla": xla.process_logits,
    **{name: functools.partial(pallas.process_logits, variant=v) for name, v in _KERNEL_VARIANTS.items()},
}


def available_impls() -> tuple[str, ...]:
    """The implementations this installation can run (besides "auto")."""
    return tuple(_SAMPLERS)


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Maps `impl` to a concrete implementation. "auto" is pallas on TPU (where the kernel is compiled by
    Mosaic and verified against the reference) and xla elsewhere: on GPU too, until the kernel's Triton
    variant, so far only lowered and checked in interpret mode, has been run on a GPU."""
    if impl not in IMPL_NAMES and impl not in _SAMPLERS:
        names = tuple(dict.fromkeys((*IMPL_NAMES, *_SAMPLERS)))
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    if impl == "auto":
        backend = backend or jax.default_backend()
        preferred = ("pallas", "xla") if backend == "tpu" else ("xla",)
        return next((name for name in preferred if name in _SAMPLERS), "reference")
    if impl not in _SAMPLERS:
        raise ValueError(f"impl={impl!r} is not available in this version of vsampler; available: {available_impls()}")
    return impl


def _static_eos(eos_token_id: EosIds) -> tuple[tuple[int, ...] | None, Any]:
    """Concrete EOS ids become a static tuple (checked against V at trace time); traced ones stay dynamic."""
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
    the dtypes they are used in (`SamplingParams.in_used_dtypes`, `vsampler.inputs.ids_as_int32`,
    `vsampler.inputs.mask_words`)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    _check_prompt_len(prompt_len, history)
    if history is not None:
        history = ids_as_int32(history, "history")
    return params.in_used_dtypes(), history, mask_words(allowed_tokens)


def _prepare(logits, params, key, history, prompt_len, eos_static, eos_dynamic, allowed, draw=True) -> SamplerInputs:
    """`vsampler.inputs.prepare` on the jitted functions' arguments (static EOS ids or traced ones)."""
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
        return vocab_parallel.sample(inp, mesh=mesh, vocab_axis=vocab_axis)
    tokens, logprob_values = _SAMPLERS[impl](inp, logprobs)
    return tokens if logprobs is None else (tokens, logprob_values)


@functools.partial(jax.jit, static_argnames=("eos_static", "impl"))
def _process_jit(logits, params, history, prompt_len, eos_dynamic, allowed, *, eos_static, impl):
    inp = _prepare(logits, params, None, history, prompt_len, eos_static, eos_dynamic, allowed, draw=False)
    return _PROCESSORS.get(impl, reference.process_logits)(inp)


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
    if impl in _KERNEL_VARIANTS:
        outputs = pallas.launch(
            inp,
            finished=finished,
            pad_token_id=pad_token_id,
            variant=_KERNEL_VARIANTS[impl],
            top_n=None if logprobs is None else logprobs.n,
        )
        tokens, new_finished = outputs[0], outputs[1]
        if logprobs is None:
            return tokens, new_finished
        values = pallas.finish_logprobs(inp, logprobs, outputs, tokens)  # finished rows: replaced below
        return tokens, new_finished, lp.for_finished_rows(values, finished, pad_token_id)
    tokens, values = _SAMPLERS[impl](inp, logprobs)
    if inp.eos_ids is not None:
        finished_now = jnp.any(tokens[:, None] == inp.eos_ids[None, :], axis=1)
    else:
        finished_now = jnp.zeros_like(finished)
    out = jnp.where(finished, jnp.int32(pad_token_id), tokens), finished | finished_now
    if logprobs is None:
        return out
    return (*out, lp.for_finished_rows(values, finished, pad_token_id))


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
    `vsampler.logprobs`). A row that samples one of `eos_token_id` comes back finished (its EOS token is
    returned). On impl="pallas" this is the kernel's own entry (one launch); the other implementations
    apply the rule after sampling. `max_tokens` is the caller's: only it knows how many tokens each row
    has generated.
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id)
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
        impl=resolve_impl(impl),
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

    Every implementation follows `vsampler.reference` and maps the same key to the same uniform per row,
    so implementations agree token for token except where float rounding moves a CDF boundary.
    Greedy rows (temperature 0) return the lowest index of their maximum penalised logit. A row with no
    finite logit left (all -inf / NaN after the mask, bias, penalties and the min_tokens mask) returns
    token 0, or the first EOS id when `allowed_tokens` is given.

    `logprobs=n` (0 <= n <= 64): also the sampled token's log-probability and the n tokens with the
    largest penalised logits with theirs, in the `logprobs_mode` distribution: "raw" (after penalties,
    before temperature and filtering) or "processed" (what the token was drawn from). The fast paths
    get them from per-row values the sampling computes anyway plus n reductions over the row
    (`vsampler.logprobs`), never from a (B, V) log-softmax.

    `vocab_axis`: the logits are sharded over the vocabulary on this axis of `mesh` (default: the ambient
    mesh of `jax.set_mesh`), as a tensor-parallel lm head leaves them; the vocabulary-parallel sampler
    (`vsampler.vocab_parallel`) then samples them where they lie, communicating a few scalars per row
    instead of gathering them, and returns the tokens replicated. It is its own implementation: `impl`
    must stay "auto". A V the axis size does not divide is padded with -inf columns (never drawn).
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id)
    params, history, allowed_tokens = _at_the_boundary(params, history, prompt_len, allowed_tokens)
    request = lp.request(logprobs, logprobs_mode, _vocab(logits))
    sharded: dict[str, Any] = {}
    if vocab_axis is None:
        if mesh is not None:
            raise ValueError("mesh was given without vocab_axis: name the mesh axis the vocabulary is sharded on")
        impl = resolve_impl(impl)
    else:
        if impl != "auto":
            raise ValueError(
                f"impl={impl!r} cannot be combined with vocab_axis: the vocabulary-parallel sampler is its own "
                "implementation (leave impl='auto')"
            )
        if request is not None:
            raise ValueError(
                "logprobs cannot be combined with vocab_axis yet: the vocabulary-parallel sampler returns "
                "tokens only (gather the logits, or sample without vocab_axis, to get log-probabilities)"
            )
        impl = "vocab_parallel"
        sharded = {"mesh": vocab_parallel.resolve_mesh(mesh, vocab_axis), "vocab_axis": vocab_axis}
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
    eos_static, eos_dynamic = _static_eos(eos_token_id)
    params, history, allowed_tokens = _at_the_boundary(params, history, prompt_len, allowed_tokens)
    return _process_jit(
        logits,
        params,
        history,
        prompt_len,
        eos_dynamic,
        allowed_tokens,
        eos_static=eos_static,
        impl=resolve_impl(impl),
    )
