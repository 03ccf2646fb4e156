"""The public sampling functions and the dispatcher between implementations.

Shapes and dtypes:
  logits:       (B, V) float32, bfloat16 or float16 (math in float32). Any V (no multiple of 128 needed).
  params:       `SamplingParams`, each numeric field a scalar or a (B,) array.
  key:          one PRNG key (`jax.random.key(s)` or a raw `PRNGKey`), or a (B,) batch of keys: row i then
                draws from `key[i]` alone, so a request's tokens do not depend on its neighbours.
  history:      (B, L) integer token ids seen by each row, prompt then generated; negative = empty slot.
  prompt_len:   scalar or (B,) integer: history positions >= prompt_len are the generated tokens
                (presence / frequency penalties and `min_tokens` count only those). Default 0.
  eos_token_id: one id or several (int, sequence or 1-D array); needed when `min_tokens > 0`.
  impl:         "auto" | "reference" | "xla" | "pallas".
  mesh, vocab_axis (`sample` only): logits sharded over the vocabulary on that mesh axis (a tensor-parallel
                lm head's output) are sampled without gathering them: `vsampler.vocab_parallel`.

Both functions are jitted (static: the implementation, the EOS ids when concrete, and the active
stages, which `SamplingParams` carries as pytree aux data) and can be called inside a user's own
`jax.jit` as well. Semantics, ties, NaN and -inf: `vsampler.reference` (the spec) and
`vsampler.inputs` (argument checks and run-time sanitising).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vsampler import pallas, reference, vocab_parallel, xla
from vsampler.inputs import EosIds, SamplerInputs, check_prompt_len_range, prepare
from vsampler.params import SamplingParams

Impl = Literal["auto", "reference", "xla", "pallas"]
IMPL_NAMES: tuple[str, ...] = ("auto", "reference", "xla", "pallas")

# name -> sampler on prepared inputs. The fast paths register themselves here as they land.
_SAMPLERS: dict[str, Callable[[SamplerInputs], jax.Array]] = {
    "reference": reference.sample,
    "xla": xla.sample,
    "pallas": pallas.sample,
    # the kernel's GPU (Triton) variant by name, to verify it off GPU (interpret mode)
    "pallas-triton": functools.partial(pallas.sample, variant="triton"),
}
_PROCESSORS: dict[str, Callable[[SamplerInputs], jax.Array]] = {
    "reference": reference.process_logits,
    "xla": xla.process_logits,
    "pallas": pallas.process_logits,
    "pallas-triton": functools.partial(pallas.process_logits, variant="triton"),
}


def available_impls() -> tuple[str, ...]:
    """The implementations this installation can run (besides "auto")."""
    return tuple(_SAMPLERS)


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Maps `impl` to a concrete implementation. "auto" is pallas on TPU (where the kernel is compiled by
    Mosaic and verified against the reference) and xla elsewhere: on GPU too, until the kernel's Triton
    variant, so far only lowered and checked in interpret mode, has been run on a GPU."""
    if impl not in IMPL_NAMES and impl not in _SAMPLERS:
        raise ValueError(f"impl must be one of {IMPL_NAMES}, got {impl!r}")
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
    if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"eos_token_id must be an integer id or a sequence of ids, got {eos_token_id!r}")
    return tuple(int(i) for i in arr.reshape(-1)), None


def _check_prompt_len(prompt_len: Any, history: Any) -> None:
    """Checks concrete prompt lengths before jit turns them into tracers (shape errors come later)."""
    if history is not None and np.ndim(history) == 2:
        check_prompt_len_range(prompt_len, np.shape(history)[1])


def _eos(static: tuple[int, ...] | None, dynamic: Any) -> Any:
    return list(static) if static is not None else dynamic


@functools.partial(jax.jit, static_argnames=("eos_static", "impl", "mesh", "vocab_axis"))
def _sample_jit(logits, params, key, history, prompt_len, eos_dynamic, *, eos_static, impl, mesh=None, vocab_axis=None):
    inp = prepare(
        logits, params, key, history=history, prompt_len=prompt_len, eos_token_id=_eos(eos_static, eos_dynamic)
    )
    if vocab_axis is not None:
        return vocab_parallel.sample(inp, mesh=mesh, vocab_axis=vocab_axis)
    return _SAMPLERS[impl](inp)


@functools.partial(jax.jit, static_argnames=("eos_static", "impl"))
def _process_jit(logits, params, history, prompt_len, eos_dynamic, *, eos_static, impl):
    inp = prepare(
        logits,
        params,
        None,
        history=history,
        prompt_len=prompt_len,
        eos_token_id=_eos(eos_static, eos_dynamic),
        draw=False,
    )
    return _PROCESSORS.get(impl, reference.process_logits)(inp)


