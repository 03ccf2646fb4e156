"""The implementations of the spec, each registered once under the name `impl=` takes.

Every implementation module registers itself when imported (`vsampler.core.reference` here in core,
`vsampler.impls.xla`, the kernel variants in `vsampler.impls.pallas`, the vocabulary-parallel sampler in
`vsampler.impls.vocab_parallel`); `vsampler/__init__.py` imports them all. Whatever lists
implementations reads this registry: `available_impls()`, `impl="auto"`, the CLI's `--impl` choices, the
verification grid and the tests. A new kernel variant is one module and one `register(...)` call.

Contract of an implementation, on inputs already checked and prepared by `vsampler.core.inputs.prepare`:
  sample(inp, request)   -> (tokens (B,) int32, LogProbs or None)   (`request`: None or a LogprobsRequest)
  process_logits(inp)    -> (B, V) float32 warped logits (-inf = dropped)
  step(inp, finished, pad_token_id, request) -> (tokens, finished[, LogProbs]) or None: the fused
                            decode step (spec stage 8 inside the implementation); None applies the EOS
                            rule after `sample`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

Sampler = Callable[..., tuple[Any, Any]]
Processor = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of the spec.

    name:          what `impl=` takes ("reference", "xla", "pallas", ...).
    sample:        the sampler on prepared inputs (module contract above).
    process_logits: the warped logits on prepared inputs.
    step:          the fused decode step, or None (`sample` then the EOS rule).
    kernel:        a Pallas kernel variant: off TPU and GPU it runs in interpret mode (for verification
                   only; the tests mark it `interpret`).
    auto_backends: the backends on which `impl="auto"` may pick it ("*": any; empty: never), and
                   `auto_rank` its preference there (lower first).
    per_row_stop_ids: whether it takes per-request EOS ids ((B, S)); False: such calls run on xla.
    selectable:    False for an implementation reached another way than `impl=` (the
                   vocabulary-parallel sampler: `vocab_axis=`).
    description:   one line, for `available_impls()`' readers and the CLI's help.
    extras:        what else the implementation offers its callers by name (the vocabulary-parallel
                   sampler's `resolve_mesh`).
    """

    name: str
    sample: Sampler
    process_logits: Processor | None
    description: str
    step: Callable[..., tuple[Any, ...]] | None = None
    kernel: bool = False
    auto_backends: tuple[str, ...] = ()
    auto_rank: int = 0
    per_row_stop_ids: bool = True
    selectable: bool = True
    extras: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict, compare=False, hash=False)


_IMPLEMENTATIONS: dict[str, Implementation] = {}


def register(implementation: Implementation) -> Implementation:
    """Adds `implementation` under its name (a second registration of a name replaces the first, so a
    module re-imported in a test does not fail) and returns it."""
    if not implementation.name or implementation.name == "auto":
        raise ValueError(f"an implementation needs a name other than 'auto', got {implementation.name!r}")
    _IMPLEMENTATIONS[implementation.name] = implementation
    return implementation


def unregister(name: str) -> None:
    """Removes `name` (a test's temporary implementation); unknown names are a ValueError."""
    get(name)
    del _IMPLEMENTATIONS[name]


def implementations(*, selectable: bool = True) -> tuple[Implementation, ...]:
    """The registered implementations (only those `impl=` takes, by default): the others before the
    kernel variants, each group in registration order (the reference registers first)."""
    found = [i for i in _IMPLEMENTATIONS.values() if i.selectable or not selectable]
    return tuple(sorted(found, key=lambda i: i.kernel))


def names(*, fast: bool = False, kernel: bool | None = None) -> tuple[str, ...]:
    """The names `impl=` takes. `fast`: all but the reference (what is verified against it);
    `kernel`: only the Pallas kernel variants (True) or only the others (False)."""
    return tuple(
        i.name
        for i in implementations()
        if not (fast and i.name == "reference") and (kernel is None or i.kernel == kernel)
    )


def get(name: str) -> Implementation:
    """The implementation registered as `name`, or a ValueError listing every name `impl=` takes."""
    found = _IMPLEMENTATIONS.get(name)
    if found is None:
        raise ValueError(f"impl must be one of {('auto', *names())}, got {name!r}")
    return found


def auto(backend: str) -> str:
    """What `impl="auto"` means on `backend`: the registered implementation ranked first there (the
    reference when none is)."""
    ranked = sorted(
        (i for i in implementations() if backend in i.auto_backends or "*" in i.auto_backends),
        key=lambda i: i.auto_rank,
    )
    return ranked[0].name if ranked else "reference"


@contextlib.contextmanager
def replaced(name: str, **fields: Any) -> Iterator[Implementation]:
    """Within the block, `name` is registered with `fields` changed (a test's wrong sampler, say); the
    original is restored after. The public entries look implementations up when they trace, so jax's
    compiled programs are dropped on entry and on exit (`jax.clear_caches()`): none compiled with one
    version of `name` answers for the other."""
    import jax

    original = get(name)
    jax.clear_caches()
    changed = register(dataclasses.replace(original, **fields))
    try:
        yield changed
    finally:
        register(original)
        jax.clear_caches()
