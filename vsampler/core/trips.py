"""The kernels' data-dependent loops as named *sites*, so that a static cost model can count them.

libtpu's static cost model (read by `vsampler.tools.estimate`) counts a loop with a static trip count exactly,
each trip adding its body's cycles, but a data-dependent `while_loop` as 0 trips, and a data-dependent
`cond` not by how often it is taken (the resident kernel's fallback cond, as launched, cost more than
both its branches compiled apart). Every such loop of the kernels goes through `while_loop` / `cond`
here, under a site name:

- in a normal launch (`fixed=None`) the site runs as written and also returns how many trips it took
  (a cond: 1 if taken); the TPU kernels write those counts into their statistics columns (`Site`), one
  per block of rows, which is how the estimate measures them, in interpret mode on the workload;
- with a `FixedTrips` as the kernel's static `trips` argument, each site instead runs a fixed number of
  trips (a `fori_loop`; a cond statically taken or not), so the compiled program has a cost the model
  counts. The results are then meaningless: compiles for the estimate only, never a launch. What a
  launch computes only to decide a site (a cond's predicate, a loop's condition before each trip and
  after the last) stays in the program, its value returned as the site's count: dropped, the compiler
  removed it and all that fed only it (the resident kernel's fallback predicate and the third values
  its column pass keeps for it: 5.9k cycles of `top_k`'s 89.4k at B=64, V=128256, float32, on v5e).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class FixedTrips:
    """Fixed trip counts by site name (a cond site: 1 = taken, 0 = not); absent sites run 0 trips.
    Hashable, for a kernel's static arguments."""

    counts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> FixedTrips:
        return cls(tuple(sorted((name, int(n)) for name, n in counts.items())))

    def __getitem__(self, site: str) -> int:
        return dict(self.counts).get(site, 0)


@dataclasses.dataclass(frozen=True)
class Site:
    """A data-dependent loop whose trips a TPU kernel writes to statistics column `column`, per block.

    `guard`: the cond the loop runs inside, if any; the column then holds 0 where the cond was not taken
    and 1 + the loop's trips where it was."""

    loop: str
    column: int
    guard: str | None = None


def while_loop(
    site: str, fixed: FixedTrips | None, cond_fun: Callable[[Any], jax.Array], body_fun: Callable, init: Any
) -> tuple[Any, jax.Array]:
    """`lax.while_loop(cond_fun, body_fun, init)` and its trip count (int32); with `fixed`, exactly
    `fixed[site]` trips of `body_fun` (a `fori_loop`), whatever `cond_fun` says, `cond_fun` still
    evaluated before each trip and after the last, as the data-dependent loop does (the count returned
    is then how many of those said go on: meaningless, but it keeps them in the program). Fixed at 0
    trips, the loop stays the data-dependent one, which the cost model counts as 0 trips: removing it
    altogether let Mosaic schedule the passes around it together, over VMEM (seen on v5e, 16 x 256000
    bfloat16)."""
    if fixed is None or fixed[site] == 0:
        out, trips = lax.while_loop(
            lambda st: cond_fun(st[0]), lambda st: (body_fun(st[0]), st[1] + 1), (init, jnp.int32(0))
        )
        return out, trips

    def trip(_: int, st: tuple) -> tuple:
        state, going_on = st
        return body_fun(state), going_on + jnp.asarray(cond_fun(state)).astype(jnp.int32)

    out, going_on = lax.fori_loop(0, fixed[site], trip, (init, jnp.int32(0)))
    return out, going_on + jnp.asarray(cond_fun(out)).astype(jnp.int32)


def cond(
    site: str, fixed: FixedTrips | None, pred: jax.Array, true_fun: Callable[[], Any], false_fun: Callable[[], Any]
) -> tuple[Any, jax.Array]:
    """`lax.cond(pred, true_fun, false_fun)` and whether it was taken (int32); with `fixed`, the branch
    `fixed[site]` names, chosen at trace time, and `pred` as the flag (meaningless, but the predicate a
    launch computes stays in the program)."""
    if fixed is None:
        return lax.cond(pred, true_fun, false_fun), pred.astype(jnp.int32)
    taken = fixed[site] > 0
    return (true_fun() if taken else false_fun()), jnp.asarray(pred).astype(jnp.int32)