@functools.partial(jax.jit, static_argnames=("eos_static", "impl", "pad_token_id"))
def _sample_step_jit(
    logits, params, key, history, prompt_len, eos_dynamic, finished, *, eos_static, impl, pad_token_id
):
    inp = prepare(
        logits, params, key, history=history, prompt_len=prompt_len, eos_token_id=_eos(eos_static, eos_dynamic)
    )
    finished = jnp.asarray(finished, bool)
    if finished.shape != (logits.shape[0],):
        raise ValueError(f"finished must be a ({logits.shape[0]},) bool array (one flag per row), got {finished.shape}")
    if impl in ("pallas", "pallas-triton"):
        tokens, new_finished, _ = pallas.launch(
            inp, finished=finished, pad_token_id=pad_token_id, variant="triton" if impl == "pallas-triton" else None
        )
        return tokens, new_finished
    tokens = _SAMPLERS[impl](inp)
    if inp.eos_ids is not None:
        finished_now = jnp.any(tokens[:, None] == inp.eos_ids[None, :], axis=1)
    else:
        finished_now = jnp.zeros_like(finished)
    return jnp.where(finished, jnp.int32(pad_token_id), tokens), finished | finished_now


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
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """`sample` plus the EOS rule (spec stage 8), as a decode step needs it: `(tokens, finished)`.

    `finished` (B,) bool: rows already done; they emit `pad_token_id` and stay finished. A row that
    samples one of `eos_token_id` comes back finished (its EOS token is returned). On impl="pallas" this
    is the kernel's own entry (one launch); the other implementations apply the rule after sampling.
    `max_tokens` is the caller's: only it knows how many tokens each row has generated.
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id)
    _check_prompt_len(prompt_len, history)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id (an integer >= 0), got {pad_token_id!r}")
    return _sample_step_jit(
        logits,
        params,
        key,
        history,
        prompt_len,
        eos_dynamic,
        finished,
        eos_static=eos_static,
        impl=resolve_impl(impl),
        pad_token_id=int(pad_token_id),
    )


def sample(
    logits: jax.Array,
    params: SamplingParams,
    key: jax.Array,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    impl: Impl = "auto",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_axis: str | None = None,
) -> jax.Array:
    """Samples one token per row: `(B,)` int32, always in `[0, V)`.

    Every implementation follows `vsampler.reference` and maps the same key to the same uniform per row,
    so implementations agree token for token except where float rounding moves a CDF boundary.
    Greedy rows (temperature 0) return the lowest index of their maximum penalised logit. A row with no
    finite logit left (all -inf / NaN after bias, penalties and the min_tokens mask) returns token 0.

    `vocab_axis`: the logits are sharded over the vocabulary on this axis of `mesh` (default: the ambient
    mesh of `jax.set_mesh`), as a tensor-parallel lm head leaves them; the vocabulary-parallel sampler
    (`vsampler.vocab_parallel`) then samples them where they lie, communicating a few scalars per row
    instead of gathering them, and returns the tokens replicated. It is its own implementation: `impl`
    must stay "auto". A V the axis size does not divide is padded with -inf columns (never drawn).
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id)
    _check_prompt_len(prompt_len, history)
    if vocab_axis is None:
        if mesh is not None:
            raise ValueError("mesh was given without vocab_axis: name the mesh axis the vocabulary is sharded on")
        return _sample_jit(
            logits, params, key, history, prompt_len, eos_dynamic, eos_static=eos_static, impl=resolve_impl(impl)
        )
    if impl != "auto":
        raise ValueError(
            f"impl={impl!r} cannot be combined with vocab_axis: the vocabulary-parallel sampler is its own "
            "implementation (leave impl='auto')"
        )
    return _sample_jit(
        logits,
        params,
        key,
        history,
        prompt_len,
        eos_dynamic,
        eos_static=eos_static,
        impl="vocab_parallel",
        mesh=vocab_parallel.resolve_mesh(mesh, vocab_axis),
        vocab_axis=vocab_axis,
    )


def process_logits(
    logits: jax.Array,
    params: SamplingParams,
    *,
    history: jax.Array | None = None,
    prompt_len: jax.Array | int | None = None,
    eos_token_id: EosIds = None,
    impl: Impl = "auto",
) -> jax.Array:
    """The warped logits, `(B, V)` float32: dropped tokens are -inf, kept ones carry
    `penalised_logit / temperature`; a greedy row keeps only its argmax (lowest index on ties), carrying
    its penalised logit. `softmax` of a row is the distribution `sample` draws from.
    """
    eos_static, eos_dynamic = _static_eos(eos_token_id)
    _check_prompt_len(prompt_len, history)
    return _process_jit(
        logits, params, history, prompt_len, eos_dynamic, eos_static=eos_static, impl=resolve_impl(impl)
    )
